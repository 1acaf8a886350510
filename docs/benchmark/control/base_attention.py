"""A control for the benchmark's base: the base model with sdpa attention (what ``peft-lisa bench`` times) against
the same base with eager attention, the same base decoding through the CPU kernel's decode rows, and the merged model
(README, "Speed and memory"; issue 10).

On a CPU without AMX torch's bf16 sdpa of one query row is several times slower than its fp32 one, so a base
decoding in bf16 with eager attention (a matmul, a softmax, a matmul) may be faster than the base the benchmark
compares against; and a merged model decodes every layer through the kernel's rows, its full layers included
(``LiSAFullAttention``), so part of its decode speedup is the kernel's, not LiSA's. Subjects, alternating (order
reversed every other round), ``--repeats`` rounds after a warm-up; in each round a real prefill of ``B x T`` random
ids, then ``--decode-tokens`` greedy steps on the cache it built:

* ``base sdpa``: SmolLM2-135M-Instruct as loaded (``attn_implementation="sdpa"``, transformers' default);
* ``base eager``: a second load with ``attn_implementation="eager"``;
* ``base rows``: a third load, every layer a ``LiSAFullAttention`` (sdpa on prefill, the kernel's decode rows on
  decode steps; ``peft_lisa.benchmark.base_on_decode_rows``), as the merged model's full layers are: what the
  merged model's decode is without sharing;
* ``merged``: an untrained LiSA adapter merged into a fourth load (50% shared, layers from ``docs/analysis``,
  ``head_mixing="full"``), as ``peft-lisa bench`` builds it.

Prints, per point, each subject's prefill and decode speedup over ``base sdpa`` and the merged model's over
``base rows`` (ratios of the median times). Run from the repository root::

    python docs/benchmark/control/base_attention.py --threads 2 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import statistics

import torch
from transformers import AutoModelForCausalLM

from peft_lisa.analysis import AttentionAnalysis
from peft_lisa.benchmark import base_on_decode_rows
from peft_lisa.benchmark.measure import alternating, prefill_then_decode, random_ids
from peft_lisa.benchmark.pipeline import load_benchmark_models

ANALYSIS = "docs/analysis/smollm2_135m_analysis.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    parser.add_argument("--points", default="1x2048,8x2048,8x512", help="comma-separated BxT")
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    cpu = torch.device("cpu")

    analysis = AttentionAnalysis.from_json(ANALYSIS)
    base, merged, path = load_benchmark_models(share_fraction=0.5, analysis=analysis, dtype=dtype, device=cpu)
    eager = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager").eval()
    rows = base_on_decode_rows(AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval())
    subjects = {"base sdpa": base, "base eager": eager, "base rows": rows, "merged": merged}
    print(f"{args.dtype}, {args.threads} thread(s), {args.decode_tokens} decode steps, median of {args.repeats}")
    with torch.inference_mode():
        for point in args.points.split(","):
            batch, context = (int(n) for n in point.split("x"))
            prefill: dict[str, list[float]] = {name: [] for name in subjects}
            decode: dict[str, list[float]] = {name: [] for name in subjects}
            for round_ in range(args.repeats + 1):  # round 0 warms up
                order = alternating(list(subjects), round_)
                ids = random_ids(batch, context, base.config.vocab_size, cpu, seed=round_)
                for name in order:
                    seconds = prefill_then_decode(subjects[name], ids, args.decode_tokens, cpu)
                    if round_:
                        prefill[name].append(seconds[0])
                        decode[name].append(seconds[1])

            def speedup(times: dict[str, list[float]], name: str, over: str = "base sdpa") -> str:
                return f"{statistics.median(times[over]) / statistics.median(times[name]):.2f}x"

            ratios = "; ".join(
                f"{name} prefill {speedup(prefill, name)} decode {speedup(decode, name)}" for name in subjects
            )
            print(
                f"{batch} x {context}: {ratios}; merged over base rows: prefill "
                f"{speedup(prefill, 'merged', 'base rows')} decode {speedup(decode, 'merged', 'base rows')}",
                flush=True,
            )


if __name__ == "__main__":
    main()
