"""The compact model that ``merge_and_unload()`` returns (``docs/method.md``, step 6).

A merged shared layer holds only ``align``, the rank-r ``q_lowrank``/``k_lowrank``, ``v_proj`` and ``o_proj``; its
``q_proj``/``k_proj`` are gone. The full layer feeding it keeps all four projections, attends with the model's own
kernel and hands its rotary query/key on. Every other full layer is the base layer's projections with the same
forward, handing nothing on: on CPU its decode steps run through the kernel's decode rows, as the LiSA layers' do.

Merged models are ordinary transformers models of their own ``model_type`` (``lisa_llama``, ``lisa_qwen3``...),
which ``import peft_lisa`` registers with ``AutoConfig``/``AutoModelForCausalLM``: they save with
``save_pretrained`` and load with ``AutoModelForCausalLM.from_pretrained`` once ``peft_lisa`` is imported.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedConfig

from .architectures import base_model_type, decoder_layers
from .artifacts import atomic_directory, model_card
from .attention import LiSASubstitute, family_eager_attention, source_attention
from .carrier import LogitsCarrier
from .config import LISA_FORMAT_VERSION, LiSAConfig
from .functional import AttentionLayout, apply_partial_rotary, cache_argument, family_rotary
from .layer import ROLE_SHARED, ROLE_SOURCE, LiSALayer


class LiSAFullAttention(nn.Module):
    """A full attention layer of a merged model that feeds no shared layer: the base layer's own projections and
    attention kernel (the same state-dict keys), except that on CPU its decode steps run through the kernel's decode
    rows (:func:`~peft_lisa.tuner.attention.source_attention` with no carrier), as the LiSA layers' do. A layer of the
    base model that LiSA left alone would decode through the model's attention implementation: in bf16 on CPU, torch's
    sdpa of one query row is several times slower than those rows (``docs/method.md``, "Decoding")."""

    def __init__(
        self, attn: nn.Module, carrier: Optional[LogitsCarrier] = None, layout: Optional[AttentionLayout] = None
    ) -> None:
        super().__init__()
        layout = layout or AttentionLayout.from_attention(attn)
        self.config = attn.config
        self.layer_idx: int = attn.layer_idx
        # What transformers' attention kernels read from the module.
        self.num_key_value_groups: int = layout.num_kv_groups
        self.is_causal: bool = getattr(attn, "is_causal", True)
        self.sliding_window: Optional[int] = layout.sliding_window
        self.head_dim: int = layout.head_dim
        self.scaling: float = layout.scaling
        self.attention_dropout: float = getattr(attn, "attention_dropout", 0.0)
        for name in ("q_proj", "k_proj", "v_proj", "qkv_proj", *layout.qk_norm_names, "o_proj"):
            part = getattr(attn, name, None)
            if isinstance(part, nn.Module):
                setattr(self, name, part)
        # The layer's own layout, rotary function and eager kernel, read where the attention class was defined.
        self.lisa_layout = layout
        self.lisa_apply_rotary = family_rotary(attn)
        self.lisa_eager_attention = family_eager_attention(attn)
        self.carrier = carrier
        self.train(attn.training)  # the mode of the layer it replaces (dropout)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
        attention_mask: Optional[torch.Tensor] = None,
        cache: Any = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        cache = cache_argument(cache, kwargs)
        return source_attention(self, self.carrier, hidden_states, position_embeddings, attention_mask, cache, kwargs)


class LiSASourceAttention(LiSAFullAttention):
    """A full attention layer (the model's own attention kernel) that also hands its rotary query and key to the
    shared layer after it, which computes this layer's logits from them."""

    def __init__(self, attn: nn.Module, carrier: LogitsCarrier, layout: Optional[AttentionLayout] = None) -> None:
        super().__init__(attn, carrier, layout)


def _value_linear(attn: nn.Module, layout: AttentionLayout) -> nn.Module:
    """The layer's value projection as a module of its own: ``v_proj``, or the value rows of a fused ``qkv_proj``
    copied out, so that the merged layer keeps no query/key rows."""
    if not layout.fused_qkv:
        return attn.v_proj
    qkv_proj = attn.qkv_proj
    start = (layout.num_heads + layout.num_kv_heads) * layout.head_dim
    weight = qkv_proj.weight
    v_proj = nn.Linear(
        weight.shape[1],
        weight.shape[0] - start,
        bias=qkv_proj.bias is not None,
        device=weight.device,
        dtype=weight.dtype,
    )
    with torch.no_grad():
        v_proj.weight.copy_(weight[start:])
        if qkv_proj.bias is not None:
            v_proj.bias.copy_(qkv_proj.bias[start:])
    return v_proj


class LiSASharedAttention(LiSASubstitute):
    """A merged LiSA layer: ``softmax(align(S_{l-1}) + scale_r Q_r K_r^T + M) V W_o``, no ``q_proj``/``k_proj``.

    The :class:`LiSASubstitute` of the adapter, plus the layer's own frozen ``v_proj``/``o_proj`` (a fused ``qkv_proj``
    keeps only its value rows, as ``v_proj``).
    """

    def __init__(
        self, attn: nn.Module, spec: dict[str, Any], carrier: LogitsCarrier, layout: Optional[AttentionLayout] = None
    ) -> None:
        layout = layout or AttentionLayout.from_attention(attn)
        super().__init__(
            layout,
            attn.o_proj.out_features,
            layer_idx=attn.layer_idx,
            rank=spec["rank"],
            align_hidden=spec["align_hidden"],
            align_activation=spec["align_activation"],
            rotary_frequencies=spec["rotary_frequencies"],
            hands_on=attn.layer_idx + 1 in spec["share_layers"],
            carrier=carrier,
            init_permutation=(spec.get("align_init_permutations") or {}).get(str(attn.layer_idx)),
            head_mixing=spec.get("head_mixing", "full"),
        )
        self.attention_dropout: float = getattr(attn, "attention_dropout", 0.0)
        self.v_proj, self.o_proj = _value_linear(attn, layout), attn.o_proj
        self._fused: Optional[tuple[tuple, torch.Tensor]] = None  # see _lowrank_weight
        self.train(attn.training)  # the mode of the layer it replaces (dropout)

    def project(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        value_proj: Any,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`LiSASubstitute.project` with the rank-r queries and keys in one matrix product ``x [Wq_r; Wk_r]^T``
        and one rotary call, without autograd (generation): a decode step of a small model is dominated by
        per-operation overhead. With autograd the separate projections run."""
        if torch.is_grad_enabled():
            return super().project(hidden_states, position_embeddings, value_proj)
        batch, q_len, _ = hidden_states.shape
        layout, rank = self.layout, self.rank
        x = hidden_states.to(self.q_lowrank.weight.dtype)
        small = nn.functional.linear(x, self._lowrank_weight())  # B x T x (H + H_kv) r
        small = small.view(batch, q_len, layout.num_heads + layout.num_kv_heads, rank).transpose(1, 2)
        if self.rotary_columns and position_embeddings is not None:
            cos_r, sin_r = self.carrier.lowrank_rotary(position_embeddings, self.rotary_columns)
            small = apply_partial_rotary(small, cos_r.to(small.dtype), sin_r.to(small.dtype))
        return small[:, : layout.num_heads], small[:, layout.num_heads :], self.values(hidden_states, value_proj)

    def fused_copy_bytes(self) -> int:
        """Bytes of the ``[Wq_r; Wk_r]`` copy :meth:`project` keeps once it ran without autograd: memory the module
        holds beyond its parameters."""
        return sum(t.numel() * t.element_size() for t in (self.q_lowrank.weight, self.k_lowrank.weight))

    def _lowrank_weight(self) -> torch.Tensor:
        """``[Wq_r; Wk_r]`` ((H + H_kv) r x hidden, a copy of the two small factors), built once and rebuilt whenever
        either is replaced or changed in place (its storage or version counter). A graph that ``torch.compile``
        traces concatenates them itself (it cannot compare storages)."""
        tensors = (self.q_lowrank.weight, self.k_lowrank.weight)
        if torch.compiler.is_compiling():
            return torch.cat(tensors)
        key = tuple((t.data_ptr(), t._version, t.device, t.dtype) for t in tensors)
        if self._fused is None or self._fused[0] != key:
            self._fused = (key, torch.cat(tensors).detach())
        return self._fused[1]

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
        attention_mask: Optional[torch.Tensor] = None,
        cache: Any = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        cache = cache_argument(cache, kwargs)
        output = self.attend(
            hidden_states,
            position_embeddings,
            attention_mask,
            self.v_proj,
            self.o_proj,
            cache=cache,
            cache_kwargs=kwargs,
            dropout=self.attention_dropout if self.training else 0.0,
        )
        return output, None


def lisa_spec(config: LiSAConfig, num_heads: int, layouts: Optional[dict[int, AttentionLayout]] = None) -> dict:
    """The ``lisa`` entry of a merged model's config.json: all it takes to rebuild the merged layers, including the
    attention layout of every layer as read off the base model (rotary width and layout, scaling, softcap): the LiSA
    layers need theirs, and a full layer whose layout is saved decodes as :class:`LiSAFullAttention`."""
    spec = {
        "format_version": LISA_FORMAT_VERSION,
        "share_layers": list(config.share_layers),
        "source_layers": list(config.source_layers),
        "rank": config.rank,
        "align_hidden": config.resolved_align_hidden(num_heads),
        "align_activation": config.align_activation,
        "rotary_frequencies": config.rotary_frequencies,
        "head_mixing": config.head_mixing,
        "base_model": config.base_model_name_or_path,
    }
    if config.head_mixing == "kv_group":  # the KV group each head reads is derived from its initial permutation
        spec["align_init_permutations"] = {str(k): v for k, v in (config.align_init_permutations or {}).items()}
    if layouts:
        spec["attention_layouts"] = {str(idx): layout.to_dict() for idx, layout in sorted(layouts.items())}
    return spec


def _saved_layout(spec: dict[str, Any], layer_idx: int) -> Optional[AttentionLayout]:
    """The layout saved for a layer (files of format <= 2 saved none: their models are read off the base)."""
    saved = (spec.get("attention_layouts") or {}).get(str(layer_idx))
    return AttentionLayout.from_dict(saved) if saved else None


def asks_attention_weights(config: Any, kwargs: dict[str, Any]) -> bool:
    """Whether a forward's keyword arguments (or else the config) ask for attention weights (``output_attentions``)."""
    wanted = kwargs.get("output_attentions")
    return bool(getattr(config, "output_attentions", False) if wanted is None else wanted)


def attention_weights_refusal(fix: str) -> ValueError:
    """The error for a request of attention weights from a model with active LiSA layers: transformers records them
    only from the family's own attention modules, so LiSA's layers would be missing from the tuple it returns,
    without a sign. ``fix`` says where to get them instead."""
    return ValueError(
        "This model has LiSA layers, which return no attention weights (output_attentions=True): transformers would "
        f"return the other layers' weights only. {fix}"
    )


def _before_merged_forward(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
    """Forward pre-hook: no request for attention weights (:func:`attention_weights_refusal`), and nothing a forward
    handed on outlives it (with autograd the carrier keeps its entries)."""
    if asks_attention_weights(model.config, kwargs):
        raise attention_weights_refusal("Ask the base model for them.")
    model.lisa_logits_carrier.clear()


def install_merged_attention(model: nn.Module, spec: dict[str, Any]) -> None:
    """Give a freshly built base model the merged LiSA layers described by ``spec`` (weights to be loaded)."""
    if spec.get("format_version", 1) > LISA_FORMAT_VERSION:
        raise ValueError(
            f"This merged LiSA model was saved in format version {spec['format_version']}; the installed peft_lisa "
            f"reads up to {LISA_FORMAT_VERSION}. Upgrade peft_lisa."
        )
    carrier = LogitsCarrier()
    layers = decoder_layers(model)
    for layer_idx in spec["source_layers"]:
        attn = layers[layer_idx].self_attn
        layers[layer_idx].self_attn = LiSASourceAttention(attn, carrier, _saved_layout(spec, layer_idx))
    for layer_idx in spec["share_layers"]:
        attn = layers[layer_idx].self_attn
        layers[layer_idx].self_attn = LiSASharedAttention(attn, spec, carrier, _saved_layout(spec, layer_idx))
    lisa_layers = {*spec["source_layers"], *spec["share_layers"]}
    for layer_idx, layer in enumerate(layers):
        if layer_idx not in lisa_layers:
            layer.self_attn = _plain_full_layer(layer.self_attn, _saved_layout(spec, layer_idx))
    install_merged_hooks(model, carrier)


def _plain_full_layer(attn: nn.Module, layout: Optional[AttentionLayout]) -> nn.Module:
    """A merged model's full layer that feeds no shared layer: :class:`LiSAFullAttention` where the layer's probed
    layout is known; else (files saved before full layers' layouts were, or a layer the probe did not read) the base's
    own attention module, which computes the same without the decode rows."""
    return attn if layout is None else LiSAFullAttention(attn, None, layout)


def _foldable(x: torch.Tensor) -> bool:
    """Whether ``x`` (... x d) views as one matrix without a copy, as torch's ``matmul`` checks it stride by stride
    (a size-1 dimension counts too, unlike ``is_contiguous``)."""
    shape, strides = x.shape, x.stride()
    return all(strides[i] == strides[i + 1] * shape[i + 1] for i in range(x.dim() - 2))


def foldable_lm_head_input(lm_head: nn.Module, args: tuple) -> Optional[tuple]:
    """Forward pre-hook of the LM head: its input laid out so that ``matmul`` folds it into one matrix product.

    A prefill that keeps only the last tokens' logits hands the LM head a ``B x k x d`` slice of the ``B x T x d``
    hidden states. torch's ``matmul`` folds such a slice into one product only when the weight requires grad; with
    a frozen weight (``merge_and_unload()``, or ``requires_grad_(False)`` for inference) it runs ``bmm`` against the
    weight expanded over the batch, which on CPU in bf16 copies the whole weight once per sequence, a batch of one
    included (``docs/method.md``, "Decoding"). The copy of the slice costs ``B k d`` elements. Installed on a merged
    model and, while LiSA is injected, on the adapter model (its base is frozen too)."""
    if args and isinstance(args[0], torch.Tensor) and args[0].dim() > 2 and not _foldable(args[0]):
        return (args[0].clone(memory_format=torch.contiguous_format), *args[1:])
    return None


def install_merged_hooks(model: nn.Module, carrier: LogitsCarrier) -> None:
    """The merged model's forward hooks: the carrier cleared before each forward (:func:`_before_merged_forward`)
    and the LM head handed an input it multiplies in one product (:func:`foldable_lm_head_input`)."""
    model.lisa_logits_carrier = carrier
    model.register_forward_pre_hook(_before_merged_forward, with_kwargs=True)
    lm_head = model.get_output_embeddings()
    if isinstance(lm_head, nn.Module):
        lm_head.register_forward_pre_hook(foldable_lm_head_input)


class LiSAMergedMixin:
    """Mixed into a supported ``*ForCausalLM``: builds the base model, then swaps in the merged LiSA layers."""

    # Format 1 saved a bias b2 in the linear alignment; softmax ignored it, so it is dropped on load.
    _keys_to_ignore_on_load_unexpected = [r"self_attn\.align\.out_bias$"]

    def __init__(self, config: PreTrainedConfig, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        install_merged_attention(self, config.lisa)

    def save_pretrained(
        self, save_directory: str | os.PathLike, *args: Any, metrics: Optional[dict[str, Any]] = None, **kwargs: Any
    ) -> None:
        """``save_pretrained`` that writes atomically (see ``atomic_directory``) and adds a LiSA model card.

        ``metrics`` (e.g. ``{"perplexity (pydoc, window 256)": 19.3}``) are written into the model card.
        """
        with atomic_directory(save_directory) as scratch:
            super().save_pretrained(scratch, *args, **kwargs)
            card = model_card(self, kind="merged", base_model=self.config.lisa.get("base_model"), metrics=metrics)
            (scratch / "README.md").write_text(card)


MERGED_CLASSES: dict[str, tuple[type, type]] = {}  # model_type -> merged (config, model) classes, built on demand


def merged_classes(model_type: str) -> tuple[type, type]:
    """The merged ``lisa_<model_type>`` config and causal-LM classes of a base model type, built from transformers'
    auto mappings (subclasses of the base config and ``*ForCausalLM``) on first use and registered with
    ``AutoConfig``/``AutoModelForCausalLM``."""
    if model_type in MERGED_CLASSES:
        return MERGED_CLASSES[model_type]
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        base_config_cls = CONFIG_MAPPING[model_type]
        base_model_cls = MODEL_FOR_CAUSAL_LM_MAPPING[base_config_cls]
    except KeyError as error:
        raise ValueError(
            f"merge_and_unload() builds a compact causal LM of the base model's type, but transformers has no causal "
            f"LM for model type {model_type!r}."
        ) from error
    config_cls = type(
        f"LiSA{base_config_cls.__name__}",
        (base_config_cls,),
        {"model_type": f"lisa_{model_type}", "__module__": __name__},
    )
    model_cls = type(
        f"LiSA{base_model_cls.__name__}",
        (LiSAMergedMixin, base_model_cls),
        {"config_class": config_cls, "__module__": __name__},
    )
    MERGED_CLASSES[model_type] = (config_cls, model_cls)
    _share_weight_conversions(model_type)
    globals().update({config_cls.__name__: config_cls, model_cls.__name__: model_cls})  # importable by name
    AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
    AutoModelForCausalLM.register(config_cls, model_cls, exist_ok=True)
    return config_cls, model_cls


def _share_weight_conversions(model_type: str) -> None:
    """Give ``lisa_<model_type>`` the checkpoint conversions transformers applies to ``model_type`` (e.g. the fused
    expert weights of mixture-of-experts models): transformers looks them up by model type, so without this a merged
    MoE model would save per-expert weights and reload without them."""
    from transformers.conversion_mapping import (
        get_checkpoint_conversion_mapping,
        register_checkpoint_conversion_mapping,
    )

    conversions = get_checkpoint_conversion_mapping(model_type)
    if conversions is not None:
        register_checkpoint_conversion_mapping(f"lisa_{model_type}", conversions, overwrite=True)


class _DeferredMergedConfig:
    """Registered with ``AutoConfig`` for every ``lisa_<model_type>`` at import, without importing the model's code
    (a plain class: building ~200 config subclasses would cost most of a second). Reading or making a config of that
    type builds the real merged classes (:func:`merged_classes`) and returns the real config."""

    model_type: str = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        return cls._real()(*args, **kwargs)

    @classmethod
    def _real(cls) -> type:
        return merged_classes(cls.model_type.removeprefix("lisa_"))[0]

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> Any:
        return cls._real().from_dict(config_dict, **kwargs)

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        return cls._real().from_pretrained(*args, **kwargs)


def register_merged_models() -> None:
    """Register ``lisa_<model_type>`` with ``AutoConfig`` for every causal-LM type transformers knows (idempotent,
    cheap: the classes are built when a merged config is first read)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    for model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        if model_type in MERGED_CLASSES or model_type.startswith("lisa_"):
            continue
        deferred = type(f"_DeferredLiSA_{model_type}", (_DeferredMergedConfig,), {"model_type": f"lisa_{model_type}"})
        AutoConfig.register(deferred.model_type, deferred, exist_ok=True)


def merge_lisa_adapter(model: nn.Module, config: LiSAConfig, adapter_name: str) -> nn.Module:
    """Turn a model carrying LiSA wrappers into the compact merged model of ``adapter_name`` (in place)."""
    model_type = base_model_type(model)
    config_cls, model_cls = merged_classes(model_type)
    base_model_cls = model_cls.__mro__[2]
    if not isinstance(model, base_model_cls):
        raise ValueError(
            f"merge_and_unload() builds a compact causal LM ({model_cls.__name__}); it needs the model to be a "
            f"{base_model_cls.__name__}, not {type(model).__name__}."
        )
    layers = decoder_layers(model)
    layouts = {}  # the LiSA layers' and every other layer's as the probe read it on injection
    for idx, layer in enumerate(layers):
        attn = layer.self_attn
        layout = attn.layout if isinstance(attn, LiSALayer) else getattr(attn, "lisa_layout", None)
        if isinstance(layout, AttentionLayout):
            layouts[idx] = layout
    spec = lisa_spec(config, model.config.num_attention_heads, layouts)
    carrier = LogitsCarrier()
    for idx, layer in enumerate(layers):
        wrapper = layer.self_attn
        if not isinstance(wrapper, LiSALayer):
            layer.self_attn = _plain_full_layer(wrapper, layouts.get(idx))
            continue
        base, role = wrapper.base_layer, wrapper.lisa_role.get(adapter_name)
        if role == ROLE_SHARED:
            trained = wrapper.lisa_substitute[adapter_name]
            merged_attn = LiSASharedAttention(base, spec, carrier, wrapper.layout)
            merged_attn.align, merged_attn.q_lowrank, merged_attn.k_lowrank = (
                trained.align,
                trained.q_lowrank,
                trained.k_lowrank,
            )
            layer.self_attn = merged_attn
        elif role == ROLE_SOURCE:
            layer.self_attn = LiSASourceAttention(base, carrier, wrapper.layout)
        else:
            layer.self_attn = _plain_full_layer(base, layouts.get(idx))
    # The LiSA modules trained in float32 take the base model's dtype, so that a bf16 model caches bf16 rank-r keys.
    base_dtype = next(iter(layers[0].self_attn.o_proj.parameters())).dtype
    if base_dtype.is_floating_point:
        for module in model.modules():
            if isinstance(module, LiSASharedAttention):
                for part in (module.align, module.q_lowrank, module.k_lowrank):
                    part.to(base_dtype)
    merged_config = config_cls.from_dict({**_without_model_type(model.config.to_dict()), "lisa": spec})
    merged_config._attn_implementation = model.config._attn_implementation
    # Every module that read the old config (attention layers, rotary embedding...) reads the merged one, so that
    # e.g. set_attn_implementation() reaches all of them.
    old_config = model.config
    for module in model.modules():
        if getattr(module, "config", None) is old_config:
            module.config = merged_config
    # The merged class adds no state of its own beyond what was just installed; switching the class of the existing
    # instance avoids a second copy of the weights.
    model.__class__ = model_cls
    install_merged_hooks(model, carrier)
    if hasattr(model, "peft_config"):
        del model.peft_config
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def _without_model_type(config_dict: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config_dict.items() if k not in ("model_type", "architectures")}


def merged_layers(model: nn.Module) -> dict[int, str]:
    """Role of every LiSA layer of a merged model: ``{layer_idx: "shared" | "source"}``."""
    roles = {}
    for idx, layer in enumerate(decoder_layers(model)):
        if isinstance(layer.self_attn, LiSASharedAttention):
            roles[idx] = ROLE_SHARED
        elif isinstance(layer.self_attn, LiSASourceAttention):
            roles[idx] = ROLE_SOURCE
    return roles


__all__ = [
    "LiSAFullAttention",
    "LiSASharedAttention",
    "LiSASourceAttention",
    "MERGED_CLASSES",
    "merge_lisa_adapter",
    "merged_classes",
    "merged_layers",
    "register_merged_models",
]
