"""A control for the benchmark's small ratios: identical models timed against each other (README, "Speed and
memory"; issue 10).

Subjects, alternating (order reversed every other round), ``--repeats`` rounds after a warm-up each; in each round a
real prefill of ``--batch`` x ``--tokens`` random ids, then ``--decode-tokens`` greedy steps on the cache it built:

* ``base``: SmolLM2-135M-Instruct as loaded;
* ``base, loaded again``: a second ``from_pretrained`` of the same files;
* ``base, deep copy``: ``copy.deepcopy`` of the first, as the benchmark built its merged model before merging;
* ``merged, from a deep copy``: an untrained LiSA adapter merged into a deep copy (50% shared, layers from
  ``docs/analysis``, ``head_mixing="full"``), as ``peft-lisa bench`` ran it until December 7;
* ``merged, from a second load``: the same adapter merged into a third load of the files, as it runs it now.

The three copies of the base run the same computation on the same weights, so their ratios to ``base`` measure
what placement in memory and the order of runs alone do to a point of the grid. Prints the medians and, for each
subject, the median and range of its per-round ratio ``base time / subject time``. Run from the repository root::

    taskset -c 0 python docs/benchmark/control/identical_models.py --threads 1 --batch 1 --tokens 128
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch

from peft_lisa.analysis import AttentionAnalysis
from peft_lisa.benchmark import untrained_merged
from peft_lisa.benchmark.measure import alternating, prefill_then_decode, random_ids
from peft_lisa.resources import load_model_and_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base, _ = load_model_and_tokenizer(None)
    again, _ = load_model_and_tokenizer(None)
    analysis = AttentionAnalysis.from_json("docs/analysis/smollm2_135m_analysis.json")
    subjects = {
        "base": base.eval(),
        "base, loaded again": again.eval(),
        "base, deep copy": copy.deepcopy(base).eval(),
        "merged, from a deep copy": untrained_merged(base, None, 0.5, analysis, 8, 0, "full").eval(),
        "merged, from a second load": untrained_merged(
            load_model_and_tokenizer(None)[0], None, 0.5, analysis, 8, 0, "full", in_place=True
        ).eval(),
    }
    dtype = getattr(torch, args.dtype)
    subjects = {name: model.to(dtype) for name, model in subjects.items()}  # converted after the merge
    cpu = torch.device("cpu")
    ids = random_ids(args.batch, args.tokens, base.config.vocab_size, cpu, seed=0)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in subjects}  # prefill s, decode s per step
    with torch.no_grad():
        for model in subjects.values():
            prefill_then_decode(model, ids, 2, cpu)  # warm-up
        for round_index in range(args.repeats):
            names = alternating(list(subjects), round_index)
            for name in names:
                prefill, decode, _ = prefill_then_decode(subjects[name], ids, args.decode_tokens, cpu)
                times[name].append((prefill, decode / args.decode_tokens))
    print(
        f"{args.batch} x {args.tokens} tokens, then {args.decode_tokens} decode steps, {args.dtype}, "
        f"{torch.get_num_threads()} thread(s), {args.repeats} rounds"
    )
    print("| subject | prefill ms | base / subject: median (range) | decode ms/step | base / subject |")
    print("|---|---:|---:|---:|---:|")
    for name, runs in times.items():
        cells = []
        for phase in (0, 1):
            ratios = [ref[phase] / run[phase] for ref, run in zip(times["base"], runs, strict=True)]
            median_ms = statistics.median(run[phase] for run in runs) * 1e3
            cells += [f"{median_ms:.1f}", f"{statistics.median(ratios):.3f}x ({min(ratios):.3f}-{max(ratios):.3f})"]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
