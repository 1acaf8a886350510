"""Sampling for the analysis: token blocks from texts, and evenly spread choices of blocks and query rows (the
analysis's "calibration data"; the layer-wise fit of LiSA modules is ``peft_lisa.calibration``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Union

import torch

from ..data import chunk_token_ids


def spread_indices(total: int, count: int) -> list[int]:
    """``count`` indices evenly spread over ``range(total)``, both ends included (all when ``count >= total``)."""
    if count >= total:
        return list(range(total))
    return sorted({round(i * (total - 1) / max(count - 1, 1)) for i in range(count)})


def stratum_middles(total: int, count: int) -> list[int]:
    """The middle index of each of ``count`` equal strata of ``range(total)`` (all when ``count >= total``).

    A mean over these indices estimates the mean over all of them without over-weighting the ends (query row 1, with
    its two keys, has a near-zero divergence and would weigh ``1/count`` instead of ``1/total`` as an end point).
    """
    if count >= total:
        return list(range(total))
    return sorted({int((i + 0.5) * total / count) for i in range(count)})


def calibration_blocks(
    tokenizer: Any, texts: Union[str, Sequence[str]], seq_len: int, max_blocks: int
) -> torch.Tensor:
    """Token blocks for the analysis: ``[N, seq_len]`` with ``N <= max_blocks``.

    Empty and whitespace-only texts (and ``None``) are skipped; the others are joined with EOS by
    :func:`peft_lisa.data.chunk_token_ids`, so very short texts simply join the stream. When the stream gives
    more than ``max_blocks`` blocks, blocks evenly spread over it are taken, so the calibration covers the whole text
    collection rather than its first documents. Raises ``ValueError`` if no full block remains.
    """
    if isinstance(texts, str):
        texts = [texts]
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an integer >= 2 (a query needs a previous key), got {seq_len!r}.")
    usable = [text for text in texts if isinstance(text, str) and text.strip()]
    if not usable:
        raise ValueError(
            f"No usable calibration text: all {len(texts)} texts are empty or whitespace. Pass documents, e.g. "
            "peft_lisa.data.load_texts(split='train')."
        )
    try:
        blocks = chunk_token_ids(tokenizer, usable, seq_len)
    except ValueError as error:
        raise ValueError(
            f"The calibration texts are too short for one block of seq_len={seq_len} tokens ({error}). Pass more or "
            "longer texts, or a smaller seq_len."
        ) from error
    return blocks[spread_indices(len(blocks), max_blocks)]
