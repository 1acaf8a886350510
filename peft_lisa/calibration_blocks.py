"""The token blocks :func:`peft_lisa.calibrate` fits on: texts cut into blocks, blocks given as a tensor, equal shares
of several sources (:func:`mixed_token_blocks`), and blocks of repeated random-token runs (:func:`copy_run_blocks`)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Optional

import torch


def token_blocks(tokenizer: Any, texts: Iterable[str], seq_len: int, num_sequences: int) -> torch.LongTensor:
    """The first ``num_sequences`` blocks of ``seq_len`` tokens of the texts, joined by EOS; reads only as many texts
    as it needs."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    needed = num_sequences * seq_len
    for text in texts:
        if not text or not text.strip():
            continue
        if stream and eos is not None:
            stream.append(eos)
        stream.extend(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
        if len(stream) >= needed:
            break
    blocks = min(len(stream) // seq_len, num_sequences)
    if blocks == 0:
        raise ValueError(
            f"calibrate() got {len(stream)} tokens, fewer than one sequence of seq_len={seq_len}; give it more text "
            "or a smaller seq_len."
        )
    return torch.tensor(stream[: blocks * seq_len], dtype=torch.long).view(blocks, seq_len)


def mixed_token_blocks(
    tokenizer: Any,
    sources: Sequence[Iterable[str]],
    num_sequences: int,
    seq_len: int,
    *,
    names: Optional[Sequence[str]] = None,
) -> torch.LongTensor:
    """Calibration blocks from several text sources in equal shares: ``num_sequences`` blocks of ``seq_len`` tokens,
    the first blocks of each source (its texts joined by EOS, read only as far as needed), interleaved source by
    source. The first sources take one block more when ``num_sequences`` does not divide evenly. Pass the result to
    :func:`calibrate` (or as ``LiSATrainer(calibration_texts=...)``) to fit the adapter on every domain it will serve:
    a shared layer calibrated on one domain's text matches its base layer on that domain and much less on others
    (``docs/calibration/domain.md``). ``names`` (default: "source 1 of N", ...) name the sources in errors.

    Raises:
        TypeError: a source is one string, not an iterable of texts.
        ValueError: no sources, more sources than sequences, ``seq_len < 2``, or a source too short for its share.
    """
    if not sources:
        raise ValueError("mixed_token_blocks() got no sources: give a list of text iterables, [texts_a, texts_b].")
    names = list(names) if names is not None else [f"source {i} of {len(sources)}" for i in range(1, len(sources) + 1)]
    for name, texts in zip(names, sources, strict=True):
        if isinstance(texts, (str, bytes)):
            raise TypeError(f"calibration {name} is one string; each source is an iterable of texts: [texts_a, ...].")
    if num_sequences < len(sources):
        raise ValueError(
            f"{len(sources)} calibration sources need at least as many sequences, got {num_sequences}: ask for more "
            "sequences or give fewer sources."
        )
    if seq_len < 2:
        raise ValueError(f"mixed_token_blocks() needs seq_len >= 2, got {seq_len}.")
    shares = [num_sequences // len(sources) + (i < num_sequences % len(sources)) for i in range(len(sources))]
    parts = []
    for name, texts, share in zip(names, sources, shares, strict=True):
        try:
            part = token_blocks(tokenizer, texts, seq_len, share)
        except ValueError:  # not one block
            part = torch.empty(0, seq_len, dtype=torch.long)
        if len(part) < share:
            raise ValueError(
                f"calibration {name} gives {len(part)} of the {share} blocks of {seq_len} tokens its equal share "
                "needs: give it more text, or ask for fewer sequences or shorter ones."
            )
        parts.append(part)
    rows = [part[i] for i in range(max(shares)) for part in parts if i < len(part)]  # source by source
    return torch.stack(rows)


def given_blocks(ids: torch.Tensor) -> torch.LongTensor:
    """Token blocks given to :func:`calibrate` as a tensor, checked: ``num_blocks x block_len`` integers."""
    if ids.dim() != 2 or ids.shape[0] < 1 or ids.shape[1] < 2 or ids.is_floating_point() or ids.is_complex():
        raise ValueError(
            f"calibrate() got a tensor of shape {tuple(ids.shape)} and dtype {ids.dtype} as texts; token blocks must "
            "be an integer tensor num_blocks x block_len (block_len >= 2), or pass the texts as strings."
        )
    return ids.long()


def copy_run_blocks(
    num_blocks: int,
    block_len: int,
    vocab_size: int,
    generator: torch.Generator,
    run_lengths: tuple[int, int] = (16, 96),
) -> torch.LongTensor:
    """``num_blocks x block_len`` token ids, each block runs of random tokens each followed by its repeat, the run
    lengths drawn from ``run_lengths`` (inclusive; the last pair cut to fit), the tokens from ids
    ``min(100, vocab_size // 4)`` up (past the special tokens most vocabularies start with).

    Calibrating on such blocks as well as on text keeps more of the base model's in-context copying
    (``docs/calibration/copying.md``); varied lengths make a shared layer match on content rather than learn one
    distance."""
    low = min(100, vocab_size // 4)
    blocks = []
    for _ in range(num_blocks):
        parts, filled = [], 0
        while filled < block_len:
            length = int(torch.randint(run_lengths[0], run_lengths[1] + 1, (1,), generator=generator))
            run = torch.randint(low, vocab_size, (length,), generator=generator)
            parts += [run, run]
            filled += 2 * length
        blocks.append(torch.cat(parts)[:block_len])
    return torch.stack(blocks)


def with_copy_blocks(ids: torch.Tensor, copy_blocks: int, vocab_size: int, seed: int) -> torch.LongTensor:
    """``ids`` with ``copy_blocks`` blocks of :func:`copy_run_blocks` shuffled in (a fixed ``seed``)."""
    generator = torch.Generator().manual_seed(seed)
    blocks = torch.cat([ids, copy_run_blocks(copy_blocks, ids.shape[1], vocab_size, generator)])
    return blocks[torch.randperm(len(blocks), generator=generator)]
