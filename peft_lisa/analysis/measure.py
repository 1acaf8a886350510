"""The measurement: :func:`analyze` records every layer's attention rows by hooks on calibration text and turns them
into an :class:`~peft_lisa.analysis.result.AttentionAnalysis` (see the ``peft_lisa.analysis`` package docstring)."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import nn

from ..tuner.architectures import attention_of, check_model_supported, decoder_layers
from ..tuner.functional import additive_mask, layer_logits
from ..tuner.layer import LiSALayer
from .divergence import best_grouped_matching, best_head_matching, js_sum
from .result import AttentionAnalysis, round_stored
from .sampling import calibration_blocks, spread_indices, stratum_middles
from .sensitivity import calibrated_layer_sensitivity, layer_sensitivity

logger = logging.getLogger("peft_lisa")

# The settings the jobs analyse with when they choose layers by ``sensitivity_calibrated``
# (docs/calibration/layer_choice.md): 4 sequences calibrate each layer (L-BFGS 10 + Adam 25 steps), 4 others score
# it; with 2 batches of 4 sequences the two sets are disjoint.
CALIBRATED_SCORE_SETTINGS = {"calibrated_sensitivity": True, "sensitivity_sequences": 4, "calibration_sequences": 4}


@contextmanager
def _attention_row_hooks(model: nn.Module, positions: torch.Tensor, store: dict[int, torch.Tensor]) -> Iterator[None]:
    """While active, every forward pass stores in ``store[l]`` the attention probabilities of layer ``l`` at the query
    ``positions``: B x H x R x T, float32, computed from the layer's own rotary Q/K and the mask it receives."""

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        position_embeddings = kwargs.get("position_embeddings")
        if position_embeddings is None and len(args) > 1:
            position_embeddings = args[1]
        rows = positions.to(hidden_states.device)
        logits = layer_logits(module, hidden_states, position_embeddings, rows)  # B x H x R x T, softcap included
        length = logits.shape[-1]
        mask = additive_mask(kwargs.get("attention_mask"), length, length, logits.device)[..., rows, :]
        store[module.layer_idx] = torch.softmax(logits + mask, dim=-1)

    handles = [
        attention_of(layer).register_forward_pre_hook(hook, with_kwargs=True) for layer in decoder_layers(model)
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _check_plain_model(model: nn.Module) -> None:
    if any(isinstance(module, LiSALayer) for module in model.modules()) or hasattr(model, "peft_config"):
        raise ValueError(
            "analyze() needs the plain base model, but this one carries PEFT adapters. Pass the base model (e.g. "
            "peft_model.get_base_model() after unload()), or analyse before get_peft_model."
        )
    check_model_supported(model)


def analyze(
    model: nn.Module,
    tokenizer: Any,
    texts: Union[str, Sequence[str]],
    *,
    seq_len: int = 256,
    batch_size: int = 4,
    max_batches: int = 8,
    sensitivity: bool = True,
    progress: bool = True,
    query_rows: int = 64,
    matrix_rows: int = 8,
    sensitivity_sequences: int = 2,
    calibrated_sensitivity: bool = False,
    calibration_rank: int = 8,
    calibration_sequences: int = 4,
    calibration_steps: int = 25,
) -> AttentionAnalysis:
    """Measure how similar each layer's attention is to its predecessor's, on calibration text.

    Args:
        model: a supported causal LM (llama, mistral, qwen2, qwen3), not wrapped by PEFT. It is left unchanged.
        tokenizer: its tokenizer (needs an EOS token, which separates the documents).
        texts: calibration documents; empty ones are skipped, short ones join the token stream.
        seq_len: tokens per calibration sequence.
        batch_size: sequences per forward pass.
        max_batches: at most this many batches (``batch_size * max_batches`` sequences, spread over the texts).
        sensitivity: also measure the loss rise of sharing each layer alone (one extra forward pass per layer, two
            where the best permutation is not the identity; layers before ``l-1`` are replayed, not recomputed).
        progress: show tqdm progress bars.
        query_rows: query positions per sequence whose attention rows enter the divergences (evenly spaced; the
            cost of the divergences grows with it). ``seq_len - 1`` or more uses every position.
        matrix_rows: query positions per sequence (a subset of the above) for the L x L layer matrix, whose cost
            grows with the square of the number of layers.
        sensitivity_sequences: sequences (evenly spread over the calibration set) in the sensitivity batch.
        calibrated_sensitivity: also measure ``sensitivity_calibrated``, the score ``docs/method.md`` ("Layer
            choice") recommends: how far the output moves (mean per-token KL to the base model on the sensitivity
            batch) when each layer alone shares after a short layer-wise calibration, a rank-``calibration_rank``
            adapter fitted by :func:`peft_lisa.calibrate` on ``calibration_sequences`` of the calibration
            sequences (L-BFGS 10 + Adam ``calibration_steps``; outside the sensitivity batch where there are
            enough sequences). Costs about one calibration of every layer at that budget.

    Returns:
        An :class:`AttentionAnalysis`; pass it to :func:`choose_share_layers` or ``LiSAConfig.from_analysis``.

    Raises:
        ValueError: no usable calibration text, bad arguments, or a model that already carries adapters.
    """
    from tqdm.auto import tqdm

    _check_plain_model(model)
    for name, value in (
        ("batch_size", batch_size),
        ("max_batches", max_batches),
        ("query_rows", query_rows),
        ("matrix_rows", matrix_rows),
        ("sensitivity_sequences", sensitivity_sequences),
        ("calibration_rank", calibration_rank),
        ("calibration_sequences", calibration_sequences),
        ("calibration_steps", calibration_steps),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    blocks = calibration_blocks(tokenizer, texts, seq_len, batch_size * max_batches)
    layers = decoder_layers(model)
    num_layers = len(layers)
    attn0 = attention_of(layers[0])
    num_heads = model.config.num_attention_heads
    num_kv_heads = getattr(model.config, "num_key_value_heads", None) or num_heads
    if num_layers < 2:
        raise ValueError("The model has a single decoder layer: there is no pair of layers to compare.")

    positions = [1 + i for i in stratum_middles(seq_len - 1, query_rows)]  # position 0 attends only to itself
    subset = stratum_middles(len(positions), matrix_rows)  # indices into positions for the L x L matrix
    matrix_positions = [positions[i] for i in subset]
    device = next(attn0.parameters()).device
    inner = getattr(model, "model", model)  # the decoder stack: the LM head is not needed for attention
    logger.info(
        "LiSA analysis: %d sequences of %d tokens, %d layers x %d heads, %d query rows per sequence%s",
        len(blocks),
        seq_len,
        num_layers,
        num_heads,
        len(positions),
        ", with sensitivity" if sensitivity else "",
    )

    adjacent = {layer: torch.zeros(num_heads, num_heads, dtype=torch.float64) for layer in range(1, num_layers)}
    pairwise = {
        (a, b): torch.zeros(num_heads, num_heads, dtype=torch.float64)
        for a in range(num_layers)
        for b in range(a + 1, num_layers)
    }
    adjacent_rows = matrix_count = 0
    was_training = model.training
    model.eval()
    try:
        store: dict[int, torch.Tensor] = {}
        batches = blocks.split(batch_size)
        with _attention_row_hooks(model, torch.tensor(positions), store):
            for batch in tqdm(batches, desc="LiSA analysis: attention", disable=not progress):
                with torch.no_grad():
                    inner(input_ids=batch.to(device), use_cache=False)
                # Adjacent layers: H x H divergences on every selected row (docs/method.md, "What the paper
                # establishes").
                for layer in range(1, num_layers):
                    adjacent[layer] += js_sum(store[layer], store[layer - 1], positions)
                adjacent_rows += batch.shape[0] * len(positions)
                # All pairs of layers, on the row subset, for the heatmap.
                rows = {layer: store[layer][:, :, subset] for layer in range(num_layers)}
                for (a, b), total in pairwise.items():
                    total += js_sum(rows[b], rows[a], matrix_positions)
                matrix_count += batch.shape[0] * len(subset)
                store.clear()

        js_indexed: list[Optional[float]] = [None]
        js_matched: list[Optional[float]] = [None]
        js_grouped: list[Optional[float]] = [None]
        permutations: list[Optional[list[int]]] = [None]
        js_heads: list[Optional[list[list[float]]]] = [None]
        for layer in range(1, num_layers):
            mean = (adjacent[layer] / adjacent_rows).numpy()
            perm, matched = best_head_matching(mean)
            _, grouped = best_grouped_matching(mean, num_kv_heads)
            js_indexed.append(round_stored(np.trace(mean) / num_heads))
            js_matched.append(round_stored(matched))
            js_grouped.append(round_stored(grouped))
            permutations.append(perm)
            js_heads.append([[round_stored(v) for v in row] for row in mean.tolist()])
        js_layers = [[0.0] * num_layers for _ in range(num_layers)]
        for (a, b), total in pairwise.items():
            _, matched = best_head_matching((total / matrix_count).numpy())
            js_layers[a][b] = js_layers[b][a] = round_stored(matched)

        direct = permuted = calibrated = calibration = None
        base_loss = None
        sens_indices = spread_indices(len(blocks), sensitivity_sequences)
        sens_blocks = blocks[sens_indices]
        if sensitivity:
            direct, permuted, base_loss = layer_sensitivity(model, sens_blocks.to(device), permutations, progress)
        if calibrated_sensitivity:
            # Calibrated on sequences outside the sensitivity batch where there are enough, scored on that batch.
            rest = blocks[[index for index in range(len(blocks)) if index not in sens_indices]]
            pool = rest if len(rest) >= calibration_sequences else blocks
            calibration_ids = pool[spread_indices(len(pool), calibration_sequences)]
            calibrated, base_loss = calibrated_layer_sensitivity(
                model,
                tokenizer,
                calibration_ids,
                sens_blocks.to(device),
                permutations,
                rank=calibration_rank,
                adam_steps=calibration_steps,
                progress=progress,
            )
            calibration = {
                "rank": calibration_rank,
                "sequences": len(calibration_ids),
                "adam_steps": calibration_steps,
            }
    finally:
        model.train(was_training)

    return AttentionAnalysis(
        model_name=str(getattr(model.config, "_name_or_path", "") or model.config.model_type),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        seq_len=seq_len,
        num_sequences=len(blocks),
        num_tokens=int(blocks.numel()),
        query_rows=len(positions),
        matrix_rows=len(matrix_positions),
        js_indexed=js_indexed,
        js_matched=js_matched,
        js_matched_grouped=js_grouped,
        permutations=permutations,
        js_heads=js_heads,
        js_layers=js_layers,
        sensitivity_direct=direct,
        sensitivity_permuted=permuted,
        sensitivity_calibrated=calibrated,
        calibration=calibration,
        base_loss=None if base_loss is None else round_stored(base_loss),
        sensitivity_tokens=int(sens_blocks.numel()) if sensitivity or calibrated_sensitivity else 0,
    )
