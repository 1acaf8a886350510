"""A shared layer's explicit blocks with their large products as a loop of ``mm`` (the library's choice for a small
batch of large matrices, ``MM_LOOP_MAX_BATCH_PER_THREAD``) or as one ``bmm``, measured on the *Zen 4* machine.

Default: one layer's attention core (SmolLM2 shapes, link 1 of a chain, ``head_mixing="full"``, random tensors),
the base's sdpa against the explicit blocks both ways, subjects alternating, medians; run it in several processes,
since the loop of ``mm`` runs in one of two speeds for the life of a process on that machine::

    for i in 1 2 3 4 5 6; do python docs/benchmark/zen4/mm_loop_or_bmm.py --batch 8; done

With ``--prefill``: whole prefills of SmolLM2-135M-Instruct and its merged copy (50% shared), the merged model with
the loop for products of up to 4 matrices per thread (the library's setting) and up to 2 (``bmm`` for 6 matrices,
the blocks of two 2048-token sequences)::

    python docs/benchmark/zen4/mm_loop_or_bmm.py --prefill --batch 4 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import peft_lisa.tuner.functional as lisa_functional

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "examples"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "prefill_variants"))
from attention_core import HEAD_DIM, HEADS, KV_HEADS, shared_layer_logits  # noqa: E402
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
    query = torch.randn(batch, HEADS, tokens, HEAD_DIM)
    key, value = torch.randn(batch, KV_HEADS, tokens, HEAD_DIM), torch.randn(batch, KV_HEADS, tokens, HEAD_DIM)
    logits = shared_layer_logits(batch, tokens, None, 1)
    explicit = lambda: logits().attend_by_blocks(None, value)  # noqa: E731
    subjects = {
        "sdpa": lambda: F.scaled_dot_product_attention(query, key, value, is_causal=True, enable_gqa=True),
        "explicit, loop of mm": explicit,
        "explicit, bmm": with_setting(explicit, lisa_functional, "MM_LOOP_MIN_WORK", 2**62),
    }
    with torch.no_grad():
        for fn in subjects.values():
            fn()  # warm-up
        times = alternating_times(subjects, repeats)
    print(" | ".join(f"{name} {statistics.median(values) * 1e3:.0f} ms" for name, values in times.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prefill", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
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
    }
    compare_prefills(subjects, args.repeats, prefill_header(args.batch, args.tokens, "float32", args.repeats))


if __name__ == "__main__":
    main()
