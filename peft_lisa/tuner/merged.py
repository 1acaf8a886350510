"""The compact model that ``merge_and_unload()`` returns (``docs/method.md``, step 6).

A merged shared layer holds only ``align``, the rank-r ``q_lowrank``/``k_lowrank``, ``v_proj`` and ``o_proj``; its
``q_proj``/``k_proj`` are gone. The full layer feeding it keeps all four projections, attends with the model's own
kernel and hands its rotary query/key on.

Merged models are ordinary transformers models of their own ``model_type`` (``lisa_llama``, ``lisa_qwen3``...),
which ``import peft_lisa`` registers with ``AutoConfig``/``AutoModelForCausalLM``: they save with
``save_pretrained`` and load with ``AutoModelForCausalLM.from_pretrained`` once ``peft_lisa`` is imported.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedConfig,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from .architectures import base_model_type, decoder_layers
from .artifacts import atomic_directory, model_card
from .attention import LiSASubstitute, source_attention
from .carrier import LogitsCarrier
from .config import LISA_FORMAT_VERSION, LiSAConfig
from .functional import AttentionLayout, sliding_window_of
from .layer import ROLE_SHARED, ROLE_SOURCE, LiSALayer

_BASE_CLASSES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
}


class LiSASourceAttention(nn.Module):
    """A full attention layer (the model's own attention kernel) that also hands its rotary query and key to the
    shared layer after it, which computes this layer's logits from them."""

    def __init__(self, attn: nn.Module, carrier: LogitsCarrier) -> None:
        super().__init__()
        self.config = attn.config
        self.layer_idx: int = attn.layer_idx
        # What transformers' attention kernels read from the module.
        self.num_key_value_groups: int = attn.num_key_value_groups
        self.is_causal: bool = getattr(attn, "is_causal", True)
        self.sliding_window: Optional[int] = sliding_window_of(attn)
        self.head_dim: int = attn.head_dim
        self.scaling: float = attn.scaling
        self.attention_dropout: float = attn.attention_dropout
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        if getattr(attn, "q_norm", None) is not None:
            self.q_norm, self.k_norm = attn.q_norm, attn.k_norm
        self.carrier = carrier

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: Optional[torch.Tensor] = None,
        cache: Any = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        return source_attention(self, self.carrier, hidden_states, position_embeddings, attention_mask, cache, kwargs)


class LiSASharedAttention(LiSASubstitute):
    """A merged LiSA layer: ``softmax(align(S_{l-1}) + scale_r Q_r K_r^T + M) V W_o``, no ``q_proj``/``k_proj``.

    The :class:`LiSASubstitute` of the adapter, plus the layer's own frozen ``v_proj``/``o_proj``.
    """

    def __init__(self, attn: nn.Module, spec: dict[str, Any], carrier: LogitsCarrier) -> None:
        super().__init__(
            AttentionLayout.from_attention(attn),
            attn.v_proj.in_features,
            layer_idx=attn.layer_idx,
            rank=spec["rank"],
            align_hidden=spec["align_hidden"],
            align_activation=spec["align_activation"],
            rotary_frequencies=spec["rotary_frequencies"],
            hands_on=attn.layer_idx + 1 in spec["share_layers"],
            carrier=carrier,
        )
        self.attention_dropout: float = attn.attention_dropout
        self.v_proj, self.o_proj = attn.v_proj, attn.o_proj

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: Optional[torch.Tensor] = None,
        cache: Any = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
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


def lisa_spec(config: LiSAConfig, num_heads: int) -> dict[str, Any]:
    """The ``lisa`` entry of a merged model's config.json: all it takes to rebuild the merged layers."""
    return {
        "format_version": LISA_FORMAT_VERSION,
        "share_layers": list(config.share_layers),
        "source_layers": list(config.source_layers),
        "rank": config.rank,
        "align_hidden": config.resolved_align_hidden(num_heads),
        "align_activation": config.align_activation,
        "rotary_frequencies": config.rotary_frequencies,
        "base_model": config.base_model_name_or_path,
    }


def _clear_logits_carrier(model: nn.Module, args: Any) -> None:
    """Forward pre-hook: nothing a forward handed on outlives it (with autograd the carrier keeps its entries)."""
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
        layers[layer_idx].self_attn = LiSASourceAttention(layers[layer_idx].self_attn, carrier)
    for layer_idx in spec["share_layers"]:
        layers[layer_idx].self_attn = LiSASharedAttention(layers[layer_idx].self_attn, spec, carrier)
    model.lisa_logits_carrier = carrier
    model.register_forward_pre_hook(_clear_logits_carrier)


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


def _merged_classes(model_type: str) -> tuple[type, type]:
    base_config_cls, base_model_cls = _BASE_CLASSES[model_type]
    config_cls = type(f"LiSA{base_config_cls.__name__}", (base_config_cls,), {"model_type": f"lisa_{model_type}"})
    model_cls = type(
        f"LiSA{base_model_cls.__name__}",
        (LiSAMergedMixin, base_model_cls),
        {"config_class": config_cls, "__module__": __name__},
    )
    return config_cls, model_cls


MERGED_CLASSES: dict[str, tuple[type, type]] = {
    model_type: _merged_classes(model_type) for model_type in _BASE_CLASSES
}
globals().update({cls.__name__: cls for pair in MERGED_CLASSES.values() for cls in pair})  # importable by name


def register_merged_models() -> None:
    """Register the merged model types with transformers' Auto classes (idempotent)."""
    for config_cls, model_cls in MERGED_CLASSES.values():
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        AutoModelForCausalLM.register(config_cls, model_cls, exist_ok=True)


def merge_lisa_adapter(model: nn.Module, config: LiSAConfig, adapter_name: str) -> nn.Module:
    """Turn a model carrying LiSA wrappers into the compact merged model of ``adapter_name`` (in place)."""
    model_type = base_model_type(model)
    if model_type not in MERGED_CLASSES or not isinstance(model, _BASE_CLASSES[model_type][1]):
        raise ValueError(
            f"merge_and_unload() builds a compact causal LM; it supports "
            f"{', '.join(cls.__name__ for _, cls in _BASE_CLASSES.values())}, not {type(model).__name__}."
        )
    layers = decoder_layers(model)
    spec = lisa_spec(config, model.config.num_attention_heads)
    carrier = LogitsCarrier()
    for layer in layers:
        wrapper = layer.self_attn
        if not isinstance(wrapper, LiSALayer):
            continue
        base, role = wrapper.base_layer, wrapper.lisa_role.get(adapter_name)
        if role == ROLE_SHARED:
            trained = wrapper.lisa_substitute[adapter_name]
            merged_attn = LiSASharedAttention(base, spec, carrier)
            merged_attn.align, merged_attn.q_lowrank, merged_attn.k_lowrank = (
                trained.align,
                trained.q_lowrank,
                trained.k_lowrank,
            )
            layer.self_attn = merged_attn
        elif role == ROLE_SOURCE:
            layer.self_attn = LiSASourceAttention(base, carrier)
        else:
            layer.self_attn = base
    # The LiSA modules trained in float32 take the base model's dtype, so that a bf16 model caches bf16 rank-r keys.
    base_dtype = next(iter(layers[0].self_attn.v_proj.parameters())).dtype
    if base_dtype.is_floating_point:
        for module in model.modules():
            if isinstance(module, LiSASharedAttention):
                for part in (module.align, module.q_lowrank, module.k_lowrank):
                    part.to(base_dtype)
    config_cls, model_cls = MERGED_CLASSES[model_type]
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
    model.lisa_logits_carrier = carrier
    model.register_forward_pre_hook(_clear_logits_carrier)
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
    "LiSASharedAttention",
    "LiSASourceAttention",
    "MERGED_CLASSES",
    "merge_lisa_adapter",
    "merged_layers",
    "register_merged_models",
]
