"""One layer's attention core on SmolLM2-135M shapes: the base's sdpa against a shared layer's two ways to attend.

Times, on random tensors (speed does not depend on the values), the causal attention of one layer over ``--batch`` x
``--tokens`` tokens (9 query heads, 3 KV heads of 64, rank 8), the subjects alternating, medians of ``--repeats``:

* the base layer's ``scaled_dot_product_attention`` (head size 64, GQA);
* the last shared layer of a chain of ``--links`` (1: a shared layer after a full one); the fused head sizes below
  grow by ``H_kv r`` (full) or ``r`` (kv_group) per further link;
* a shared layer (source logits mixed by ``P``, plus the rank-8 term) as the library runs it
  (:class:`peft_lisa.tuner.carrier.FoldedScores`), for ``head_mixing="full"`` and ``"kv_group"``:
  ``attend_fused``, one fused call over all heads of head size ``H_kv d_h + r = 200`` (full) or ``d_h + r = 72``
  (kv_group) for the first link, what training runs; and ``attend_by_blocks``, the explicit logits a few queries
  at a time, what inference ran before the CPU kernel (and runs under ``PEFT_LISA_CPU_KERNEL=off``) when the fused
  call would be at least ``EXPLICIT_MIN_WIDENING`` times wider than the values; and ``attend_by_kernel``, the
  compiled CPU kernel (``peft_lisa/tuner/cpu_kernel.py``), what inference on CPU runs.

    taskset -c 0 python examples/attention_core.py --threads 1

With ``--decode``, one decode step instead: one query per sequence against a cache of ``--tokens`` keys, the base's
sdpa against a merged model's source layer (its row of logits, softmax and ``A V``, handing the row on), a shared
layer (the source's row mixed by ``P``, plus its rank-r term) and, by the kernel only, a full layer that hands nothing
on (``LiSAFullAttention``), each by torch's operations
(:func:`peft_lisa.tuner.functional.grouped_scores`, :func:`~peft_lisa.tuner.functional.attend_from_logits`) and by
the CPU kernel's decode rows (:func:`peft_lisa.tuner.cpu_kernel.decode_rows`), what inference on CPU runs.
``--cold`` reads a different cache at each call (from memory, as a whole model's decode step reads each layer's
cache). ``--dtype bfloat16`` runs either mode in bf16.

    python examples/attention_core.py --threads 2 --decode --batch 8 --dtype bfloat16

Prints milliseconds and the ratio to the base.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from peft_lisa.tuner.carrier import FoldedScores
from peft_lisa.tuner.cpu_kernel import decode_rows, load_cpu_kernel
from peft_lisa.tuner.functional import attend_from_logits, grouped_scores, kv_group_mask

HEADS, KV_HEADS, HEAD_DIM, RANK = 9, 3, 64, 8
COLD_BYTES = 600 * 2**20  # --cold: more than the test machine's last-level cache holds (raise it above yours)


def base_attention(batch: int, tokens: int) -> Callable[[], torch.Tensor]:
    """The base layer's attention core over ``batch`` x ``tokens`` tokens on random tensors: one causal
    ``scaled_dot_product_attention`` call, ``HEADS`` query heads against ``KV_HEADS`` KV heads of ``HEAD_DIM``."""
    query = torch.randn(batch, HEADS, tokens, HEAD_DIM)
    key, value = torch.randn(batch, KV_HEADS, tokens, HEAD_DIM), torch.randn(batch, KV_HEADS, tokens, HEAD_DIM)
    return lambda: F.scaled_dot_product_attention(query, key, value, is_causal=True, enable_gqa=True)


def shared_layer_logits(
    batch: int, tokens: int, group_map: list[int] | None, links: int = 1
) -> Callable[[], FoldedScores]:
    """The logits of the last of ``links`` chained shared layers, each ``P S + Q_r K_r^T / sqrt(r)`` of the one
    before, from a source's ``scale Q K^T``; folded, as a fresh object per call."""
    query, key = torch.randn(batch, HEADS, tokens, HEAD_DIM), torch.randn(batch, KV_HEADS, tokens, HEAD_DIM)
    mask = 1.0 if group_map is None else kv_group_mask(group_map, HEADS)
    chain = []  # per link: P, Q_r, K_r
    for _ in range(links):
        q_small, k_small = torch.randn(batch, HEADS, tokens, RANK), torch.randn(batch, KV_HEADS, tokens, RANK)
        chain.append((torch.randn(HEADS, HEADS) * mask, q_small, k_small))

    def logits() -> FoldedScores:
        scores = FoldedScores.from_query_key(query, key, HEAD_DIM**-0.5)
        for mixing, q_small, k_small in chain:
            scores = scores.mixed(mixing, group_map).with_lowrank(q_small, k_small, RANK**-0.5)
        return scores

    return logits


def median_ms(subjects: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median milliseconds of each subject over ``repeats`` rounds, the subjects alternating within a round, after
    one warm-up call each; all under ``torch.no_grad()``."""
    times: dict[str, list[float]] = {name: [] for name in subjects}
    with torch.no_grad():
        for fn in subjects.values():
            fn()  # warm-up
        for _ in range(repeats):
            for name, fn in subjects.items():  # alternating
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) * 1e3 for name, values in times.items()}


def print_ratio_table(results: dict[str, float], base: str) -> None:
    """Print ``results`` (milliseconds by subject) as a markdown table with each subject's ratio to ``base``."""
    print("| subject | ms | x base |\n|---|---:|---:|")
    for name, ms in results.items():
        print(f"| {name} | {ms:.4g} | {ms / results[base]:.2f} |")


def decode_step(batch: int, tokens: int, repeats: int, cold: bool) -> None:
    """Time one decode step's attention core: the base's sdpa against a merged source layer's row of logits, a
    shared layer's (the source's row mixed, plus the rank-r term) and a full layer's that hands nothing on, by torch's
    operations and by the CPU kernel's decode rows, what inference on CPU runs where the kernel is built. ``cold``:
    each call reads the next of as many caches as ``COLD_BYTES`` hold, from memory, as a whole model's decode step
    reads each layer's cache."""
    query, q_small = torch.randn(batch, HEADS, 1, HEAD_DIM), torch.randn(batch, HEADS, 1, RANK)
    handed = torch.randn(batch, HEADS, 1, tokens, dtype=torch.float32)  # the source's row of logits: float32
    mixing = torch.randn(HEADS, HEADS, dtype=torch.float32)  # P, mixed in float32 as HeadAlign mixes it
    cache_bytes = batch * KV_HEADS * tokens * (2 * HEAD_DIM + RANK) * query.element_size()
    caches = [  # keys, values, rank-r keys
        tuple(torch.randn(batch, KV_HEADS, tokens, width) for width in (HEAD_DIM, HEAD_DIM, RANK))
        for _ in range(max(1, COLD_BYTES // cache_bytes) if cold else 1)
    ]
    turns = itertools.cycle(caches)

    def shared_row_by_torch(key: torch.Tensor, value: torch.Tensor, k_small: torch.Tensor) -> torch.Tensor:
        logits = torch.bmm(mixing.expand(batch, HEADS, HEADS), handed.view(batch, HEADS, tokens))  # as HeadAlign
        logits = logits.view(batch, HEADS, 1, tokens)
        return attend_from_logits(logits + grouped_scores(q_small, k_small, RANK**-0.5), None, value, 0.0, False)

    def source_row_by_torch(key: torch.Tensor, value: torch.Tensor, k_small: torch.Tensor) -> torch.Tensor:
        return attend_from_logits(grouped_scores(query, key, HEAD_DIM**-0.5), None, value, 0.0, False)

    layers: dict[str, Callable[..., object]] = {
        "base sdpa (head size 64)": lambda key, value, _: F.scaled_dot_product_attention(
            query, key, value, enable_gqa=True
        ),
        "source row, torch operations": source_row_by_torch,
        "shared row, torch operations": shared_row_by_torch,
    }
    kernel = load_cpu_kernel()
    if kernel is not None:
        layers["source row, kernel decode rows"] = lambda key, value, _: decode_rows(
            kernel, query * HEAD_DIM**-0.5, key, value, None
        )
        layers["full row, kernel decode rows"] = lambda key, value, _: decode_rows(
            kernel, query * HEAD_DIM**-0.5, key, value, None, hand_on=False
        )
        layers["shared row, kernel decode rows"] = lambda key, value, k_small: decode_rows(
            kernel, q_small * RANK**-0.5, k_small, value, None, handed=handed, mix=mixing, hand_on=False
        )
    subjects = {name: (lambda layer=layer: layer(*next(turns))) for name, layer in layers.items()}
    results = median_ms(subjects, repeats)
    print(
        f"attention core of one decode step, {batch} x 1 query against {tokens} cached keys, "
        f"{torch.get_default_dtype()}, {torch.get_num_threads()} thread(s), median of {repeats}"
        + (f", {len(caches)} caches in turn" if cold else "")
    )
    print_ratio_table(results, "base sdpa (head size 64)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--links", type=int, default=1, help="the last layer of a chain of this many shared layers (prefill only)"
    )
    parser.add_argument("--decode", action="store_true", help="one decode step against a cache of --tokens keys")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--cold", action="store_true", help="decode: a different cache at each call, read from memory")
    args = parser.parse_args()
    if args.cold and not args.decode:
        parser.error("--cold applies to --decode (a prefill reads its keys many times, from the CPU's caches)")
    torch.set_num_threads(args.threads)
    torch.set_default_dtype(getattr(torch, args.dtype))
    if args.decode:
        decode_step(args.batch, args.tokens, args.repeats, args.cold)
        return
    value = torch.randn(args.batch, KV_HEADS, args.tokens, HEAD_DIM)
    full = shared_layer_logits(args.batch, args.tokens, None, args.links)
    kv_group = shared_layer_logits(args.batch, args.tokens, list(range(KV_HEADS)), args.links)
    subjects: dict[str, Callable[[], object]] = {
        "base sdpa (head size 64)": base_attention(args.batch, args.tokens),
        f"full: fused calls, head size {full().head_dim} (training)": lambda: full().attend_fused(None, value),
        "full: explicit blocks (inference)": lambda: full().attend_by_blocks(None, value),
        f"kv_group: fused calls, head size {kv_group().head_dim} (training, inference)": lambda: (
            kv_group().attend_fused(None, value)
        ),
        "kv_group: explicit blocks": lambda: kv_group().attend_by_blocks(None, value),
    }
    kernel = load_cpu_kernel()
    if kernel is not None:
        subjects["full: CPU kernel (inference)"] = lambda: full().attend_by_kernel(kernel, None, value)
        subjects["kv_group: CPU kernel (inference)"] = lambda: kv_group().attend_by_kernel(kernel, None, value)
    results = median_ms(subjects, args.repeats)
    print(
        f"attention core of one layer (link {args.links} of a chain), {args.batch} x {args.tokens} tokens, "
        f"{torch.get_default_dtype()}, {torch.get_num_threads()} thread(s), median of {args.repeats}"
    )
    print_ratio_table(results, "base sdpa (head size 64)")


if __name__ == "__main__":
    main()
