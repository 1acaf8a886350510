"""Sensitivity of each layer: how much the LM loss rises when only that layer shares, untrained.

This is direct sharing, an untrained baseline of ``docs/method.md`` ("Our design", "Baselines"): an untrained LiSA
adapter on layer ``l`` alone, with the identity and with the best head permutation as initial alignment ``P``.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Optional

import torch
from torch import nn

from ..tuner.architectures import decoder_layers, sharing_refusal
from ..tuner.config import LiSAConfig
from ..tuner.functional import permutation_matrix
from ..tuner.layer import LiSALayer
from .result import round_stored

logger = logging.getLogger("peft_lisa")

_NO_FORWARD = object()


@contextmanager
def _replay_layers(layers: nn.ModuleList, outputs: dict[int, Any], count: int) -> Iterator[None]:
    """Make decoder layers ``0..count-1`` return their recorded outputs instead of computing them.

    Sharing layer ``l`` changes nothing before layer ``l-1``, so the sensitivity pass replays those layers from the
    base run. An instance ``forward`` already present (e.g. an accelerate hook) is put back afterwards.
    """
    saved = []
    try:
        for index in range(count):
            layer = layers[index]
            saved.append((layer, layer.__dict__.get("forward", _NO_FORWARD)))
            layer.forward = _constant(outputs[index])
        yield
    finally:
        for layer, previous in saved:
            if previous is _NO_FORWARD:
                layer.__dict__.pop("forward", None)
            else:
                layer.forward = previous


def _constant(value: Any) -> Any:
    def forward(*args: Any, **kwargs: Any) -> Any:
        return value

    return forward


def _lm_loss(model: nn.Module, blocks: torch.Tensor) -> float:
    with torch.no_grad():
        return float(model(input_ids=blocks, labels=blocks, use_cache=False).loss)


def layer_sensitivity(
    model: nn.Module, blocks: torch.Tensor, permutations: list[Optional[list[int]]], progress: bool
) -> tuple[list[Optional[float]], list[Optional[float]], float]:
    """Loss rise when only layer ``l`` shares, per layer (untrained LiSA: direct sharing, a baseline of
    ``docs/method.md``, "Our design", "Baselines").

    Uses ``peft.get_peft_model(model, LiSAConfig(share_layers=[l]))`` and ``unload()``; the base model's
    ``requires_grad`` flags (which peft clears) are restored, and no ``peft_config`` is left on it.
    """
    from peft import get_peft_model
    from tqdm.auto import tqdm

    layers = decoder_layers(model)
    outputs: dict[int, Any] = {}
    handles = [
        layer.register_forward_hook(lambda module, args, output, index=index: outputs.__setitem__(index, output))
        for index, layer in enumerate(layers)
    ]
    try:
        base_loss = _lm_loss(model, blocks)
    finally:
        for handle in handles:
            handle.remove()

    requires_grad = {name: param.requires_grad for name, param in model.named_parameters()}
    direct: list[Optional[float]] = [None] * len(layers)
    permuted: list[Optional[float]] = [None] * len(layers)
    for layer_idx in tqdm(range(1, len(layers)), desc="LiSA analysis: sensitivity", disable=not progress):
        refusal = sharing_refusal(model, layer_idx)
        if refusal is not None:  # e.g. a full-attention layer after a sliding-window one
            logger.debug("LiSA analysis: no sensitivity for layer %d: %s", layer_idx, refusal)
            continue
        config = LiSAConfig(share_layers=[layer_idx], rank=2, align_hidden=0)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
            peft_model = get_peft_model(model, config)
        try:
            with _replay_layers(layers, outputs, layer_idx - 1):
                direct[layer_idx] = round_stored(_lm_loss(peft_model, blocks) - base_loss)
                perm = permutations[layer_idx]
                if perm is None or perm == list(range(len(perm))):
                    permuted[layer_idx] = direct[layer_idx]
                else:
                    align = _attention_wrapper(layers[layer_idx]).lisa_substitute["default"].align
                    with torch.no_grad():
                        align.permute.copy_(permutation_matrix(perm).to(align.permute))
                    permuted[layer_idx] = round_stored(_lm_loss(peft_model, blocks) - base_loss)
        finally:
            peft_model.unload()
            model.__dict__.pop("peft_config", None)
            for name, param in model.named_parameters():
                param.requires_grad_(requires_grad[name])
    return direct, permuted, base_loss


def _attention_wrapper(layer: nn.Module) -> LiSALayer:
    attn = layer.self_attn
    if not isinstance(attn, LiSALayer):
        raise RuntimeError(f"Expected a LiSA-wrapped attention, got {type(attn).__name__}.")
    return attn
