"""Which base models LiSA supports, and the checks run before anything is changed in a model."""

from __future__ import annotations

from typing import Any

from torch import nn

# model_type -> class name of its self-attention module. Each of these computes
# ``softmax(scale * rope(norm?(q)) rope(norm?(k))^T + M) v`` with the standard rotate-half rotary embedding.
SUPPORTED_ATTENTION = {
    "llama": "LlamaAttention",
    "mistral": "MistralAttention",
    "qwen2": "Qwen2Attention",
    "qwen3": "Qwen3Attention",
}
SUPPORTED_ATTN_IMPLEMENTATIONS = ("eager", "sdpa")


class UnsupportedModelError(ValueError):
    """The base model's architecture or attention layout is not one LiSA can wrap."""


def supported_list() -> str:
    return ", ".join(sorted(SUPPORTED_ATTENTION))


def base_model_type(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise UnsupportedModelError(
            f"LiSA needs a transformers model with a config.model_type; got {type(model).__name__}. "
            f"Supported model types: {supported_list()}."
        )
    return model_type.removeprefix("lisa_")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder layers of a causal LM (``model.model.layers`` for every supported type)."""
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise UnsupportedModelError(
            f"Could not find the decoder layers (model.model.layers) of {type(model).__name__}. "
            f"Supported model types: {supported_list()}."
        )
    return layers


def attention_of(layer: nn.Module) -> nn.Module:
    """The self-attention module of a decoder layer, unwrapped from a LiSA wrapper if needed."""
    attn = layer.self_attn
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


def check_model_supported(model: nn.Module) -> None:
    """Raise :class:`UnsupportedModelError` unless every decoder layer has a supported self-attention."""
    model_type = base_model_type(model)
    if model_type not in SUPPORTED_ATTENTION:
        raise UnsupportedModelError(
            f"LiSA does not support model type {model_type!r}. Supported model types: {supported_list()}."
        )
    expected = SUPPORTED_ATTENTION[model_type]
    for idx, layer in enumerate(decoder_layers(model)):
        attn = attention_of(layer)
        if type(attn).__name__ != expected or not all(
            hasattr(attn, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling")
        ):
            raise UnsupportedModelError(
                f"Layer {idx} of this {model_type} model has attention {type(attn).__name__}, but LiSA needs the "
                f"standard {expected} (q_proj, k_proj, v_proj, o_proj). Supported model types: {supported_list()}."
            )
    implementation = getattr(model.config, "_attn_implementation", None) or "eager"
    if implementation not in SUPPORTED_ATTN_IMPLEMENTATIONS:
        raise UnsupportedModelError(
            f"LiSA layers need the attention masks of the 'eager' or 'sdpa' implementation, but the model uses "
            f"{implementation!r}. Load it with attn_implementation='sdpa' (the untouched layers keep using sdpa)."
        )


def layer_attention_type(model: nn.Module, layer_idx: int) -> str:
    """``"full_attention"`` or ``"sliding_attention"`` for a layer (all full when the config does not say)."""
    layer_types = getattr(model.config, "layer_types", None)
    if layer_types:
        return layer_types[layer_idx]
    if model.config.model_type == "mistral" and getattr(model.config, "sliding_window", None):
        return "sliding_attention"
    return "full_attention"
