"""The functional math of LiSA attention: small one-job helpers shared by every attention module of the tuner.

Notation (``docs/method.md``): B batch, H query heads, H_kv key/value heads, d_h head size, r low-rank size, T_q
queries, T_k keys (cached + new). Logits are the pre-softmax, pre-mask scores ``scale * Q K^T``; they are cast to
float32 as soon as the matmul in the model's dtype returns, so bf16/fp16 models hand finite logits from layer to layer.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class AttentionLayout:
    """How one decoder attention layer computes its logits, read off the module once (``architectures.py``).

    The transformers decoder-attention layout: q/k/v projections (``q_proj``/``k_proj``/``v_proj``, or one fused
    ``qkv_proj`` split into H d_h, H_kv d_h, H_kv d_h rows), optional q/k norms (``"head"``: over each head's d_h,
    as Qwen3/Gemma3; ``"full"``: over the whole H d_h width before the head reshape, as OLMo 2), rotary embedding on
    the first ``rotary_dim`` dims of every head (partial rotary: Phi-3, StableLM, GLM-4; ``rotary_dim == 0``: a layer
    without rotary, as SmolLM3's no-rope layers), the layer's own ``scaling`` (Gemma's ``query_pre_attn_scalar``,
    Granite's ``attention_multiplier``), attention-logit softcapping ``softcap * tanh(s / softcap)`` (Gemma 2) and
    the layer's sliding window (None: full attention).
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    scaling: float
    fused_qkv: bool = False
    qk_norm: str = "none"  # "none" | "head" | "full"
    qk_norm_names: tuple[str, str] = ("q_norm", "k_norm")
    softcap: Optional[float] = None
    sliding_window: Optional[int] = None
    # Width of the rotary cos/sin the layer receives (-1: the whole head, read at run time; 0: no rotary).
    rotary_dim: int = -1
    # The cos/sin of frequency i sit at columns i and i + w/2 (``False``, rotate-half layout) or 2i and 2i+1 (Cohere).
    rotary_interleaved: bool = False

    @property
    def num_kv_groups(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def uses_rotary(self) -> bool:
        return self.rotary_dim != 0

    @property
    def rotary_width(self) -> int:
        """Dims of each head that rotate (the head size for full rotary)."""
        return self.head_dim if self.rotary_dim < 0 else self.rotary_dim

    @classmethod
    def from_attention(cls, attn: nn.Module) -> AttentionLayout:
        """The layout as far as the module's attributes tell; ``architectures.describe_attention`` completes and
        checks it (rotary width and layout, softcap and window as the layer hands them to its kernel)."""
        described = getattr(attn, "lisa_layout", None)
        if isinstance(described, AttentionLayout):
            return described
        config = attn.config
        num_heads = config.num_attention_heads
        num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
        head_dim = attn.head_dim
        norm_names = (
            ("q_norm", "k_norm") if getattr(attn, "q_norm", None) is not None else ("q_layernorm", "k_layernorm")
        )
        q_norm = getattr(attn, norm_names[0], None)
        qk_norm = "none"
        if q_norm is not None:
            weight = getattr(q_norm, "weight", None)
            full = isinstance(weight, torch.Tensor) and weight.numel() == num_heads * head_dim and num_heads > 1
            qk_norm = "full" if full else "head"
        return cls(
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            scaling=attn.scaling,
            fused_qkv=getattr(attn, "q_proj", None) is None and getattr(attn, "qkv_proj", None) is not None,
            qk_norm=qk_norm,
            qk_norm_names=norm_names,
            softcap=getattr(attn, "attn_logit_softcapping", None),
            sliding_window=sliding_window_of(attn),
            rotary_dim=-1 if getattr(attn, "use_rope", True) else 0,
        )

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["qk_norm_names"] = list(self.qk_norm_names)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AttentionLayout:
        known = {f.name for f in fields(cls)}
        data = {k: v for k, v in data.items() if k in known}
        if "qk_norm_names" in data:
            data["qk_norm_names"] = tuple(data["qk_norm_names"])
        return cls(**data)


def permutation_matrix(permutation: list[int]) -> torch.Tensor:
    """``P`` with ``P[i, permutation[i]] = 1``: row ``i`` of ``P s`` is head ``permutation[i]`` of ``s``."""
    num_heads = len(permutation)
    matrix = torch.zeros(num_heads, num_heads)
    matrix[torch.arange(num_heads), torch.tensor(permutation)] = 1.0
    return matrix


def kv_group_alignment(permutation: list[int], num_kv_heads: int) -> tuple[list[int], list[int]]:
    """For ``head_mixing="kv_group"``: the source KV group each KV group reads (``group_map[j]``), and the
    permutation made to respect it.

    Group ``j`` (heads ``j G .. j G + G - 1``, ``G = H / H_kv``) reads the source group most of its heads' permuted
    sources lie in (the lowest on ties); a head whose source lies elsewhere takes the first head of that group not
    taken yet within its own group.
    """
    num_heads = len(permutation)
    size = num_heads // num_kv_heads
    group_map, aligned = [], list(permutation)
    for group in range(num_kv_heads):
        heads = range(group * size, (group + 1) * size)
        votes = [sum(permutation[h] // size == source for h in heads) for source in range(num_kv_heads)]
        source = max(range(num_kv_heads), key=lambda g: (votes[g], -g))
        group_map.append(source)
        allowed = range(source * size, (source + 1) * size)
        kept = {permutation[h] for h in heads if permutation[h] in allowed}
        free = iter(sorted(set(allowed) - kept))
        for h in heads:
            if permutation[h] not in allowed:
                aligned[h] = next(free)
    return group_map, aligned


def kv_group_mask(group_map: list[int], num_heads: int) -> torch.Tensor:
    """H x H mask of the entries of ``P`` that ``head_mixing="kv_group"`` lets train: ``mask[h, g] = 1`` when source
    head ``g`` lies in the group ``group_map`` assigns to ``h``'s KV group."""
    size = num_heads // len(group_map)
    heads = torch.arange(num_heads)
    source_group = torch.tensor(group_map)[heads // size]  # H: the source group of each head
    return (heads[None, :] // size == source_group[:, None]).float()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Rotates half the hidden dims of the input (the rotate-half rotary convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``x`` (B x heads x T x d) with ``cos``/``sin`` (B x T x d), rotate-half convention."""
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


def lowrank_frequency_index(rotary_width: int, rank: int, rotary_frequencies: str) -> tuple[int, ...]:
    """Indices of the rotary frequencies (out of ``rotary_width/2``) the rank-``r`` query/key use: ``min(r, w)/2``.

    ``"first"`` takes the first (highest) frequencies; ``"strided"`` spreads them over the whole spectrum so that
    slow, long-range frequencies are represented too (``docs/method.md``, step 3). A layer without rotary
    (``rotary_width == 0``) gets none; with partial rotary (``rank > w``) the last ``r - w`` rank dims do not rotate,
    as the last ``d_h - w`` dims of the layer's own query/key.
    """
    half_rank, half_dim = min(rank, rotary_width) // 2, rotary_width // 2
    if rotary_frequencies == "first":
        return tuple(range(half_rank))
    return tuple(round(i * (half_dim - 1) / max(half_rank - 1, 1)) for i in range(half_rank))


def lowrank_rotary_columns(layout: AttentionLayout, rank: int, rotary_frequencies: str) -> tuple[int, ...]:
    """The columns of the layer's own rotary ``cos``/``sin`` that hold the frequencies the rank-r query/key use."""
    if not layout.uses_rotary:
        return ()
    index = lowrank_frequency_index(layout.rotary_width, rank, rotary_frequencies)
    return tuple(2 * i for i in index) if layout.rotary_interleaved else index


def lowrank_rotary(
    position_embeddings: tuple[torch.Tensor, torch.Tensor], columns: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotary ``cos``/``sin`` (B x T x w) of the chosen columns, laid out ``[f, f]``: B x T x 2 len(columns)."""
    cos, sin = position_embeddings
    # Slices, not an index tensor: indexing a GPU tensor by a host tensor copies it over and waits for the device.
    return tuple(torch.cat([table[..., c : c + 1] for c in columns + columns], dim=-1) for table in (cos, sin))


def apply_partial_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """:func:`apply_rotary` on the first ``cos.shape[-1]`` dims of ``x``; the others pass unchanged."""
    width = cos.shape[-1]
    if width == x.shape[-1]:
        return apply_rotary(x, cos, sin)
    return torch.cat((apply_rotary(x[..., :width], cos, sin), x[..., width:]), dim=-1)


def softcap_logits(logits: torch.Tensor, softcap: Optional[float]) -> torch.Tensor:
    """Attention-logit softcapping ``softcap * tanh(s / softcap)`` as the eager kernels apply it (Gemma 2)."""
    if softcap is None:
        return logits
    return torch.tanh(logits / softcap) * softcap


# Without autograd on CPU, a batched product of fewer matrices than this many per torch thread runs as one ``mm`` per
# matrix: torch's CPU ``bmm`` shares a small batch among its threads matrix by matrix. Measured on this project's
# 2-core CPU (AMD EPYC, Zen 5), a shared layer's block at 1 x 2048 tokens, 3 KV heads (192 x 64 @ 64 x 2048):
# bmm 1.50 ms with 1 thread, 0.95 ms with 2; three mm calls 1.40 and 0.76 ms. The same holds for the block's A V
# (192 x T_k @ T_k x 64; over a 2048-token prefill's 32 blocks: bmm 16.3 ms, mm 13.0 ms with 2 threads). From 24
# matrices (8 sequences of 512 tokens) bmm is as fast or faster: 1.45 ms against 1.60 ms with 2 threads. Only for
# products of at least MM_LOOP_MIN_WORK multiply-adds per matrix: a decode step's small products would pay the
# loop's overhead.
MM_LOOP_MAX_BATCH_PER_THREAD = 4
MM_LOOP_MIN_WORK = 2**22
# A decode step's q k^T on CPU in bf16 (one query per sequence), with at most this many query heads per KV head (1
# without GQA) and head size at least KEY_MAJOR_MIN_HEAD_DIM, runs as k q^T: keys in the row-major layout that
# torch's bf16 product reads fastest. Measured (Intel Xeon with AMX, torch 2.13, 2 threads, against 4,104 keys): 256
# KV heads of 128 with one query row each (a LLaMA-2-7B decode step at 8 x 4096) 13.3 against 23.3 ms; 64 KV heads of
# 128 with 4 rows (Llama-3-8B) 2.5 against 3.1 ms; SmolLM2's 3 rows of 64 even; 12 rows 0.77x; the rank-8 term
# 0.53-0.99x; float16 0.63-0.88x and float32 0.43-0.79x (all of those keep q k^T).
KEY_MAJOR_MAX_QUERY_ROWS = 4
KEY_MAJOR_MIN_HEAD_DIM = 128


def batched_matmul(
    left: torch.Tensor,
    right: torch.Tensor,
    accumulate: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``left @ right`` for N x M x K and N x K x P tensors -> N x M x P (written into ``out``, N x M x P, when
    given), or ``accumulate += left @ right`` in place (``accumulate`` N x M x P) and returned: ``bmm`` /
    ``baddbmm_``, or one ``mm`` per matrix for a small batch of large products on CPU without autograd
    (``MM_LOOP_MAX_BATCH_PER_THREAD``, ``MM_LOOP_MIN_WORK``)."""
    batch, rows, inner, columns = left.shape[0], left.shape[1], left.shape[2], right.shape[2]
    autograd = torch.is_grad_enabled() and (left.requires_grad or right.requires_grad)
    # (an eager choice: a compiled graph leaves the products to its compiler)
    loop = left.device.type == "cpu" and not autograd and not torch.compiler.is_compiling()
    loop = loop and batch < MM_LOOP_MAX_BATCH_PER_THREAD * torch.get_num_threads()
    if not (loop and rows * inner * columns >= MM_LOOP_MIN_WORK):
        if accumulate is not None:
            return accumulate.baddbmm_(left, right)
        return torch.bmm(left, right) if out is None else torch.bmm(left, right, out=out)
    if accumulate is None:
        if out is None:
            out = left.new_empty(batch, rows, columns, dtype=torch.result_type(left, right))
        for index in range(batch):
            torch.mm(left[index], right[index], out=out[index])
        return out
    for index in range(batch):
        accumulate[index].addmm_(left[index], right[index])
    return accumulate


def grouped_scores(query: torch.Tensor, key: torch.Tensor, scaling: float) -> torch.Tensor:
    """``scaling * query key^T`` per head, GQA aware, in float32.

    query: B x H x T_q x d, key: B x H_kv x T_k x d -> B x H x T_q x T_k. The H/H_kv query heads of a group are
    stacked along the query axis so that keys are never repeated in memory.
    """
    return grouped_product(query * scaling, key).float()


def uses_key_major(query: torch.Tensor, num_kv_heads: int) -> bool:
    """Whether :func:`grouped_product` computes ``q k^T`` as ``(k q^T)^T`` for ``query`` (B x H x T_q x D): a decode
    step's query (``T_q = 1``) in bf16 on CPU, at most ``KEY_MAJOR_MAX_QUERY_ROWS`` query heads per KV head, head size
    at least ``KEY_MAJOR_MIN_HEAD_DIM``."""
    _, num_heads, q_len, dim = query.shape
    return (
        q_len == 1
        and num_heads // num_kv_heads <= KEY_MAJOR_MAX_QUERY_ROWS
        and dim >= KEY_MAJOR_MIN_HEAD_DIM
        and query.dtype == torch.bfloat16
        and query.device.type == "cpu"
    )


def grouped_product(
    query: torch.Tensor,
    key: torch.Tensor,
    accumulate: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``query key^T`` per head, GQA aware: query B x H x T_q x d, key B x H_kv x T_k x d -> B x H x T_q x T_k
    (written into ``out`` when given), or added in place to ``accumulate`` (B H T_q T_k elements in that layout) and
    returned in that shape. The H/H_kv query heads of a group are stacked along the query axis so that keys are
    never repeated in memory."""
    batch, num_heads, q_len, dim = query.shape
    num_kv_heads, k_len = key.shape[1], key.shape[2]
    query_grouped = query.reshape(batch * num_kv_heads, (num_heads // num_kv_heads) * q_len, dim)
    key_rows = key.reshape(batch * num_kv_heads, k_len, dim)
    if accumulate is None and out is None and uses_key_major(query, num_kv_heads):  # a decode step's row: (k q^T)^T
        scores = torch.bmm(key_rows, query_grouped.transpose(1, 2))
        return scores.transpose(1, 2).contiguous().view(batch, num_heads, q_len, k_len)
    key_flat = key_rows.transpose(1, 2)
    grouped_shape = (batch * num_kv_heads, (num_heads // num_kv_heads) * q_len, k_len)
    accumulate = None if accumulate is None else accumulate.view(grouped_shape)
    out = None if out is None else out.view(grouped_shape)
    scores = batched_matmul(query_grouped, key_flat, accumulate, out)  # (B H_kv) x (G T_q) x T_k
    return scores.view(batch, num_heads, q_len, k_len)


def grouped_attend(probs: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``probs @ value`` per head, GQA aware: probs B x H x T_q x T_k, value B x H_kv x T_k x d -> B x T_q x (H d)."""
    batch, num_heads, q_len, k_len = probs.shape
    num_kv_heads = value.shape[1]
    probs_grouped = probs.reshape(batch * num_kv_heads, (num_heads // num_kv_heads) * q_len, k_len)
    value_flat = value.reshape(batch * num_kv_heads, k_len, value.shape[-1])
    out = batched_matmul(probs_grouped, value_flat).view(batch, num_heads, q_len, -1)  # B x H x T_q x d
    return out.transpose(1, 2).reshape(batch, q_len, -1)


def causal_allowed(rows: slice, q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
    """Boolean causal mask (True where allowed) of the query rows ``rows``, len(rows) x T_k, when the ``q_len``
    queries are the last of ``k_len`` positions (a prefill continuing a cache included)."""
    start, stop, _ = rows.indices(q_len)
    q_pos = torch.arange(k_len - q_len + start, k_len - q_len + stop, device=device)[:, None]
    return torch.arange(k_len, device=device)[None, :] <= q_pos


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
        attention_mask = causal_allowed(slice(None), q_len, k_len, device)
    if attention_mask.dtype == torch.bool:
        return torch.zeros(attention_mask.shape, device=attention_mask.device).masked_fill(~attention_mask, min_value)
    if attention_mask.is_floating_point():
        return attention_mask.float().clamp(min=min_value)
    raise TypeError(
        f"LiSA got an attention mask of type {type(attention_mask).__name__} / {getattr(attention_mask, 'dtype', '')}"
        "; load the model with attn_implementation='sdpa' or 'eager'."
    )


def additive_mask_rows(
    attention_mask: Optional[torch.Tensor], rows: slice, q_len: int, k_len: int, device: torch.device
) -> Optional[torch.Tensor]:
    """The rows ``rows`` of :func:`additive_mask` (B x 1 x len(rows) x T_k), built for those rows only: a shared
    layer's explicit path reads its mask one block of queries at a time, never as a T_q x T_k float tensor. None
    when nothing is masked (a decode step without padding)."""
    if attention_mask is None and q_len == 1:
        return None
    if attention_mask is None:
        allowed = causal_allowed(rows, q_len, k_len, device)
        return additive_mask(allowed, allowed.shape[0], k_len, device)
    block = attention_mask[..., rows, :k_len]
    return additive_mask(block, block.shape[-2], k_len, device)


def sdpa_takes_grouped_keys_with_mask(device: torch.device) -> bool:
    """Whether ``scaled_dot_product_attention`` runs a fused kernel for grouped keys (``enable_gqa``) with a mask on
    ``device``: on CPU it does; CUDA's kernels that take a mask do not, and would fall back to the math kernel,
    which holds the T_q x T_k logits (transformers' sdpa attention repeats the keys per query head there too)."""
    return device.type == "cpu"


def fused_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    dropout: float = 0.0,
) -> torch.Tensor:
    """``softmax(query key^T + M) value`` per head in one ``scaled_dot_product_attention`` call (scale 1: the scales
    are folded into the query) -> B x T_q x (H d_v).

    query: B x H x T_q x D, key: B x H_k x T_k x D, value: B x H_k x T_k x d_v with H_k dividing H (GQA); the mask as
    transformers hands it to an sdpa/eager layer (boolean, additive, or None for causal without padding). The value is
    zero-padded to D when d_v < D: torch's fused CPU kernel needs equal head sizes (measured 5x slower without).
    """
    batch, num_heads, q_len, dim = query.shape
    k_len, value_dim = key.shape[2], value.shape[-1]
    if value_dim < dim:
        value = F.pad(value, (0, dim - value_dim))
    is_causal = False
    if attention_mask is None:
        if q_len == k_len or q_len == 1:
            is_causal = q_len > 1
        else:  # a prefill continuing a cache
            attention_mask = causal_allowed(slice(None), q_len, k_len, query.device)
    elif attention_mask.dtype != torch.bool:
        attention_mask = attention_mask[..., :k_len].to(query.dtype)
    value = value.to(query.dtype)
    grouped = key.shape[1] != num_heads
    if grouped and attention_mask is not None and not sdpa_takes_grouped_keys_with_mask(query.device):
        key, value = (x.repeat_interleave(num_heads // x.shape[1], dim=1) for x in (key, value))
        grouped = False
    output = F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attention_mask,
        dropout_p=dropout,
        is_causal=is_causal,
        scale=1.0,
        enable_gqa=grouped,
    )  # B x H x T_q x D
    return output[..., :value_dim].transpose(1, 2).reshape(batch, q_len, num_heads * value_dim)


def attend_from_logits(
    logits: torch.Tensor, mask: Optional[torch.Tensor], value: torch.Tensor, dropout: float, training: bool
) -> torch.Tensor:
    """``softmax(S + M) V`` (steps 4-5) from float32 logits S (B x H x T_q x T_k) and the additive mask M (None:
    nothing masked) -> B x T_q x (H d)."""
    probs = torch.softmax(logits if mask is None else logits + mask, dim=-1).to(value.dtype)
    if training and dropout > 0:
        probs = F.dropout(probs, p=dropout, training=training)
    return grouped_attend(probs, value)


def family_rotary(attn: nn.Module) -> Callable:
    """The rotary function the layer's own modeling file applies (``apply_rotary_pos_emb(q, k, cos, sin)``): rotate
    half (Llama...), interleaved pairs (Cohere, GLM). Falls back to the rotate-half convention."""
    function = getattr(attn, "lisa_apply_rotary", None)
    if function is None:
        function = getattr(sys.modules.get(type(attn).__module__), "apply_rotary_pos_emb", None)
    return function or _rotate_half_pair


def _rotate_half_pair(
    query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return apply_rotary(query, cos, sin), apply_rotary(key, cos, sin)


def project_full_qkv(
    attn: nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: Optional[tuple[torch.Tensor, torch.Tensor]],
    layout: Optional[AttentionLayout] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The full layer's rotary query/key and value, exactly as the base attention computes them.

    Returns query B x H x T x d_h, key and value B x H_kv x T x d_h. Follows the layer's :class:`AttentionLayout`:
    fused or separate projections, per-head or full-width q/k norms, full, partial or no rotary (with the rotary
    function of the layer's own modeling file).
    """
    layout = layout or AttentionLayout.from_attention(attn)
    batch, q_len = hidden_states.shape[:2]
    head_dim = layout.head_dim
    if layout.fused_qkv:
        qkv = attn.qkv_proj(hidden_states)
        q_size, kv_size = layout.num_heads * head_dim, layout.num_kv_heads * head_dim
        query, key, value = qkv[..., :q_size], qkv[..., q_size : q_size + kv_size], qkv[..., q_size + kv_size :]
    else:
        query, key, value = attn.q_proj(hidden_states), attn.k_proj(hidden_states), attn.v_proj(hidden_states)
    q_norm_name, k_norm_name = layout.qk_norm_names
    if layout.qk_norm == "full":  # OLMo 2: over the whole q/k width, before the head reshape
        query, key = getattr(attn, q_norm_name)(query), getattr(attn, k_norm_name)(key)
    query = query.reshape(batch, q_len, -1, head_dim).transpose(1, 2)
    key = key.reshape(batch, q_len, -1, head_dim).transpose(1, 2)
    value = value.reshape(batch, q_len, -1, head_dim).transpose(1, 2)
    if layout.qk_norm == "head":  # Qwen3, Gemma 3, StableLM: over each head
        query, key = getattr(attn, q_norm_name)(query), getattr(attn, k_norm_name)(key)
    if layout.uses_rotary and position_embeddings is not None:
        query, key = rotate_query_key(attn, query, key, position_embeddings, head_dim)
    return query, key, value


def layer_logits(
    attn: nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: Optional[tuple[torch.Tensor, torch.Tensor]],
    rows: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """A full layer's pre-softmax, pre-mask logits ``softcap(scale Q K^T)``, as its own kernel computes them, float32:
    B x H x T_q x T_k (or only the query positions ``rows``). For analysis and attention distillation."""
    layout = AttentionLayout.from_attention(attn)
    query, key, _ = project_full_qkv(attn, hidden_states, position_embeddings, layout)
    if rows is not None:
        query = query[:, :, rows]
    return softcap_logits(grouped_scores(query, key, layout.scaling), layout.softcap)


def rotate_query_key(
    attn: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    head_dim: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's own rotary on the first ``cos.shape[-1]`` dims of each head (all of them for full rotary)."""
    cos, sin = position_embeddings
    rotate = family_rotary(attn)
    width = cos.shape[-1]
    if width >= head_dim:
        return rotate(query, key, cos, sin)
    query_rot, key_rot = rotate(query[..., :width], key[..., :width], cos, sin)
    return torch.cat((query_rot, query[..., width:]), dim=-1), torch.cat((key_rot, key[..., width:]), dim=-1)


def value_projection(attn: nn.Module, layout: AttentionLayout) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> x W_v`` of the layer: its ``v_proj``, or the value rows of a fused ``qkv_proj`` (Phi-3)."""
    if not layout.fused_qkv:
        return attn.v_proj
    qkv_proj = attn.qkv_proj
    start = (layout.num_heads + layout.num_kv_heads) * layout.head_dim
    if type(qkv_proj) is nn.Linear:
        bias = qkv_proj.bias

        def project(x: torch.Tensor) -> torch.Tensor:
            return F.linear(x, qkv_proj.weight[start:], None if bias is None else bias[start:])

        return project
    return lambda x: qkv_proj(x)[..., start:]  # a quantized projection: compute all rows, keep the values


def cache_argument(cache: Any, kwargs: dict) -> Any:
    """The cache a decoder layer handed its attention: ``cache``, or the older ``past_key_values`` keyword (popped
    from ``kwargs`` so that it is not passed on twice)."""
    if cache is None and "past_key_values" in kwargs:
        return kwargs.pop("past_key_values")
    return cache


def update_cache(
    cache: Any,
    key: torch.Tensor,
    value: torch.Tensor,
    layer_idx: int,
    kwargs: dict,
    attention_mask: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Append this step's key/value to the layer's cache and return all cached ones (as the base layers do), with
    the layer's mask, as :func:`keys_held` cuts them (a static cache's empty slots)."""
    if cache is None:
        return key, value, attention_mask
    q_len = key.shape[-2]
    key, value = cache.update(key, value, layer_idx, kwargs=kwargs)
    return keys_held(key, value, attention_mask, q_len)


def keys_held(
    key: torch.Tensor, value: torch.Tensor, attention_mask: Optional[torch.Tensor], q_len: int
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """The keys and values a layer's cache returned (B x H_kv x T_k x D) for ``q_len`` queries, and its mask, cut to
    the keys the base layer attends to where a shared layer needs it. A static cache (``StaticCache``,
    ``cache_implementation="static"``) returns all its slots, the empty ones after the tokens included. Given a mask,
    the mask leaves them out. Without one, several queries are a prefill into an empty cache: transformers drops the
    mask only there, and the base layer's ``scaled_dot_product_attention(is_causal=True)`` aligns its causal mask
    top-left, so that query i (slot i) attends to slots 0..i and never beyond slot ``q_len - 1``. They are cut there,
    without a mask: a shared layer's causal mask is aligned bottom-right, which is the same on ``q_len`` keys. One
    query without a mask attends to every key, as the base layer's does (a dynamic cache holds no empty slot). The cut
    reads shapes only: no device sync, and nothing for ``torch.compile`` to break a graph on.

    Given a mask, the mask covers every slot, a full layer's slot t holds position t (and so does a sliding-window
    layer's until its window is full), and the slots stay whole: a cut view of them would be copied by every product
    of a decode step (LLaMA-2-7B's geometry at 8 x 4096: 408 against the base layer's 52 ms, a scratch run). A
    sliding-window shared layer lines its source's keys up with its own by position
    (:func:`peft_lisa.tuner.attention.keys_by_position`)."""
    if attention_mask is not None or q_len == 1 or key.shape[-2] <= q_len:
        return key, value, attention_mask
    return key[:, :, :q_len], value[:, :, :q_len], None


def sliding_window_of(attn: nn.Module) -> Optional[int]:
    """The sliding window the base attention passes its kernel: a per-layer attribute (Qwen2, Gemma...) or the
    config's (Mistral, Mixtral, Phi-3)."""
    if hasattr(attn, "sliding_window"):
        return attn.sliding_window
    return getattr(attn.config, "sliding_window", None)
