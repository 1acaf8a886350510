"""``torch.compile`` of one explicit block of a shared layer, measured once and not adopted (README, "Speed and
memory"; issue 10's "ways to try").

On SmolLM2 shapes (9 query heads, 3 KV heads of 64, rank 8; random tensors) and ``--tokens`` causal tokens, a shared
layer at link ``--links`` of a chain attends one block of ``--block`` queries at a time, as
``FoldedScores.attend_by_blocks`` does: the source's ``Q K^T`` per head, the mixing ``P`` over the head axis, the
chain's rank-r products, the causal mask, the softmax and ``A V``. Subjects, alternating, medians of ``--repeats``:

* the base's ``scaled_dot_product_attention`` over all tokens (head size 64);
* ``eager``: the block in plain torch operations (one GEMM for the mixing, the softmax in place);
* ``compiled``: the same block written for fusion (mixing as an einsum, mask by index comparison) under
  ``torch.compile(dynamic=True)``, so that inductor may fuse the mixing, mask and softmax into one pass.

    PYTHONPATH=examples taskset -c 0 python docs/benchmark/prefill_variants/compiled_block.py --threads 1 --links 1
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from attention_core import median_ms, print_ratio_table  # examples/: run with PYTHONPATH=examples

HEADS, KV_HEADS, HEAD_DIM, RANK = 9, 3, 64, 8
GROUP = HEADS // KV_HEADS


def source_scores(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """``Q K^T / sqrt(d_h)`` per head: B x H x T_q x T_k, each query head against its KV head."""
    batch, _, q_len, _ = query.shape
    grouped = query.view(batch, KV_HEADS, GROUP, q_len, HEAD_DIM)
    return (grouped @ key.unsqueeze(2).transpose(-1, -2)).view(batch, HEADS, q_len, -1) * HEAD_DIM**-0.5


def grouped_values(probs: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``A V``: B x H x T_q x d_h."""
    batch, _, q_len, k_len = probs.shape
    return (probs.view(batch, KV_HEADS, GROUP, q_len, k_len) @ value.unsqueeze(2)).view(batch, HEADS, q_len, -1)


def block_eager(query, key, mix, narrow_query, narrow_key, value):
    batch, _, q_len, _ = query.shape
    k_len = key.shape[2]
    scores = source_scores(query, key)
    total = torch.bmm(narrow_query.reshape(batch, HEADS * q_len, -1), narrow_key.transpose(1, 2))
    total = total.view(batch, HEADS, q_len, k_len)
    total.view(batch, HEADS, -1).baddbmm_(mix.expand(batch, HEADS, HEADS), scores.view(batch, HEADS, -1))
    future = torch.ones(q_len, q_len, dtype=torch.bool).triu_(1)
    total[..., k_len - q_len :].masked_fill_(future, float("-inf"))
    return grouped_values(torch.softmax(total, dim=-1), value)


def block_for_fusion(query, key, mix, narrow_query, narrow_key, value):
    q_len, k_len = query.shape[2], key.shape[2]
    total = narrow_query @ narrow_key.unsqueeze(1).transpose(-1, -2)
    total = total + torch.einsum("hg,bgqk->bhqk", mix, source_scores(query, key))
    positions = torch.arange(q_len).view(-1, 1) + (k_len - q_len)
    total = total.masked_fill(torch.arange(k_len).view(1, -1) > positions, float("-inf"))
    return grouped_values(torch.softmax(total, dim=-1), value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--links", type=int, default=1)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tokens, width = args.tokens, args.links * KV_HEADS * RANK  # the chain's rank-r products side by side
    query = torch.randn(1, HEADS, tokens, HEAD_DIM)
    key, value = torch.randn(1, KV_HEADS, tokens, HEAD_DIM), torch.randn(1, KV_HEADS, tokens, HEAD_DIM)
    mix, narrow_query, narrow_key = (
        torch.randn(HEADS, HEADS),
        torch.randn(1, HEADS, tokens, width),
        torch.randn(1, tokens, width),
    )
    compiled = torch.compile(block_for_fusion, dynamic=True)

    def by_blocks(block) -> torch.Tensor:
        outputs = []
        for start in range(0, tokens, args.block):
            stop = start + args.block
            rows = slice(start, stop)
            outputs.append(
                block(
                    query[:, :, rows],
                    key[:, :, :stop],
                    mix,
                    narrow_query[:, :, rows],
                    narrow_key[:, :stop],
                    value[:, :, :stop],
                )
            )
        return torch.cat(outputs, dim=2)

    subjects = {
        "base sdpa (head size 64)": lambda: F.scaled_dot_product_attention(
            query, key, value, is_causal=True, enable_gqa=True
        ),
        "eager blocks": lambda: by_blocks(block_eager),
        "compiled blocks": lambda: by_blocks(compiled),
    }
    with torch.no_grad():
        started = time.perf_counter()
        difference = (by_blocks(block_eager) - by_blocks(compiled)).abs().max().item()
    print(
        f"first calls (compilation included) {time.perf_counter() - started:.1f} s; "
        f"largest difference eager vs compiled {difference:.1e}"
    )
    results = median_ms(subjects, args.repeats)
    print(
        f"link {args.links}, 1 x {tokens} tokens, blocks of {args.block}, {torch.get_num_threads()} thread(s), "
        f"median of {args.repeats}"
    )
    print_ratio_table(results, "base sdpa (head size 64)")


if __name__ == "__main__":
    main()
