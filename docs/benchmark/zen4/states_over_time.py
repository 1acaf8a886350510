"""The two speeds of the explicit blocks' scores product on the *Zen 4* machine, followed over time in one process.

Three subjects run one after the other, again and again, for ``--seconds``; the script prints, per subject, the
median milliseconds of each of ``--windows`` consecutive time windows:

* ``scores``: one layer's scores products over a 2048-token prefill (SmolLM2 shapes: per block of 64 queries, three
  ``mm`` of 192 x 64 against the transposed cached keys the block sees, 32 blocks), the workload of
  ``mm_loop_or_bmm.py --products``;
* ``sdpa``: the base layer's whole attention core over the same 2048 tokens (one causal
  ``scaled_dot_product_attention`` call, 9 query heads, 3 KV heads of 64);
* ``linear``: a large matrix product of the same process, 2048 tokens through an MLP projection (576 -> 1536).

If the slow speed belonged to a process, a row would stay at one level; it changes within a row instead. Run from the
repository root::

    python docs/benchmark/zen4/states_over_time.py --seconds 90
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from mm_loop_or_bmm import base_attention, block_product_subjects  # this folder (on sys.path as a script)

HIDDEN, INTERMEDIATE = 576, 1536  # SmolLM2-135M's hidden and MLP sizes


def subjects(tokens: int) -> dict[str, Callable[[], object]]:
    """The three workloads above, on random tensors."""
    hidden, weight = torch.randn(tokens, HIDDEN), torch.randn(INTERMEDIATE, HIDDEN)
    return {
        "scores": block_product_subjects(tokens)["scores"],
        "sdpa": base_attention(1, tokens),
        "linear": lambda: F.linear(hidden, weight),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=90.0)
    parser.add_argument("--windows", type=int, default=30)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    workloads = subjects(args.tokens)
    times: dict[str, list[float]] = {name: [] for name in workloads}
    with torch.no_grad():
        for fn in workloads.values():
            fn()  # warm-up
        start = time.perf_counter()
        while time.perf_counter() - start < args.seconds:
            for name, fn in workloads.items():
                begin = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - begin) * 1e3)
    rounds = len(times["scores"])
    width = max(1, rounds // args.windows)
    print(
        f"{args.tokens} tokens, {args.threads} thread(s), {rounds} rounds in {args.seconds:.0f} s; median ms per "
        f"window of {width} rounds"
    )
    for name, values in times.items():
        windows = (statistics.median(values[i : i + width]) for i in range(0, rounds, width))
        print(f"{name:7s}" + "".join(f"{value:5.0f}" for value in windows))


if __name__ == "__main__":
    main()
