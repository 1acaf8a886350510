"""One decode-rows call of the CPU kernel (``peft_lisa/tuner/csrc/decode_rows.h``) built from an earlier revision
against the same call built from the working tree, side by side in one process (README, "Speed and memory";
``docs/benchmark/cpu_kernel/README.md``).

Both builds take the kernel's flags (``cpu_kernel.COMPILE_FLAGS``: ``-march=native``); the earlier one compiles the
``csrc`` files ``git show`` gives for ``--against``. Per shape, the two calls of a source layer (``q k^T`` over the
cached keys, then ``A V``) and of a shared layer (the handed rows mixed by ``P``, its rank-8 term, then ``A V``)
alternate, the order reversed every other round, after a warm-up; the script checks that both builds give the same
outputs and handed-on logits, then prints the median time of each and the ratio (earlier / now), with the bytes a
call reads per second. Random tensors; one query row a sequence (a decode step); a shared layer's rank-r keys cached
per KV head, as a merged model caches them. Run from the repository root::

    python docs/benchmark/cpu_kernel/decode_rows_versions.py --against 8224d25 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils import cpp_extension

from peft_lisa.benchmark.measure import alternating
from peft_lisa.tuner.cpu_kernel import COMPILE_FLAGS, SOURCE

# batch, query heads, KV heads, head size, keys, dtype: the 7B geometries at 8 x 4096 (LLaMA-2-7B without GQA,
# Llama-3-8B and Mistral-7B with 8 KV heads) and SmolLM2-135M's layers (9 heads, 3 KV heads) at 128-2048 keys.
SHAPES = {
    "7b": [(8, 32, 32, 128, 4096, "bfloat16"), (8, 32, 8, 128, 4096, "bfloat16")],
    "smollm2": [
        (batch, 9, 3, 64, keys, dtype)
        for dtype in ("float32", "bfloat16")
        for batch, keys in ((1, 2048), (8, 2048), (8, 512), (1, 128))
    ],
}
RANK = 8


def build(csrc: Path, name: str):
    """The kernel compiled from ``csrc/shared_attention.cpp`` as extension ``name``."""
    return cpp_extension.load(name, [str(csrc / SOURCE.name)], extra_cflags=list(COMPILE_FLAGS), verbose=False)


def earlier_sources(revision: str, into: Path) -> Path:
    """The kernel's ``csrc`` files at git ``revision``, written into ``into``."""
    root = Path(git("rev-parse", "--show-toplevel"))
    if not SOURCE.parent.is_relative_to(root):
        raise SystemExit(f"peft_lisa is imported from {SOURCE.parent}, outside this clone ({root}): run from its root")
    relative = SOURCE.parent.relative_to(root)
    for name in git("ls-tree", "--name-only", f"{revision}:{relative.as_posix()}").split():
        (into / name).write_text(git("show", f"{revision}:{(relative / name).as_posix()}"))
    return into


def git(*args: str) -> str:
    """What ``git args`` prints (stripped)."""
    return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout.strip()


def calls(shape: tuple) -> dict[str, tuple[Callable, int]]:
    """The source and the shared layer's call of ``shape`` (a function of the kernel, returning its output and the
    logits it hands on) and the bytes each reads."""
    batch, heads, kv_heads, head_size, keys, dtype_name = shape
    dtype = getattr(torch, dtype_name)
    generator = torch.Generator().manual_seed(0)

    def rand(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=generator)

    value, key = rand(batch, kv_heads, keys, head_size).to(dtype), rand(batch, kv_heads, keys, head_size).to(dtype)
    query = rand(batch, heads, 1, head_size) * head_size**-0.5
    low_query = rand(batch, heads, 1, RANK) * RANK**-0.5
    low_key = rand(batch, kv_heads, keys, RANK).to(dtype)  # a shared layer caches K_r per KV head
    handed, mix = rand(batch, heads, 1, keys), rand(heads, heads) / heads
    cache = value.numel() * value.element_size()
    return {
        "source": (lambda kernel: kernel.decode_rows(None, None, query, key, value, None, 0.0, True), 2 * cache),
        "shared": (
            lambda kernel: kernel.decode_rows(handed, mix, low_query, low_key, value, None, 0.0, False),
            cache + low_key.numel() * low_key.element_size() + handed.numel() * 4,
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", required=True, help="the git revision of the earlier kernel")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--shapes", choices=sorted(SHAPES), nargs="+", default=sorted(SHAPES))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        revision = git("rev-parse", "--short", args.against)
        kernels = {
            revision: build(earlier_sources(args.against, Path(scratch)), f"lisa_decode_rows_{revision}"),
            "now": build(SOURCE.parent, "lisa_decode_rows_now"),
        }
    print(f"{args.threads} thread(s), median of {args.repeats} calls each, one query row a sequence")
    print(f"| B x T_k, heads / KV heads x size, dtype | call | {revision} | now | {revision} / now | now, GB/s |")
    print("|---|---|---:|---:|---:|---:|")
    for shape in (s for name in args.shapes for s in SHAPES[name]):
        batch, heads, kv_heads, head_size, keys, dtype = shape
        for call_name, (call, read_bytes) in calls(shape).items():
            (output, logits), (expected, expected_logits) = (call(kernel) for kernel in kernels.values())
            torch.testing.assert_close(output.float(), expected.float(), atol=2e-2, rtol=2e-2)
            torch.testing.assert_close(logits, expected_logits, atol=1e-4, rtol=1e-4)  # empty unless handed on
            for kernel in [*kernels.values()] * 2:  # warm-up
                call(kernel)
            times: dict[str, list[float]] = {key: [] for key in kernels}
            for round_ in range(args.repeats):
                for key in alternating(list(kernels), round_):
                    started = time.perf_counter()
                    call(kernels[key])
                    times[key].append(time.perf_counter() - started)
            earlier, now = (statistics.median(times[key]) for key in kernels)
            print(
                f"| {batch} x {keys}, {heads} / {kv_heads} x {head_size}, {dtype} | {call_name} "
                f"| {earlier * 1e3:.3f} ms | {now * 1e3:.3f} ms | **{earlier / now:.2f}x** "
                f"| {read_bytes / now / 1e9:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
