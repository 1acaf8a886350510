"""Short prefills with a chain's logits handed on whole, measured in one process (``docs/method.md``, "Short inputs").

A prefill of ``--batch`` x ``--tokens`` random ids (one forward, the cache built, the last token's logits, as the
benchmark times it). Subjects, alternating, ``--repeats`` rounds after a warm-up each:

* ``base``: SmolLM2-135M-Instruct;
* ``merged``: an untrained LiSA adapter merged (50% shared, layers from ``docs/analysis``, ``head_mixing="full"``),
  as the library runs it: a shared layer that attends to at most ``HANDED_LOGITS_MAX_KEYS`` keys computes its
  B x H x T x T float32 logits at once and hands them on, so the next link mixes them;
* ``merged, chain recomputed by blocks``: the same model with ``HANDED_LOGITS_MAX_KEYS = 0``, the path of every
  longer prefill: each link recomputes its source's logits and every earlier link's rank-r term, a block of queries
  at a time.

``--max-keys`` sets the bound for ``merged`` (to try bounds other than the library's). Prints each model's peak
tensor bytes (one untimed prefill, ``TensorPeak``) and the largest difference of the two
merged runs' logits, then the times and the ratio base / subject (median of the per-round ratios; timing and table
shared with ``chunked_prefill.py``). Run from the repository root::

    python docs/benchmark/prefill_variants/handed_logits.py --threads 2 --tokens 128 --dtype bfloat16
"""

from __future__ import annotations

import argparse

import torch
from chunked_prefill import (  # this folder's (run as a script)
    compare_prefills,
    prefill_call,
    prefill_header,
    smollm2_models,
    with_setting,
)

import peft_lisa.tuner.attention as lisa_attention
from peft_lisa.benchmark.measure import TensorPeak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument(
        "--max-keys",
        type=int,
        default=lisa_attention.HANDED_LOGITS_MAX_KEYS,
        help="HANDED_LOGITS_MAX_KEYS for the subject 'merged' (default: the library's): try other bounds",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base, merged, ids = smollm2_models(getattr(torch, args.dtype), args.batch, args.tokens)
    subjects = {
        "base": prefill_call(base, ids),
        "merged": with_setting(prefill_call(merged, ids), lisa_attention, "HANDED_LOGITS_MAX_KEYS", args.max_keys),
        "merged, chain recomputed by blocks": with_setting(
            prefill_call(merged, ids), lisa_attention, "HANDED_LOGITS_MAX_KEYS", 0
        ),
    }
    logits = {}
    with torch.no_grad():
        for name, fn in subjects.items():
            fn()  # warm-up, so that the peak counts one prefill's tensors alone
            with TensorPeak(torch.device("cpu")) as peak:
                logits[name] = fn().float()
            print(f"{name}: peak tensors {peak.peak / 2**20:.2f} MiB")
    difference = (logits["merged"] - logits["merged, chain recomputed by blocks"]).abs().max().item()
    print(f"largest difference of the two merged runs' last logits: {difference:.2e}")
    header = prefill_header(args.batch, args.tokens, args.dtype, args.repeats)
    compare_prefills(subjects, args.repeats, f"\n{header}; merged: HANDED_LOGITS_MAX_KEYS = {args.max_keys}")


if __name__ == "__main__":
    main()
