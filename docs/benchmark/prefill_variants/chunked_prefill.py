"""Chunked prefill, measured once and not adopted (``docs/benchmark/README.md``; issue 10's "ways to try").

A long prompt prefilled in query chunks of ``--chunk`` tokens through the cache, as ``generate`` does with
``GenerationConfig(prefill_chunk_size=...)``. Subjects, alternating, ``--repeats`` rounds, medians:

* ``base``: SmolLM2-135M-Instruct, one forward over the prompt (what the benchmark times);
* ``base, chunked``: the same model, chunk by chunk;
* ``merged``: an untrained LiSA adapter merged (50% shared, layers from ``docs/analysis``, ``head_mixing="full"``),
  one forward;
* ``merged, chunked``: chunk by chunk, each chunk through today's prefill path (a chain recomputes its source's
  logits per block);
* ``merged, chunked, logits handed on``: chunk by chunk, with the decode path's routing for every chunk (a full
  layer computes its chunk's logits once and hands them on, each shared layer mixes the logits it gets: no chain is
  recomputed; ``EXPLICIT_SOURCE_MAX_QUERIES`` raised to the chunk size).

Prints the last-position logits' largest difference from the one-forward run of the same model, then the times and
the ratio base / subject (median of the per-round ratios). Run from the repository root::

    taskset -c 0 python docs/benchmark/prefill_variants/chunked_prefill.py --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from types import ModuleType

import torch
from transformers import DynamicCache

import peft_lisa.tuner.attention as lisa_attention
from peft_lisa.analysis import AttentionAnalysis
from peft_lisa.benchmark import untrained_merged
from peft_lisa.benchmark.measure import alternating, random_ids
from peft_lisa.resources import load_model_and_tokenizer


def alternating_times(subjects: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Seconds of each subject in each of ``repeats`` rounds, the subjects alternating (in reverse order every other
    round). The caller warms them up first."""
    times: dict[str, list[float]] = {name: [] for name in subjects}
    for round_index in range(repeats):
        for name in alternating(list(subjects), round_index):
            start = time.perf_counter()
            subjects[name]()
            times[name].append(time.perf_counter() - start)
    return times


def print_ratio_table(times: dict[str, list[float]]) -> None:
    """Each subject's median milliseconds and the median of its per-round ratios ``base / subject``."""
    print("| subject | ms | base / subject |\n|---|---:|---:|")
    for name, values in times.items():
        ratio = statistics.median(b / t for b, t in zip(times["base"], values, strict=True))
        print(f"| {name} | {statistics.median(values) * 1e3:.0f} | {ratio:.2f}x |")


def prefill_call(model: torch.nn.Module, ids: torch.Tensor) -> Callable[[], torch.Tensor]:
    """One prefill of ``ids`` as the benchmark times it: one forward, the cache built, the last token's logits."""
    return lambda: model(input_ids=ids, use_cache=True, logits_to_keep=1).logits


def with_setting(fn: Callable[[], object], module: ModuleType, name: str, value: object) -> Callable[[], object]:
    """``fn`` run with ``module``'s ``name`` (a library setting) set to ``value``, restored afterwards."""

    def run() -> object:
        default = getattr(module, name)
        setattr(module, name, value)
        try:
            return fn()
        finally:
            setattr(module, name, default)

    return run


def smollm2_models(
    dtype: torch.dtype, batch: int, tokens: int
) -> tuple[torch.nn.Module, torch.nn.Module, torch.Tensor]:
    """The subjects of this folder's comparisons: SmolLM2-135M-Instruct in ``dtype``, a copy with an untrained LiSA
    adapter merged (50% shared, layers from ``docs/analysis``, ``head_mixing="full"``), and ``batch`` x ``tokens``
    random ids (the benchmark's seeded draw)."""
    base, _ = load_model_and_tokenizer(None)
    base = base.to(dtype).eval()
    analysis = AttentionAnalysis.from_json("docs/analysis/smollm2_135m_analysis.json")
    merged = untrained_merged(base, None, 0.5, analysis, 8, 0, "full").eval()
    return base, merged, random_ids(batch, tokens, base.config.vocab_size, torch.device("cpu"), seed=0)


def prefill_header(batch: int, tokens: int, dtype: str, repeats: int) -> str:
    """The line above a ratio table: the prefill's shape, dtype, threads and repetitions."""
    return f"prefill of {batch} x {tokens} tokens, {dtype}, {torch.get_num_threads()} thread(s), median of {repeats}"


def compare_prefills(subjects: dict[str, Callable[[], object]], repeats: int, header: str) -> None:
    """Warm each subject up once, time them alternating (:func:`alternating_times`), print ``header`` and the
    ratio table (:func:`print_ratio_table`)."""
    with torch.no_grad():
        for fn in subjects.values():
            fn()  # warm-up
        times = alternating_times(subjects, repeats)
    print(header)
    print_ratio_table(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base, merged, ids = smollm2_models(torch.float32, args.batch, args.tokens)

    def chunked(model: torch.nn.Module, hand_on: bool = False) -> torch.Tensor:
        default = lisa_attention.EXPLICIT_SOURCE_MAX_QUERIES
        lisa_attention.EXPLICIT_SOURCE_MAX_QUERIES = args.chunk if hand_on else default
        try:
            cache = DynamicCache(config=model.config)
            for start in range(0, args.tokens, args.chunk):
                chunk = ids[:, start : start + args.chunk]
                out = model(input_ids=chunk, cache=cache, use_cache=True, logits_to_keep=1)
                cache = out.cache
            return out.logits
        finally:
            lisa_attention.EXPLICIT_SOURCE_MAX_QUERIES = default

    subjects = {
        "base": prefill_call(base, ids),
        "base, chunked": lambda: chunked(base),
        "merged": prefill_call(merged, ids),
        "merged, chunked": lambda: chunked(merged),
        "merged, chunked, logits handed on": lambda: chunked(merged, hand_on=True),
    }
    with torch.no_grad():
        first = {name: fn() for name, fn in subjects.items()}  # warm-up
        for name in subjects:
            reference = first["base" if name.startswith("base") else "merged"]
            print(f"{name}: largest logit difference from one forward {(first[name] - reference).abs().max():.2e}")
        times = alternating_times(subjects, args.repeats)
    print(
        f"\nprefill of {args.batch} x {args.tokens} tokens, chunks of {args.chunk}, {torch.get_num_threads()} "
        f"thread(s), median of {args.repeats}"
    )
    print_ratio_table(times)


if __name__ == "__main__":
    main()
