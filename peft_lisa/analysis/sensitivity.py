"""Sensitivity of each layer: how much the LM loss rises when only that layer shares.

:func:`layer_sensitivity` measures direct sharing, an untrained baseline of ``docs/method.md`` ("Our design",
"Baselines"): an untrained LiSA adapter on layer ``l`` alone, with the identity and with the best head permutation as
initial alignment ``P``. :func:`calibrated_layer_sensitivity` measures the same adapter after a short layer-wise
calibration (``docs/method.md``, "Layer choice"), the default score of the layer choice.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Optional

import torch
from torch import nn

from ..calibration import calibrate
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


def _log_probs(model: nn.Module, blocks: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities, (B * T) x V float32."""
    with torch.no_grad():
        logits = model(input_ids=blocks, use_cache=False).logits
    return torch.log_softmax(logits.float().flatten(0, 1), dim=-1)


def output_kl(model: nn.Module, blocks: torch.Tensor, base_log_probs: torch.Tensor) -> float:
    """Mean per-token ``KL(base || model)`` of the next-token distributions on ``blocks`` (nats)."""
    log_probs = _log_probs(model, blocks)
    return float((base_log_probs.exp() * (base_log_probs - log_probs)).sum(-1).mean())


def _base_run(
    model: nn.Module, blocks: torch.Tensor, keep_log_probs: bool
) -> tuple[dict[int, Any], float, Optional[torch.Tensor]]:
    """Every decoder layer's output on ``blocks`` (for :func:`_replay_layers`), the base model's LM loss and, with
    ``keep_log_probs``, its next-token log-probabilities (``B*T x V`` float32: about 200 MB at 4 x 256 tokens and a
    50k vocabulary; ``None`` without)."""
    outputs: dict[int, Any] = {}
    handles = [
        layer.register_forward_hook(lambda module, args, output, index=index: outputs.__setitem__(index, output))
        for index, layer in enumerate(decoder_layers(model))
    ]
    try:
        log_probs = _log_probs(model, blocks)
    finally:
        for handle in handles:
            handle.remove()
    targets = blocks[:, 1:].flatten()
    rows = log_probs.view(*blocks.shape, -1)[:, :-1].flatten(0, 1)
    loss = float(-rows.gather(1, targets[:, None].to(rows.device)).mean())
    return outputs, loss, log_probs if keep_log_probs else None


@contextmanager
def _single_layer_adapter(model: nn.Module, config: LiSAConfig, seed: Optional[int] = None) -> Iterator[nn.Module]:
    """``get_peft_model(model, config)`` for the duration of the block, then ``unload()``; the base model's
    ``requires_grad`` flags (which peft clears) are restored, and no ``peft_config`` is left on it. With ``seed``,
    the adapter is initialised under ``torch.manual_seed(seed)`` and the global RNG restored after."""
    from peft import get_peft_model

    requires_grad = {name: param.requires_grad for name, param in model.named_parameters()}
    with warnings.catch_warnings(), torch.random.fork_rng(devices=[], enabled=seed is not None):
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        if seed is not None:
            torch.manual_seed(seed)
        peft_model = get_peft_model(model, config)
    try:
        yield peft_model
    finally:
        peft_model.unload()
        model.__dict__.pop("peft_config", None)
        for name, param in model.named_parameters():
            param.requires_grad_(requires_grad[name])


def _candidate_layers(model: nn.Module) -> Iterator[int]:
    """Layers ``1..L-1`` that may share with their predecessor (e.g. not a full-attention layer after a
    sliding-window one)."""
    for layer_idx in range(1, len(decoder_layers(model))):
        refusal = sharing_refusal(model, layer_idx)
        if refusal is None:
            yield layer_idx
        else:
            logger.debug("LiSA analysis: no sensitivity for layer %d: %s", layer_idx, refusal)


def layer_sensitivity(
    model: nn.Module, blocks: torch.Tensor, permutations: list[Optional[list[int]]], progress: bool
) -> tuple[list[Optional[float]], list[Optional[float]], float]:
    """Loss rise when only layer ``l`` shares, per layer (untrained LiSA: direct sharing, a baseline of
    ``docs/method.md``, "Our design", "Baselines").

    Uses ``peft.get_peft_model(model, LiSAConfig(share_layers=[l]))`` and ``unload()``; the base model's
    ``requires_grad`` flags (which peft clears) are restored, and no ``peft_config`` is left on it.
    """
    from tqdm.auto import tqdm

    layers = decoder_layers(model)
    outputs, base_loss, _ = _base_run(model, blocks, keep_log_probs=False)
    direct: list[Optional[float]] = [None] * len(layers)
    permuted: list[Optional[float]] = [None] * len(layers)
    for layer_idx in tqdm(list(_candidate_layers(model)), desc="LiSA analysis: sensitivity", disable=not progress):
        config = LiSAConfig(share_layers=[layer_idx], rank=2, align_hidden=0)
        with _single_layer_adapter(model, config) as peft_model, _replay_layers(layers, outputs, layer_idx - 1):
            direct[layer_idx] = round_stored(_lm_loss(peft_model, blocks) - base_loss)
            perm = permutations[layer_idx]
            if perm is None or perm == list(range(len(perm))):
                permuted[layer_idx] = direct[layer_idx]
            else:
                align = _attention_wrapper(layers[layer_idx]).lisa_substitute["default"].align
                with torch.no_grad():
                    align.permute.copy_(permutation_matrix(perm).to(align.permute))
                permuted[layer_idx] = round_stored(_lm_loss(peft_model, blocks) - base_loss)
    return direct, permuted, base_loss


def calibrated_layer_sensitivity(
    model: nn.Module,
    tokenizer: Any,
    calibration_ids: torch.Tensor,
    blocks: torch.Tensor,
    permutations: list[Optional[list[int]]],
    *,
    rank: int,
    adam_steps: int,
    progress: bool,
) -> tuple[list[Optional[float]], float]:
    """How far the model's output moves when only layer ``l`` shares, after a short layer-wise calibration of that
    layer alone (``docs/method.md``, "Layer choice").

    Per layer: a rank-``rank`` LiSA adapter on layer ``l`` alone, initialised with ``permutations[l]``, is fitted
    by :func:`peft_lisa.calibration.calibrate` on ``calibration_ids`` (L-BFGS 10 + Adam ``adam_steps``); its score
    is the mean per-token ``KL(base || adapted)`` of the next-token distributions on ``blocks`` (nats; unlike a
    loss rise it does not depend on the labels, and it is never negative). It measures what the layer costs once
    its LiSA modules have done their best, where the untrained sensitivity measures direct sharing. The adapter of
    layer ``l`` is initialised under ``torch.manual_seed(l)`` (the global RNG is restored after), so the scores repeat.
    """
    from tqdm.auto import tqdm

    layers = decoder_layers(model)
    outputs, base_loss, base_log_probs = _base_run(model, blocks, keep_log_probs=True)
    scores: list[Optional[float]] = [None] * len(layers)
    for layer_idx in tqdm(
        list(_candidate_layers(model)), desc="LiSA analysis: calibrated sensitivity", disable=not progress
    ):
        perm = permutations[layer_idx]
        config = LiSAConfig(
            share_layers=[layer_idx],
            rank=rank,
            align_hidden=0,
            align_init_permutations=None if perm is None else {layer_idx: perm},
        )
        with _single_layer_adapter(model, config, seed=layer_idx) as peft_model:
            # one calibration per layer: no per-layer INFO lines from calibrate(), the progress bar reports
            calibrate(peft_model, tokenizer, calibration_ids, adam_steps=adam_steps, progress=False, log=False)
            with _replay_layers(layers, outputs, layer_idx - 1):
                scores[layer_idx] = round_stored(output_kl(peft_model, blocks, base_log_probs))
    return scores, base_loss


def _attention_wrapper(layer: nn.Module) -> LiSALayer:
    attn = layer.self_attn
    if not isinstance(attn, LiSALayer):
        raise RuntimeError(f"Expected a LiSA-wrapped attention, got {type(attn).__name__}.")
    return attn
