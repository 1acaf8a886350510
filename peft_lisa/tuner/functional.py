"""The functional math of LiSA attention: small one-job helpers shared by every attention module of the tuner.

Notation (``docs/method.md``): B batch, H query heads, H_kv key/value heads, d_h head size, r low-rank size, T_q
queries, T_k keys (cached + new). Logits are the pre-softmax, pre-mask scores ``scale * Q K^T``; they are cast to
float32 as soon as the matmul in the model's dtype returns, so bf16/fp16 models hand finite logits from layer to layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class AttentionLayout:
    """Shapes of one attention layer, read off the base model."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    scaling: float

    @property
    def num_kv_groups(self) -> int:
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_attention(cls, attn: nn.Module) -> AttentionLayout:
        config = attn.config
        num_heads = config.num_attention_heads
        num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
        return cls(num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=attn.head_dim, scaling=attn.scaling)


def permutation_matrix(permutation: list[int]) -> torch.Tensor:
    """``P`` with ``P[i, permutation[i]] = 1``: row ``i`` of ``P s`` is head ``permutation[i]`` of ``s``."""
    num_heads = len(permutation)
    matrix = torch.zeros(num_heads, num_heads)
    matrix[torch.arange(num_heads), torch.tensor(permutation)] = 1.0
    return matrix


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Rotates half the hidden dims of the input (the rotate-half rotary convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``x`` (B x heads x T x d) with ``cos``/``sin`` (B x T x d), rotate-half convention."""
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


def lowrank_frequency_index(head_dim: int, rank: int, rotary_frequencies: str) -> tuple[int, ...]:
    """Indices of the ``rank/2`` rotary frequencies (out of ``head_dim/2``) the rank-``r`` query/key use.

    ``"first"`` takes the first (highest) frequencies; ``"strided"`` spreads them over the whole spectrum so that
    slow, long-range frequencies are represented too (``docs/method.md``, step 3).
    """
    half_rank, half_dim = rank // 2, head_dim // 2
    if rotary_frequencies == "first":
        return tuple(range(half_rank))
    return tuple(round(i * (half_dim - 1) / max(half_rank - 1, 1)) for i in range(half_rank))


def lowrank_rotary(
    position_embeddings: tuple[torch.Tensor, torch.Tensor], frequency_index: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick the rotary ``cos``/``sin`` (B x T x d_h, laid out ``[f, f]``) of the chosen frequencies: B x T x r."""
    cos, sin = position_embeddings
    index = torch.tensor(frequency_index, device=cos.device)
    cos_half, sin_half = cos[..., index], sin[..., index]
    return torch.cat((cos_half, cos_half), dim=-1), torch.cat((sin_half, sin_half), dim=-1)


def grouped_scores(query: torch.Tensor, key: torch.Tensor, scaling: float) -> torch.Tensor:
    """``scaling * query key^T`` per head, GQA aware, in float32.

    query: B x H x T_q x d, key: B x H_kv x T_k x d -> B x H x T_q x T_k. The H/H_kv query heads of a group are
    stacked along the query axis so that keys are never repeated in memory.
    """
    batch, num_heads, q_len, dim = query.shape
    num_kv_heads, k_len = key.shape[1], key.shape[2]
    query_grouped = (query * scaling).reshape(batch, num_kv_heads, (num_heads // num_kv_heads) * q_len, dim)
    scores = torch.matmul(query_grouped, key.transpose(-1, -2))  # B x H_kv x (G T_q) x T_k
    return scores.view(batch, num_heads, q_len, k_len).float()


def grouped_attend(probs: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``probs @ value`` per head, GQA aware: probs B x H x T_q x T_k, value B x H_kv x T_k x d -> B x T_q x (H d)."""
    batch, num_heads, q_len, k_len = probs.shape
    num_kv_heads = value.shape[1]
    probs_grouped = probs.reshape(batch, num_kv_heads, (num_heads // num_kv_heads) * q_len, k_len)
    out = torch.matmul(probs_grouped, value).view(batch, num_heads, q_len, -1)  # B x H x T_q x d
    return out.transpose(1, 2).reshape(batch, q_len, -1)


def additive_mask(
    attention_mask: Optional[torch.Tensor], q_len: int, k_len: int, device: torch.device
) -> torch.Tensor:
    """The mask ``M`` as a float32 additive tensor (0 where allowed), broadcastable to B x H x T_q x T_k.

    Accepts what transformers hands an attention layer: an additive float mask (eager), a boolean mask with True where
    attention is allowed (sdpa), or None when sdpa relies on ``is_causal`` (no padding; the queries are the last
    ``q_len`` of ``k_len`` positions).
    """
    min_value = torch.finfo(torch.float32).min
    if attention_mask is None:
        q_pos = torch.arange(k_len - q_len, k_len, device=device)[:, None]
        k_pos = torch.arange(k_len, device=device)[None, :]
        return torch.zeros(q_len, k_len, device=device).masked_fill(k_pos > q_pos, min_value)
    if attention_mask.dtype == torch.bool:
        return torch.zeros(attention_mask.shape, device=attention_mask.device).masked_fill(~attention_mask, min_value)
    if attention_mask.is_floating_point():
        return attention_mask.float().clamp(min=min_value)
    raise TypeError(
        f"LiSA got an attention mask of type {type(attention_mask).__name__} / {getattr(attention_mask, 'dtype', '')}"
        "; load the model with attn_implementation='sdpa' or 'eager'."
    )


def attend_from_logits(
    logits: torch.Tensor, mask: torch.Tensor, value: torch.Tensor, dropout: float, training: bool
) -> torch.Tensor:
    """``softmax(S + M) V`` (steps 4-5) from float32 logits S (B x H x T_q x T_k) and the additive mask M
    -> B x T_q x (H d)."""
    probs = torch.softmax(logits + mask, dim=-1).to(value.dtype)
    probs = F.dropout(probs, p=dropout, training=training)
    return grouped_attend(probs, value)


def project_full_qkv(
    attn: nn.Module, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The full layer's rotary query/key and value, exactly as the base attention computes them.

    Returns query B x H x T x d_h, key and value B x H_kv x T x d_h. Handles the per-head q_norm/k_norm of Qwen3.
    """
    hidden_shape = (*hidden_states.shape[:-1], -1, attn.head_dim)
    query = attn.q_proj(hidden_states).view(hidden_shape)
    key = attn.k_proj(hidden_states).view(hidden_shape)
    if getattr(attn, "q_norm", None) is not None:
        query, key = attn.q_norm(query), attn.k_norm(key)
    value = attn.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    cos, sin = position_embeddings
    return apply_rotary(query.transpose(1, 2), cos, sin), apply_rotary(key.transpose(1, 2), cos, sin), value


def update_cache(cache: Any, key: torch.Tensor, value: torch.Tensor, layer_idx: int, kwargs: dict) -> tuple:
    """Append this step's key/value to the layer's cache and return all cached ones (as the base layers do)."""
    if cache is None:
        return key, value
    return cache.update(key, value, layer_idx, kwargs=kwargs)


def sliding_window_of(attn: nn.Module) -> Optional[int]:
    """The sliding window the base attention passes its kernel: a per-layer attribute (Qwen2) or the config's
    (Mistral)."""
    if hasattr(attn, "sliding_window"):
        return attn.sliding_window
    return getattr(attn.config, "sliding_window", None)
