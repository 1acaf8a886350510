"""One layer's attention core on SmolLM2-135M shapes: the base's sdpa against a shared layer's alternatives.

Times, on random tensors (speed does not depend on the values), the causal attention of one layer over ``--tokens``
tokens (batch 1, 9 query heads, 3 KV heads of 64, rank 8):

* the base layer's ``scaled_dot_product_attention`` (head size 64, GQA);
* ``head_mixing="full"``: three fused calls (one per KV group, 3 query heads each) of head size ``H_kv d_h + r = 200``,
  values zero-padded to 200 (what ``FoldedScores.attend`` runs);
* ``head_mixing="kv_group"``: three fused calls of head size ``d_h + r = 72``;
* the explicit alternative for ``full``: ``Q K^T``, ``P`` mixing, the low-rank term, mask, softmax and ``A V``, 256
  queries at a time and only over the keys a block can see.

    taskset -c 0 python examples/attention_core.py --threads 1

Prints milliseconds (median of ``--repeats``) and the ratio to the base.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

HEADS, KV_HEADS, HEAD_DIM, RANK = 9, 3, 64, 8


def timed(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def fused_calls(tokens: int, dim: int) -> Callable[[], object]:
    query = torch.randn(1, HEADS // KV_HEADS, tokens, dim)
    key, value = torch.randn(1, 1, tokens, dim), torch.randn(1, 1, tokens, dim)
    return lambda: [
        F.scaled_dot_product_attention(query, key, value, is_causal=True, enable_gqa=True) for _ in range(KV_HEADS)
    ]


def explicit_blocks(tokens: int, block: int = 256) -> Callable[[], object]:
    mixing = torch.randn(HEADS, HEADS)
    query, key, value = (torch.randn(1, h, tokens, HEAD_DIM) for h in (HEADS, KV_HEADS, KV_HEADS))
    q_small, k_small = torch.randn(1, HEADS, tokens, RANK), torch.randn(1, KV_HEADS, tokens, RANK)
    group = HEADS // KV_HEADS

    def run() -> torch.Tensor:
        output = torch.empty(1, HEADS, tokens, HEAD_DIM)
        for start in range(0, tokens, block):
            end = min(tokens, start + block)
            rows = group * (end - start)
            scores = query[:, :, start:end].reshape(1, KV_HEADS, rows, HEAD_DIM) @ key[:, :, :end].transpose(-1, -2)
            mixed = torch.einsum("hg,bgqk->bhqk", mixing, scores.view(1, HEADS, end - start, end))
            lowrank = q_small[:, :, start:end].reshape(1, KV_HEADS, rows, RANK) @ k_small[:, :, :end].transpose(-1, -2)
            logits = mixed + lowrank.view(1, HEADS, end - start, end)
            causal = torch.ones(end - start, end - start, dtype=torch.bool).triu(1)
            logits[..., start:end].masked_fill_(causal, float("-inf"))
            probs = torch.softmax(logits, dim=-1).view(1, KV_HEADS, rows, end)
            output[:, :, start:end] = (probs @ value[:, :, :end]).view(1, HEADS, end - start, HEAD_DIM)
        return output

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    query = torch.randn(1, HEADS, args.tokens, HEAD_DIM)
    key, value = torch.randn(1, KV_HEADS, args.tokens, HEAD_DIM), torch.randn(1, KV_HEADS, args.tokens, HEAD_DIM)
    subjects = {
        "base sdpa (head size 64)": lambda: F.scaled_dot_product_attention(
            query, key, value, is_causal=True, enable_gqa=True
        ),
        "full: 3 fused calls, head size 200": fused_calls(args.tokens, KV_HEADS * HEAD_DIM + RANK),
        "kv_group: 3 fused calls, head size 72": fused_calls(args.tokens, HEAD_DIM + RANK),
        "full, explicit blocks of 256 queries": explicit_blocks(args.tokens),
    }
    with torch.no_grad():
        results = {name: timed(fn, args.repeats) for name, fn in subjects.items()}
    base = results["base sdpa (head size 64)"]
    print(f"attention core of one layer, 1 x {args.tokens} tokens, {torch.get_num_threads()} thread(s)")
    print("| subject | ms | x base |\n|---|---:|---:|")
    for name, ms in results.items():
        print(f"| {name} | {ms:.1f} | {ms / base:.2f} |")


if __name__ == "__main__":
    main()
