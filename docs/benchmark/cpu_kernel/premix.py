"""Where to mix a shared layer's handed logits on a decode step: inside the CPU kernel's decode rows, or by one matrix
product before the call (``cpu_kernel.PREMIX_MIN_MULTIPLY_ADDS``; ``docs/method.md``, "Decoding").

One call of :func:`peft_lisa.tuner.cpu_kernel.decode_rows` as a shared layer makes it (handed source rows mixed by
``P``, a rank-8 term, ``A V``) on random tensors, for several head layouts, batches and cached lengths, each way in
turn (order alternating), against caches cycled through as many as 600 MB hold (read from memory, as a whole model's
decode step reads each layer's cache). Prints the median milliseconds of each way, their ratio, and the mixing's
multiply-adds, against the threshold.

    python docs/benchmark/cpu_kernel/premix.py --threads 2 > docs/benchmark/cpu_kernel/zen5/premix_2threads.txt
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from peft_lisa.tuner import cpu_kernel

COLD_BYTES = 600 * 2**20
# (name, query heads, KV heads, head size): SmolLM2-135M, Qwen2-0.5B, SmolLM2-360M, Llama-3-8B / Mistral-7B, LLaMA-2-7B
LAYOUTS = [
    ("SmolLM2-135M", 9, 3, 64),
    ("Qwen2-0.5B", 14, 2, 64),
    ("SmolLM2-360M", 15, 5, 64),
    ("Llama-3-8B", 32, 8, 128),
    ("LLaMA-2-7B", 32, 32, 128),
]
POINTS = [(1, 512), (8, 512), (1, 2048), (8, 2048), (1, 4096), (8, 4096)]
RANK = 8


def time_both(heads: int, kv_heads: int, head_dim: int, batch: int, keys: int, repeats: int) -> tuple[float, float]:
    """Median seconds of one decode-rows call mixing inside the kernel and mixing before it."""
    kernel = cpu_kernel.load_cpu_kernel()
    copies = max(2, min(40, COLD_BYTES // (batch * kv_heads * keys * (head_dim + RANK) * 2) + 1))
    values = [torch.randn(batch, kv_heads, keys, head_dim, dtype=torch.bfloat16) for _ in range(copies)]
    rank_keys = [torch.randn(batch, kv_heads, keys, RANK, dtype=torch.bfloat16) for _ in range(copies)]
    handed = [torch.randn(batch, heads, 1, keys) for _ in range(copies)]
    mix, query = torch.randn(heads, heads), torch.randn(batch, heads, 1, RANK)

    def call(i: int, threshold: int) -> None:
        cpu_kernel.PREMIX_MIN_MULTIPLY_ADDS = threshold
        cpu_kernel.decode_rows(kernel, query, rank_keys[i], values[i], None, handed=handed[i], mix=mix, hand_on=False)

    ways = {"inside": 2**62, "before": 0}
    times: dict[str, list[float]] = {way: [] for way in ways}
    for repeat in range(repeats + 1):  # the first is a warm-up
        for way in ways if repeat % 2 == 0 else list(ways)[::-1]:
            start = time.perf_counter()
            call(repeat % copies, ways[way])
            if repeat:
                times[way].append(time.perf_counter() - start)
    return statistics.median(times["inside"]), statistics.median(times["before"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    threshold = cpu_kernel.PREMIX_MIN_MULTIPLY_ADDS
    print(f"bf16 values, {args.threads} thread(s), medians of {args.repeats}; threshold {threshold:,} multiply-adds")
    columns = ("layout (H / H_kv x d)", "B x T_k", "mixing multiply-adds", "inside ms", "before ms", "inside / before")
    header = "| " + " | ".join((*columns, "taken")) + " |"
    print(header)
    print("|---|---|---:|---:|---:|---:|---|")
    with torch.inference_mode():
        for name, heads, kv_heads, head_dim in LAYOUTS:
            for batch, keys in POINTS:
                inside, before = time_both(heads, kv_heads, head_dim, batch, keys, args.repeats)
                work = batch * heads * heads * keys
                print(
                    f"| {name} ({heads} / {kv_heads} x {head_dim}) | {batch} x {keys} | {work:,} | {inside * 1e3:.3f} "
                    f"| {before * 1e3:.3f} | {inside / before:.2f}x | {'before' if work >= threshold else 'inside'} |",
                    flush=True,
                )
    cpu_kernel.PREMIX_MIN_MULTIPLY_ADDS = threshold


if __name__ == "__main__":
    main()
