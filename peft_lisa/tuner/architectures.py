"""Which base models LiSA supports, and the checks run before anything is changed in a model.

Support is decided by structure, not by ``model_type``: a decoder layer's self-attention is supported when it has the
transformers decoder-attention layout (see :class:`~peft_lisa.tuner.functional.AttentionLayout`) and LiSA's reading
of that layout reproduces, on a probe input, exactly the query, key and value the layer hands its attention kernel,
with the same scaling and softcapping (:func:`describe_model_attention`). Layouts that cannot be shared (multi-head
latent attention, attention sinks, no per-head q/k projections) are refused with the reason.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from .functional import AttentionLayout, project_full_qkv

# The families tested end to end (tests/test_families.py): model_type -> class name of its self-attention module.
# Any other decoder with the same attention layout works too; see describe_model_attention.
SUPPORTED_ATTENTION = {
    "gemma2": "Gemma2Attention",
    "gemma3_text": "Gemma3Attention",
    "granite": "GraniteAttention",
    "llama": "LlamaAttention",
    "mistral": "MistralAttention",
    "mixtral": "MixtralAttention",
    "olmo2": "Olmo2Attention",
    "phi3": "Phi3Attention",
    "qwen2": "Qwen2Attention",
    "qwen3": "Qwen3Attention",
    "qwen3_moe": "Qwen3MoeAttention",
}
SUPPORTED_ATTN_IMPLEMENTATIONS = ("eager", "sdpa")
# Kernel keyword arguments LiSA reproduces or that do not change the logits; any other one that is set (attention
# sinks' ``s_aux``...) means the layer's attention is not the plain softmax(scale Q K^T + M) V.
_KNOWN_KERNEL_KWARGS = {"dropout", "scaling", "sliding_window", "softcap", "position_ids", "is_causal", "use_cache"}
_PROBE_IMPLEMENTATION = "lisa_structure_probe"
_PROBE_TOKENS = 5


class UnsupportedModelError(ValueError):
    """The base model's architecture or attention layout is not one LiSA can wrap."""


def supported_list() -> str:
    return ", ".join(sorted(SUPPORTED_ATTENTION))


SUPPORT_RULE = (
    "LiSA supports decoders whose attention has q/k/v/o projections (or a fused qkv projection), optional q/k norms, "
    f"rotary or no position embedding and a softmax over scaled q.k logits; tested families: {supported_list()}"
)


def base_model_type(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise UnsupportedModelError(
            f"LiSA needs a transformers model with a config.model_type; got {type(model).__name__}. {SUPPORT_RULE}."
        )
    return model_type.removeprefix("lisa_")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder layers of a causal LM (``model.model.layers``)."""
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise UnsupportedModelError(
            f"Could not find the decoder layers (model.model.layers) of {type(model).__name__} (model type "
            f"{getattr(getattr(model, 'config', None), 'model_type', None)!r}). {SUPPORT_RULE}."
        )
    return layers


def attention_of(layer: nn.Module) -> nn.Module:
    """The self-attention module of a decoder layer, unwrapped from a LiSA wrapper if needed."""
    attn = getattr(layer, "self_attn", None)
    if attn is None:
        raise UnsupportedModelError(f"Decoder layer {type(layer).__name__} has no self_attn module. {SUPPORT_RULE}.")
    return getattr(attn, "base_layer", attn)


def base_layout(model: nn.Module) -> dict[str, Any]:
    """The layer/head layout that an adapter depends on; saved in the adapter config and checked on load."""
    config = model.config
    attn = attention_of(decoder_layers(model)[0])
    return {
        "model_type": base_model_type(model),
        "num_hidden_layers": len(decoder_layers(model)),
        "hidden_size": config.hidden_size,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        "head_dim": attn.head_dim,
    }


def structural_refusal(attn: nn.Module, layer_idx: int) -> Optional[str]:
    """Why the attention module cannot be wrapped, read off its structure alone (None: nothing against it)."""
    name = type(attn).__name__
    if any(hasattr(attn, part) for part in ("kv_a_proj_with_mqa", "q_a_proj", "kv_b_proj")):
        return (
            f"layer {layer_idx} ({name}) uses multi-head latent attention (DeepSeek MLA): its keys come from a shared "
            "compressed latent and carry a separate rotary part, so there are no per-head q/k projections for LiSA to "
            "replace with a low-rank substitute"
        )
    if isinstance(getattr(attn, "sinks", None), torch.Tensor):
        return (
            f"layer {layer_idx} ({name}) has attention sinks (a learned per-head logit in every softmax): LiSA's "
            "shared layers would need their own sink in the softmax, which they do not have"
        )
    has_qkv = all(isinstance(getattr(attn, p, None), nn.Module) for p in ("q_proj", "k_proj", "v_proj"))
    has_fused = isinstance(getattr(attn, "qkv_proj", None), nn.Module)
    if not (has_qkv or has_fused) or not isinstance(getattr(attn, "o_proj", None), nn.Module):
        return f"layer {layer_idx} ({name}) has no q_proj/k_proj/v_proj (or fused qkv_proj) and o_proj"
    if not all(hasattr(attn, a) for a in ("head_dim", "scaling", "layer_idx", "config")):
        return f"layer {layer_idx} ({name}) lacks head_dim, scaling or layer_idx of the transformers attention layout"
    return None


def check_attn_implementation_of(model: nn.Module) -> None:
    implementation = getattr(model.config, "_attn_implementation", None) or "eager"
    if implementation not in SUPPORTED_ATTN_IMPLEMENTATIONS:
        raise UnsupportedModelError(
            f"LiSA layers need the attention masks of the 'eager' or 'sdpa' implementation, but the model uses "
            f"{implementation!r}. Load it with attn_implementation='sdpa' (the untouched layers keep using sdpa)."
        )


def check_model_supported(model: nn.Module) -> None:
    """Raise :class:`UnsupportedModelError` unless every decoder layer has a supported self-attention; describes
    every layer's attention (:func:`describe_model_attention`) on the way."""
    model_type = base_model_type(model)
    for idx, layer in enumerate(decoder_layers(model)):
        reason = structural_refusal(attention_of(layer), idx)
        if reason is not None:
            raise UnsupportedModelError(f"LiSA cannot wrap this {model_type} model: {reason}. {SUPPORT_RULE}.")
    check_attn_implementation_of(model)
    describe_model_attention(model)


def _probe_kernel(module: nn.Module, query, key, value, attention_mask, **kwargs):
    """Stands in for the attention kernel during the probe: records what the layer hands it."""
    module.lisa_probe_record = (query, key, value, kwargs)
    batch, _, q_len, _ = query.shape
    return query.new_zeros(batch, q_len, query.shape[1], value.shape[-1]), None


def describe_model_attention(model: nn.Module) -> dict[int, AttentionLayout]:
    """Read every decoder layer's :class:`AttentionLayout` off the model and check it by a probe; cache it on the
    attention module (``lisa_layout``) for the rest of the tuner (idempotent).

    The probe runs the model once on a few tokens with the attention kernel replaced by a recorder: for every layer,
    the query, key and value LiSA computes from the layer's input must equal those the layer hands its kernel, and
    the scaling, softcapping and sliding window it passes are taken as the layer's own. A layer whose attention LiSA
    cannot reproduce is refused with the reason.
    """
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    layers = decoder_layers(model)
    attns = [attention_of(layer) for layer in layers]
    if all(isinstance(getattr(attn, "lisa_layout", None), AttentionLayout) for attn in attns):
        return {idx: attn.lisa_layout for idx, attn in enumerate(attns)}
    inputs: dict[int, tuple] = {}
    handles, saved_configs = [], []

    def make_hook(idx: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            position_embeddings = kwargs.get("position_embeddings", args[1] if len(args) > 1 else None)
            inputs[idx] = (hidden, position_embeddings)

        return hook

    embeddings = model.get_input_embeddings()
    vocab = embeddings.weight.shape[0] if hasattr(embeddings, "weight") else 8
    device = embeddings.weight.device if hasattr(embeddings, "weight") else next(model.parameters()).device
    ids = (torch.arange(_PROBE_TOKENS, device=device) * 7 + 3) % max(vocab, 1)
    ALL_ATTENTION_FUNCTIONS[_PROBE_IMPLEMENTATION] = _probe_kernel
    try:
        for idx, attn in enumerate(attns):
            handles.append(attn.register_forward_pre_hook(make_hook(idx), with_kwargs=True))
            probe_config = _shallow_copy(attn.config)
            probe_config._attn_implementation = _PROBE_IMPLEMENTATION
            saved_configs.append(attn.config)
            attn.config = probe_config
        with torch.no_grad():
            _run_probe_forward(model, ids[None])
    finally:
        for handle in handles:
            handle.remove()
        for attn, config in zip(attns, saved_configs, strict=True):
            attn.config = config
        del ALL_ATTENTION_FUNCTIONS[_PROBE_IMPLEMENTATION]
    layouts = {}
    for idx, attn in enumerate(attns):
        record = attn.__dict__.pop("lisa_probe_record", None)
        if record is None or idx not in inputs:
            raise UnsupportedModelError(
                f"Layer {idx} ({type(attn).__name__}) did not call a transformers attention kernel "
                f"(ALL_ATTENTION_FUNCTIONS) in its forward, so LiSA cannot read its logits. {SUPPORT_RULE}."
            )
        layouts[idx] = _layout_from_probe(attn, idx, inputs[idx], record)
    for idx, attn in enumerate(attns):
        attn.lisa_layout = layouts[idx]
    return layouts


def _shallow_copy(config: Any) -> Any:
    new = config.__class__.__new__(config.__class__)
    new.__dict__.update(config.__dict__)
    return new


def _run_probe_forward(model: nn.Module, ids: torch.Tensor) -> None:
    inner = getattr(model, "model", None)
    target = inner if isinstance(inner, nn.Module) and hasattr(inner, "layers") else model
    target(input_ids=ids, use_cache=False)


def _layout_from_probe(attn: nn.Module, idx: int, layer_input: tuple, record: tuple) -> AttentionLayout:
    hidden, position_embeddings = layer_input
    query, key, value, kwargs = record
    name = type(attn).__name__
    extra = sorted(k for k, v in kwargs.items() if k not in _KNOWN_KERNEL_KWARGS and v is not None)
    if any("sink" in k or k == "s_aux" for k in extra):
        raise UnsupportedModelError(
            f"Layer {idx} ({name}) hands its attention kernel {extra} (attention sinks): LiSA's shared layers have no "
            f"sink in their softmax. {SUPPORT_RULE}."
        )
    static = AttentionLayout.from_attention(attn)
    scaling = kwargs.get("scaling")
    scaling = static.head_dim**-0.5 if scaling is None else float(scaling)
    rotary_dim, interleaved = 0, False
    if position_embeddings is not None:
        cos = position_embeddings[0]
        rotary_dim, interleaved = cos.shape[-1], _interleaved_layout(cos)
    candidates = []
    for use_rotary in (static.uses_rotary, not static.uses_rotary):
        candidates.append(
            AttentionLayout(
                **{
                    **static.__dict__,
                    "scaling": scaling,
                    "softcap": kwargs.get("softcap"),
                    "sliding_window": kwargs.get("sliding_window", static.sliding_window),
                    "rotary_dim": rotary_dim if use_rotary and position_embeddings is not None else 0,
                    "rotary_interleaved": interleaved,
                }
            )
        )
    problems = []
    for layout in candidates:
        problem = _mismatch(attn, layout, hidden, position_embeddings, (query, key, value))
        if problem is None:
            return layout
        problems.append(problem)
    raise UnsupportedModelError(
        f"Layer {idx} ({name}) computes its attention in a way LiSA's reading of its structure does not reproduce "
        f"({problems[0]}). {SUPPORT_RULE}."
    )


def _interleaved_layout(cos: torch.Tensor) -> bool:
    """Whether cos/sin hold frequency i at columns 2i, 2i+1 (Cohere) rather than i, i + w/2 (rotate half)."""
    half = cos.shape[-1] // 2
    rows = cos.reshape(-1, cos.shape[-1])[1:].float()  # position 0 has cos = 1 everywhere
    if rows.numel() == 0 or torch.allclose(rows[:, :half], rows[:, half:]):
        return False
    return bool(torch.allclose(rows[:, 0::2], rows[:, 1::2]))


def _mismatch(
    attn: nn.Module, layout: AttentionLayout, hidden: torch.Tensor, position_embeddings: Any, expected: tuple
) -> Optional[str]:
    try:
        got = project_full_qkv(attn, hidden, position_embeddings, layout)
    except Exception as error:  # noqa: BLE001 - any failure means the layout was misread
        return f"reading it as {_describe(layout)} fails: {error}"
    tolerance = 1e-4 if hidden.dtype == torch.float32 else 3e-2
    for part, ours, theirs in zip(("query", "key", "value"), got, expected, strict=True):
        if ours.shape != theirs.shape:
            return f"{part} has shape {tuple(theirs.shape)}, LiSA computes {tuple(ours.shape)}"
        scale = theirs.float().abs().max().clamp(min=1e-6)
        if ((ours.float() - theirs.float()).abs().max() / scale) > tolerance:
            return f"its {part} differs from the one LiSA computes reading it as {_describe(layout)}"
    return None


def _describe(layout: AttentionLayout) -> str:
    rotary = "no rotary" if not layout.uses_rotary else f"rotary on {layout.rotary_width} dims"
    qkv = "fused qkv_proj" if layout.fused_qkv else "q/k/v projections"
    return f"{qkv}, q/k norm {layout.qk_norm}, {rotary}"


def layer_layout(model: nn.Module, layer_idx: int) -> AttentionLayout:
    """The described :class:`AttentionLayout` of a decoder layer."""
    return describe_model_attention(model)[layer_idx]


def layer_attention_type(model: nn.Module, layer_idx: int) -> str:
    """``"full_attention"`` or ``"sliding_attention"`` for a layer: the config's ``layer_types`` when it has them,
    else whether the layer hands its kernel a sliding window."""
    layer_types = getattr(model.config, "layer_types", None)
    if layer_types:
        return layer_types[layer_idx]
    layout = AttentionLayout.from_attention(attention_of(decoder_layers(model)[layer_idx]))
    return "sliding_attention" if layout.sliding_window else "full_attention"


def layer_window(model: nn.Module, layer_idx: int) -> Optional[int]:
    """The keys a layer sees back: its sliding window, or None for full attention."""
    if layer_attention_type(model, layer_idx) != "sliding_attention":
        return None
    attn = attention_of(decoder_layers(model)[layer_idx])
    window = AttentionLayout.from_attention(attn).sliding_window
    return window or getattr(model.config, "sliding_window", None)


def sharing_refusal(model: nn.Module, layer_idx: int) -> Optional[str]:
    """Why layer ``layer_idx`` cannot share the attention of layer ``layer_idx - 1`` (None: it can).

    A layer may share from one that sees at least the keys it sees: a sliding-window layer from a full-attention one
    (its own mask, re-applied after the alignment, restricts it to its window), not the other way round.
    """
    own, source = layer_window(model, layer_idx), layer_window(model, layer_idx - 1)
    if source is None or (own is not None and own <= source):
        return None
    own_text = "full attention" if own is None else f"a sliding window of {own}"
    return (
        f"layer {layer_idx} uses {own_text} but layer {layer_idx - 1} uses a sliding window of {source}: the source "
        f"layer has no logits for the keys beyond its window (a sliding layer may share from a full one, not the "
        f"other way round)"
    )
