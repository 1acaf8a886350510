"""A shared layer's explicit blocks with their large products as a loop of ``mm`` (the library's choice for a small
batch of large matrices, ``MM_LOOP_MAX_BATCH_PER_THREAD``) or as one ``bmm``, measured on the *Zen 4* machine.

Default: one layer's attention core (SmolLM2 shapes, link 1 of a chain, ``head_mixing="full"``, random tensors),
the base's sdpa against the explicit blocks both ways, subjects alternating, medians; run it in several processes,
since the loop of ``mm`` runs at one of two speeds at a time on that machine (``states_over_time.py``)::

    for i in 1 2 3 4 5 6; do python docs/benchmark/zen4/mm_loop_or_bmm.py --batch 8; done

With ``--prefill``: whole prefills of SmolLM2-135M-Instruct and its merged copy (50% shared), the merged model with
the loop for products of up to 4 matrices per thread (the library's setting), up to 2 (``bmm`` for 6 matrices,
the blocks of two 2048-token sequences) and none (``bmm`` for every product, the three matrices of one sequence
included)::

    python docs/benchmark/zen4/mm_loop_or_bmm.py --prefill --batch 4 --repeats 3

With ``--products``: the three large products of one layer's explicit blocks over one sequence, each timed alone
over the 2048-token prefill's 32 blocks of 64 queries (the keys each block reads grow by 64): the scores
(three ``mm`` of 192 x 64 @ 64 x keys), the head mixing ``P`` (9 x 9 @ 9 x 64 keys, from the scores' buffer into a
second one, as the library's blocks run it) and ``A V`` (three ``mm`` of
192 x keys @ keys x 64). Run it in several processes::

    for i in 1 2 3 4 5 6; do python docs/benchmark/zen4/mm_loop_or_bmm.py --products; done
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

import peft_lisa.tuner.functional as lisa_functional

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "examples"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "prefill_variants"))
from attention_core import HEAD_DIM, HEADS, KV_HEADS, base_attention, shared_layer_logits  # noqa: E402
from chunked_prefill import (  # noqa: E402
    alternating_times,
    compare_prefills,
    prefill_call,
    prefill_header,
    smollm2_models,
    with_setting,
)


def attention_core(batch: int, tokens: int, repeats: int) -> None:
    """Print the medians of sdpa, the explicit blocks with the loop of ``mm`` and with ``bmm``."""
    value = torch.randn(batch, KV_HEADS, tokens, HEAD_DIM)
    logits = shared_layer_logits(batch, tokens, None, 1)
    explicit = lambda: logits().attend_by_blocks(None, value)  # noqa: E731
    subjects = {
        "sdpa": base_attention(batch, tokens),
        "explicit, loop of mm": explicit,
        "explicit, bmm": with_setting(explicit, lisa_functional, "MM_LOOP_MIN_WORK", 2**62),
    }
    with torch.no_grad():
        for fn in subjects.values():
            fn()  # warm-up
        times = alternating_times(subjects, repeats)
    print(" | ".join(f"{name} {statistics.median(values) * 1e3:.0f} ms" for name, values in times.items()))


def block_product_subjects(tokens: int, block: int = 64) -> dict[str, Callable[[], None]]:
    """The scores, mixing and ``A V`` products of one sequence's explicit blocks (each over all its blocks), on random
    tensors."""
    groups, rows = KV_HEADS, (HEADS // KV_HEADS) * block  # per KV head: its query heads' block rows stacked
    query, key = torch.randn(groups, rows, HEAD_DIM), torch.randn(groups, tokens, HEAD_DIM)
    probs, value = torch.randn(groups, rows, tokens), torch.randn(groups, tokens, HEAD_DIM)
    mix, output = torch.randn(HEADS, HEADS), torch.empty(groups, rows, HEAD_DIM)
    scores_buffer, logits_buffer = torch.empty(HEADS * block * tokens), torch.empty(HEADS * block * tokens)
    stops = range(block, tokens + 1, block)  # the keys block i reads (causal)

    def scores() -> None:
        for stop in stops:
            out = scores_buffer[: HEADS * block * stop].view(groups, rows, stop)
            for group in range(groups):
                torch.mm(query[group], key[group, :stop].t(), out=out[group])  # keys as cached, transposed

    def mixing() -> None:
        for stop in stops:
            flat = scores_buffer[: HEADS * block * stop].view(HEADS, block * stop)
            torch.mm(mix, flat, out=logits_buffer[: HEADS * block * stop].view(HEADS, block * stop))

    def attend() -> None:
        for stop in stops:
            for group in range(groups):
                torch.mm(probs[group, :, :stop], value[group, :stop], out=output[group])

    return {"scores": scores, "mixing P": mixing, "A V": attend}


def block_products(tokens: int, repeats: int) -> None:
    """Print the medians of the scores, mixing and ``A V`` products of one sequence's explicit blocks, each alone."""
    subjects = block_product_subjects(tokens)
    for fn in subjects.values():
        fn()  # warm-up
    times = alternating_times(subjects, repeats)
    print(" | ".join(f"{name} {statistics.median(values) * 1e3:.1f} ms" for name, values in times.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prefill", action="store_true")
    parser.add_argument("--products", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.products:
        block_products(args.tokens, max(args.repeats, 7))
        return
    if not args.prefill:
        attention_core(args.batch, args.tokens, args.repeats)
        return
    base, merged, ids = smollm2_models(torch.float32, args.batch, args.tokens)
    subjects = {
        "base": prefill_call(base, ids),
        "merged, loop up to 4 matrices per thread (the library)": prefill_call(merged, ids),
        "merged, loop up to 2 per thread": with_setting(
            prefill_call(merged, ids), lisa_functional, "MM_LOOP_MAX_BATCH_PER_THREAD", 2
        ),
        "merged, bmm for every product": with_setting(
            prefill_call(merged, ids), lisa_functional, "MM_LOOP_MIN_WORK", 2**62
        ),
    }
    compare_prefills(subjects, args.repeats, prefill_header(args.batch, args.tokens, "float32", args.repeats))


if __name__ == "__main__":
    main()
