"""Jensen-Shannon divergences between the attention of two layers' heads, and the best matchings of their heads.

Divergences are in bits (log base 2), so they lie in ``[0, 1]``; a matching maps every head of layer ``l`` to the head
of layer ``l-1`` it starts from (``docs/method.md``, "Our design", step 2: the initial permutation ``P``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

_LN2 = math.log(2.0)


def _neg_entropy(probs: torch.Tensor) -> torch.Tensor:
    """``sum_k p log p`` over the last axis (0 log 0 = 0)."""
    return torch.special.xlogy(probs, probs).sum(-1)


def js_divergence_matrix(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Pairwise JS divergences (bits) between the distributions of two sets of heads, row by row.

    ``p``: N x H1 x K and ``q``: N x H2 x K hold N distributions (over K keys) per head; returns N x H1 x H2.
    Uses ``JS = H(m) - (H(p) + H(q)) / 2`` with ``m = (p + q) / 2``; since ``sum(p + q) = 2``,
    ``JS = 1 - (n(p + q) - n(p) - n(q)) / (2 ln 2)`` bits with ``n(x) = sum x log x``.
    """
    p, q = p.float(), q.float()
    both = p[:, :, None, :] + q[:, None, :, :]  # N x H1 x H2 x K
    cross = both.xlogy_(both).sum(-1)
    js = 1.0 - (cross - _neg_entropy(p)[:, :, None] - _neg_entropy(q)[:, None, :]) / (2.0 * _LN2)
    return js.clamp_(0.0, 1.0)


def js_sum(current: torch.Tensor, previous: torch.Tensor, positions: Sequence[int], chunk: int = 16) -> torch.Tensor:
    """Sum over batch and query rows of the H x H JS matrix between two layers' attention rows.

    ``current``/``previous``: B x H x R x T attention rows at the query ``positions`` (ascending). Rows are processed
    in chunks whose keys are cut after the last position of the chunk: keys beyond a query are masked (zero) in both
    distributions and add nothing, so this is exact and saves work.
    """
    batch, num_heads, rows, _ = current.shape
    total = torch.zeros(num_heads, previous.shape[1], dtype=torch.float64)
    for start in range(0, rows, chunk):
        stop = min(start + chunk, rows)
        keys = positions[stop - 1] + 1
        a = current[:, :, start:stop, :keys].permute(0, 2, 1, 3).reshape(-1, num_heads, keys)
        b = previous[:, :, start:stop, :keys].permute(0, 2, 1, 3).reshape(-1, previous.shape[1], keys)
        total += js_divergence_matrix(a, b).sum(0).double().cpu()
    return total


def best_head_matching(js: np.ndarray) -> tuple[list[int], float]:
    """Optimal one-to-one matching of the heads of layer ``l`` (rows) to those of layer ``l-1`` (columns).

    Returns ``(perm, mean JS of the matched pairs)`` with ``perm[i]`` the head of layer ``l-1`` for head ``i``.
    """
    from scipy.optimize import linear_sum_assignment

    js = np.asarray(js, dtype=float)
    rows, cols = linear_sum_assignment(js)
    perm = [int(c) for _, c in sorted(zip(rows, cols, strict=True))]
    return perm, float(js[np.arange(len(perm)), perm].mean())


def best_grouped_matching(js: np.ndarray, num_kv_heads: int) -> tuple[list[int], float]:
    """Best matching that keeps KV groups together: every query head of KV group ``g`` of layer ``l`` takes a head
    of one and the same KV group of layer ``l-1``, groups matched one to one (GQA; see the ``peft_lisa.analysis``
    package docstring).

    Optimal: once the group assignment is fixed, the matchings inside the group blocks are independent, so the
    group assignment is itself an assignment problem over the optimal block costs.
    """
    from scipy.optimize import linear_sum_assignment

    js = np.asarray(js, dtype=float)
    num_heads = js.shape[0]
    group = num_heads // num_kv_heads
    block_cost = np.zeros((num_kv_heads, num_kv_heads))
    inner: dict[tuple[int, int], np.ndarray] = {}
    for g in range(num_kv_heads):
        for s in range(num_kv_heads):
            block = js[g * group : (g + 1) * group, s * group : (s + 1) * group]
            rows, cols = linear_sum_assignment(block)
            block_cost[g, s] = block[rows, cols].sum()
            inner[g, s] = cols[np.argsort(rows)]
    group_rows, group_cols = linear_sum_assignment(block_cost)
    source_group = dict(zip(group_rows.tolist(), group_cols.tolist(), strict=True))
    perm = [
        source_group[i // group] * group + int(inner[i // group, source_group[i // group]][i % group])
        for i in range(num_heads)
    ]
    return perm, float(js[np.arange(num_heads), perm].mean())
