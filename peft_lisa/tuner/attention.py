"""LiSA attention (``docs/method.md``, steps 1-5): the head alignment, the shared layer's substitute for its Q/K, and
the full layer that hands its logits on.

:class:`LiSASubstitute` is the one implementation of a shared layer's attention. The PEFT wrapper
(:class:`~peft_lisa.tuner.layer.LiSALayer`, one substitute per adapter) and the merged model
(:class:`~peft_lisa.tuner.merged.LiSASharedAttention`, a substitute with its own ``v_proj``/``o_proj``) both call
:meth:`LiSASubstitute.attend`, so training and deployment compute exactly the same thing.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from typing import Any, Optional

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import eager_attention_forward

from .architectures import SUPPORTED_ATTN_IMPLEMENTATIONS, UnsupportedModelError
from .carrier import (
    ChainedLogits,
    FoldedScores,
    LogitsCarrier,
    MaterializedLogits,
    ScoresFromQueryKey,
    SharedLayerCall,
    SourceLogits,
)
from .cpu_kernel import CPUKernel, cpu_kernel_expected, decode_rows, decode_rows_route
from .functional import (
    AttentionLayout,
    additive_mask_rows,
    apply_partial_rotary,
    attend_from_logits,
    grouped_product,
    grouped_scores,
    kv_group_alignment,
    kv_group_mask,
    lowrank_frequency_index,
    lowrank_rotary_columns,
    permutation_matrix,
    project_full_qkv,
    softcap_logits,
    update_cache,
)

ACTIVATIONS = {"gelu": nn.GELU, "silu": nn.SiLU, "relu": nn.ReLU, "tanh": nn.Tanh}
# Queries per block in a shared layer's attention: bounds the alignment FFN's activations on long prefills.
QUERY_BLOCK_SIZE = 256
# A source layer with at most this many queries (a decode step) computes its logits explicitly and hands them on;
# with more it runs the model's attention kernel and hands on Q/K (see source_attention).
EXPLICIT_SOURCE_MAX_QUERIES = 1
# Without autograd, on CPU, a shared layer that attends to at most this many keys computes all its logits at once
# (B x H x T_q x T_k float32) and hands them on as they are, as on a decode step: a short prefill's chain then mixes
# the logits it gets instead of recomputing each earlier link's terms block by block, which costs more tensor
# operations than the arithmetic they save at this size. Measured on SmolLM2, 50% shared, 2 threads, in-process A/B
# (docs/benchmark/prefill_variants/handed_logits.py), on an Intel Xeon with AMX against the CPU kernel: handing on
# is ahead at 64 and 96 keys or level (bf16 8 x 96: 0.98x of the base against 0.96x), behind from 112 (bf16 8 x 128:
# 0.93x against 0.98x; fp32 1.03x against 1.05x). Without the kernel the bound is the next one. At 256 keys handing
# on held peak tensors 42% above the base's (12.9 against 9.1 MiB; AMD EPYC, before the kernel).
# Not measured on an accelerator, where the folded route's one fused call launches fewer kernels: it keeps that route.
HANDED_LOGITS_MAX_KEYS = 96
# The bound where the kernel is off or could not be built, so that longer inputs attend by torch operations: handing
# on leads at 128 keys there, on the Xeon too (handed_logits.py with PEFT_LISA_CPU_KERNEL=off, 21 rounds: bf16 1 x 128
# 0.93x against 0.81x, 8 x 128 0.94x against 0.90x; fp32 8 x 128 1.02x against 1.03x).
HANDED_LOGITS_MAX_KEYS_WITHOUT_KERNEL = 128


def handed_logits_max_keys() -> int:
    """The most keys for which a CPU inference shared layer computes its logits whole and hands them on: the bound
    for the route that longer inputs take (the CPU kernel, or torch operations without it)."""
    return HANDED_LOGITS_MAX_KEYS if cpu_kernel_expected() else HANDED_LOGITS_MAX_KEYS_WITHOUT_KERNEL


def keys_by_position(
    source: SourceLogits,
    cache: Any,
    layer_idx: int,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
) -> tuple[SourceLogits, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """A sliding-window shared layer's source logits and its own keys (B x H_kv x T_k x r), values and mask, lined up
    by position on a static cache; unchanged elsewhere (a dynamic cache holds the tokens alone).

    A static cache's full layer returns all its slots, slot t holding position t, and so does a sliding-window layer
    until its window is full; once full, its slots hold the last positions. The layer reads the last ``T_k`` of its
    source's logits of the first ``max(held, T_k)`` keys, as views (:meth:`SourceLogits.first_keys`). Where the
    source was cut to the tokens held (a first prefill without a mask, :func:`keys_held`) and this layer got a mask,
    it cuts its own empty slots too."""
    if cache is None or not cache.is_sliding[layer_idx]:
        return source, key, value, attention_mask
    held = cache.get_seq_length(layer_idx)  # a Python int for a sliding-window layer: no device sync
    if source.shape[-1] < key.shape[-2]:  # the source holds fewer keys than this layer's slots: cut the empty ones
        key, value = key[:, :, :held], value[:, :, :held]
        attention_mask = None if attention_mask is None else attention_mask[..., :held]
    keys = max(held, key.shape[-2])
    return (source.first_keys(keys) if source.shape[-1] > keys else source), key, value, attention_mask


class HeadAlign(nn.Module):
    """Head alignment along the head axis (step 2): ``P s`` (linear, ``hidden == 0``) or ``P s + W2 act(W1 s + b1)
    + b2``.

    It acts independently at every (query, key) entry and never mixes positions. ``P`` starts as a permutation matrix
    and ``W2`` at zero, so an untrained module is exactly "take head ``perm[i]`` of the previous layer". The linear
    alignment has no bias ``b2``: a per-head constant added to every logit of a row is removed by the softmax, here
    and in every later layer that aligns these logits linearly, so it could neither change the output nor learn.
    """

    def __init__(
        self,
        num_heads: int,
        hidden: int,
        activation: str = "gelu",
        init_permutation: Optional[list[int]] = None,
        group_map: Optional[list[int]] = None,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.hidden = hidden
        self.group_map = group_map  # head_mixing="kv_group": the source KV group each KV group reads
        self.permute = nn.Parameter(permutation_matrix(init_permutation or list(range(num_heads))))  # P: H x H
        if group_map is not None:
            # P's entries outside the allowed blocks are zero and stay zero (the mask also zeroes their gradient).
            self.register_buffer("mixing_mask", kv_group_mask(group_map, num_heads), persistent=False)
        if hidden > 0:
            self.up = nn.Linear(num_heads, hidden)  # W1, b1: m x H
            self.act = ACTIVATIONS[activation]()
            self.down = nn.Linear(hidden, num_heads, bias=False)  # W2: H x m
            self.out_bias = nn.Parameter(torch.zeros(num_heads))  # b2: H
            nn.init.zeros_(self.down.weight)

    def mixing(self) -> torch.Tensor:
        """``P`` (H x H, float32), restricted to its allowed blocks under ``head_mixing="kv_group"``."""
        permute = self.permute.float()
        return permute if self.group_map is None else permute * self.mixing_mask

    def forward(self, source_logits: torch.Tensor) -> torch.Tensor:
        # source_logits: B x H x T_q x T_k -> aligned: B x H x T_q x T_k, computed in float32 whatever the
        # parameters' dtype (a merged bf16 model keeps them in bf16).
        source_logits = source_logits.float()
        if self.hidden == 0:
            batch, heads, q_len, k_len = source_logits.shape
            if source_logits.is_contiguous():  # a batched product: the einsum below's result, a third of its time
                mixed = torch.bmm(self.mixing().expand(batch, heads, heads), source_logits.view(batch, heads, -1))
                return mixed.view(batch, heads, q_len, k_len)
            # einsum, not a broadcast matmul: the latter's result depended on the tensors' memory alignment (1e-7).
            return torch.einsum("gh,bhqk->bgqk", self.mixing(), source_logits)
        # P and W1 read the logits in one pass: [P; W1] is (H + m) x H.
        stacked = torch.cat([self.mixing(), self.up.weight.float()])
        projected = torch.einsum("gh,bhqk->bgqk", stacked, source_logits)  # B x (H + m) x T_q x T_k
        aligned, hidden = projected[:, : self.num_heads], projected[:, self.num_heads :]
        hidden = self.act(hidden + self.up.bias.float()[:, None, None])
        aligned = aligned + torch.einsum("hm,bmqk->bhqk", self.down.weight.float(), hidden)
        return aligned + self.out_bias.float()[:, None, None]


class LiSASubstitute(nn.Module):
    """What replaces a shared layer's ``q_proj``/``k_proj``: the head alignment and the low-rank rotary Q/K.

    It holds the trainable modules (``align``, ``q_lowrank``, ``k_lowrank``) and what the layer's geometry fixes
    (layout, rank, rotary frequencies, whether the next layer reads this layer's logits). :meth:`attend` is the
    shared layer's attention; the caller hands it the frozen ``v_proj``/``o_proj`` it keeps.
    """

    def __init__(
        self,
        layout: AttentionLayout,
        hidden_size: int,
        *,
        layer_idx: int,
        rank: int,
        align_hidden: int,
        align_activation: str,
        rotary_frequencies: str,
        hands_on: bool,
        carrier: LogitsCarrier,
        init_permutation: Optional[list[int]] = None,
        head_mixing: str = "full",
    ) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.layout = layout
        self.rank = rank
        self.hands_on = hands_on  # the next layer shares too and reads this layer's logits S_l
        self.frequency_index = lowrank_frequency_index(
            layout.rotary_width if layout.uses_rotary else 0, rank, rotary_frequencies
        )
        # Columns of the layer's own cos/sin (its rotary width, its layout) that the rank-r query/key rotate with;
        # none for a layer without rotary.
        self.rotary_columns = lowrank_rotary_columns(layout, rank, rotary_frequencies)
        group_map = None
        if head_mixing == "kv_group":
            permutation = init_permutation or list(range(layout.num_heads))
            group_map, init_permutation = kv_group_alignment(permutation, layout.num_kv_heads)
        self.align = HeadAlign(layout.num_heads, align_hidden, align_activation, init_permutation, group_map)
        self.q_lowrank = nn.Linear(hidden_size, layout.num_heads * rank, bias=False)  # Wq_r
        self.k_lowrank = nn.Linear(hidden_size, layout.num_kv_heads * rank, bias=False)  # Wk_r
        # A plain attribute, not a submodule: the carrier holds no parameters and is shared by the model's layers.
        self.carrier = carrier

    def reset_lowrank(self, mode: str) -> None:
        """``"zero"``: the query factor starts at zero, so the delta is exactly zero (step 3); ``"random"``: small."""
        nn.init.normal_(self.k_lowrank.weight, std=1.0 / math.sqrt(self.k_lowrank.in_features))
        if mode == "zero":
            nn.init.zeros_(self.q_lowrank.weight)
        else:
            nn.init.normal_(self.q_lowrank.weight, std=0.1 / math.sqrt(self.q_lowrank.in_features))

    def lowrank_query_key(
        self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Step 3: the rank-r rotary query (B x H x T x r) and key (B x H_kv x T x r) of the layer input.

        They rotate with frequencies of the cos/sin the layer itself receives (Gemma 3's sliding and full layers get
        different ones), on ``2 len(rotary_columns)`` of their r dims; not at all in a layer without rotary.
        """
        batch, q_len, _ = hidden_states.shape
        x = hidden_states.to(self.q_lowrank.weight.dtype)
        q_small = self.q_lowrank(x).view(batch, q_len, self.layout.num_heads, self.rank).transpose(1, 2)
        k_small = self.k_lowrank(x).view(batch, q_len, self.layout.num_kv_heads, self.rank).transpose(1, 2)
        if not self.rotary_columns or position_embeddings is None:
            return q_small, k_small
        cos_r, sin_r = self.carrier.lowrank_rotary(position_embeddings, self.rotary_columns)
        cos_r, sin_r = cos_r.to(x.dtype), sin_r.to(x.dtype)
        return apply_partial_rotary(q_small, cos_r, sin_r), apply_partial_rotary(k_small, cos_r, sin_r)

    def project(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        value_proj: Callable[[torch.Tensor], torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The rank-r rotary query (B x H x T x r) and key (B x H_kv x T x r) of step 3, and the values
        (B x H_kv x T x d_h) of ``value_proj``."""
        q_small, k_small = self.lowrank_query_key(hidden_states, position_embeddings)
        return q_small, k_small, self.values(hidden_states, value_proj)

    def values(self, hidden_states: torch.Tensor, value_proj: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The values of ``value_proj`` per KV head: B x H_kv x T x d_h."""
        batch, q_len, _ = hidden_states.shape
        value = value_proj(hidden_states).view(batch, q_len, self.layout.num_kv_heads, self.layout.head_dim)
        return value.transpose(1, 2)

    def logits(self, source_rows: torch.Tensor, q_rows: torch.Tensor, k_small: torch.Tensor) -> torch.Tensor:
        """Steps 2-4: ``S_l = align(S_{l-1}) + Q_r K_r^T / sqrt(r)`` for a block of queries, before the mask.

        source_rows: B x H x T_block x T_k, q_rows: B x H x T_block x r, k_small: B x H_kv x T_k x r. Without
        autograd the low-rank term is added in place.
        """
        aligned = self.align(source_rows)  # B x H x T_block x T_k, float32, a new tensor (added to in place below)
        lowrank = grouped_product(q_rows * self.rank**-0.5, k_small)  # B x H x T_block x T_k, the model's dtype
        return aligned + lowrank.float() if torch.is_grad_enabled() else aligned.add_(lowrank)

    def attend(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: Optional[torch.Tensor],
        value_proj: Callable[[torch.Tensor], torch.Tensor],
        output_proj: nn.Module,
        *,
        cache: Any = None,
        cache_kwargs: Optional[dict] = None,
        dropout: float = 0.0,
        query_block_size: int = QUERY_BLOCK_SIZE,
    ) -> torch.Tensor:
        """The shared layer's attention output ``softmax(S_l + M) V W_o`` (steps 1-5), B x T_q x hidden.

        Its cache holds the rank-r rotary keys K_r (B x H_kv x T x r) and the values. ``cache_kwargs`` are the
        keyword arguments the decoder layer passed its attention; those meant for the cache are handed on to it.
        """
        cache_kwargs = {k: v for k, v in (cache_kwargs or {}).items() if k not in ("position_ids", "use_cache")}
        batch, q_len, _ = hidden_states.shape
        q_small, k_small, value = self.project(hidden_states, position_embeddings, value_proj)
        k_small, value, attention_mask = update_cache(
            cache, k_small, value, self.layer_idx, cache_kwargs, attention_mask
        )

        # Step 1: the logits layer l-1 actually used (reconstructed ones if it is shared too).
        source = self.carrier.take(self.layer_idx - 1)  # B x H x T_q x T_k
        # A sliding-window layer caches the last keys of its window; its source (a full layer) all of them: it reads
        # the source's logits of its own keys, the last k_len of those the cache holds.
        source, k_small, value, attention_mask = keys_by_position(
            source, cache, self.layer_idx, k_small, value, attention_mask
        )
        k_len = k_small.shape[-2]
        if source.shape[-2] != q_len or source.shape[-1] < k_len or source.shape[0] != batch:
            raise RuntimeError(
                f"LiSA layer {self.layer_idx}: logits of layer {self.layer_idx - 1} have shape "
                f"{tuple(source.shape)}, expected (batch={batch}, heads, {q_len}, >= {k_len}). The source layer must "
                "see at least the keys the shared layer sees."
            )
        # A short input on CPU: its logits computed whole and handed on whole (handed_logits_max_keys).
        handed = not torch.is_grad_enabled() and value.device.type == "cpu" and k_len <= handed_logits_max_keys()
        route = self._decode_rows_route(source, value, attention_mask, dropout, handed)
        if route is not None:
            # Materialized source rows (decode steps) on CPU: steps 2-5 in one call of the kernel's decode rows
            # (docs/method.md, "Decoding"); the mixed logits come back only where they are handed on.
            kernel, kernel_mask_rows = route
            attn_output, rows = decode_rows(
                kernel,
                q_small * self.rank**-0.5,
                k_small,
                value,
                kernel_mask_rows,
                handed=source.rows(slice(None), k_len),
                mix=self.align.mixing(),
                hand_on=self.hands_on,
            )
            logits = MaterializedLogits(rows) if self.hands_on else None
        elif self.align.hidden == 0 and isinstance(source, FoldedScores) and not handed:
            # Steps 2-5 in one fused attention call: P S_{l-1} + Q_r K_r^T stays a product of queries and keys.
            logits = source.mixed(self.align.mixing(), self.align.group_map)
            del source  # the previous layer's queries are no longer needed: free them before attending
            logits = logits.with_lowrank(q_small, k_small, self.rank**-0.5)
            attn_output = logits.attend(attention_mask, value, dropout)  # B x T_q x (H d_h)
        else:
            logits = ChainedLogits(self.logits, source, q_small, k_small)
            if handed or q_len <= query_block_size:  # a short input, or one block: computed once, used, handed on
                logits = MaterializedLogits(logits.rows(slice(None), k_len))
                del source  # the source's logits are no longer needed: free them before attending
            attn_output = self._attend_by_blocks(logits, attention_mask, value, dropout, query_block_size)
        if self.hands_on:
            self.carrier.put(self.layer_idx, logits)
        if self.carrier.observers:
            self.carrier.observe(
                SharedLayerCall(
                    self.layer_idx, logits.rows(slice(None), k_len), attention_mask, hidden_states, position_embeddings
                )
            )
        return output_proj(attn_output.to(hidden_states.dtype))

    def _decode_rows_route(
        self,
        source: SourceLogits,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        dropout: float,
        short_input: bool,
    ) -> Optional[tuple[CPUKernel, Optional[torch.Tensor]]]:
        """The CPU kernel and its mask where this call may attend through its decode rows: materialized source logits
        of a decode step or of a short input (``short_input``: at most ``handed_logits_max_keys()`` keys), the linear
        alignment, nobody observing, and :func:`~peft_lisa.tuner.cpu_kernel.decode_rows_route`; else None. (Longer
        inputs with materialized logits, after a softcapped source or an FFN-aligned link, keep torch's batched
        products.)"""
        decoding = source.shape[-2] <= EXPLICIT_SOURCE_MAX_QUERIES
        if not isinstance(source, MaterializedLogits) or not (decoding or short_input):
            return None
        if self.align.hidden != 0 or dropout > 0.0 or self.carrier.observers:
            return None
        return decode_rows_route(value, attention_mask)

    @staticmethod
    def _attend_by_blocks(
        logits: SourceLogits,
        attention_mask: Optional[torch.Tensor],
        value: torch.Tensor,
        dropout: float,
        query_block_size: int,
    ) -> torch.Tensor:
        """``softmax(S + M) V`` one block of queries at a time -> B x T_q x (H d_h): the alignment FFN's
        B x m x block x T_k activations and the block's logits are the largest tensors. The alignment never mixes
        positions, so blocks are independent."""
        q_len, k_len = logits.shape[-2], value.shape[-2]
        output_blocks = []
        for start in range(0, q_len, query_block_size):
            rows = slice(start, min(start + query_block_size, q_len))
            mask = additive_mask_rows(attention_mask, rows, q_len, k_len, value.device)  # B x 1 x T_block x T_k
            output_blocks.append(attend_from_logits(logits.rows(rows, k_len), mask, value, dropout, dropout > 0))
        return torch.cat(output_blocks, dim=1) if len(output_blocks) > 1 else output_blocks[0]


def check_attn_implementation(attn: nn.Module) -> str:
    """The model's attention implementation, if LiSA can read its masks; a clear error otherwise."""
    implementation = attn.config._attn_implementation or "eager"
    if implementation not in SUPPORTED_ATTN_IMPLEMENTATIONS:
        # Shared layers read the eager/sdpa mask format; flash/flex masks would be misread.
        raise UnsupportedModelError(
            f"LiSA layers need the 'eager' or 'sdpa' attention implementation, but the model now uses "
            f"{implementation!r}: call model.set_attn_implementation('sdpa')."
        )
    return implementation


def family_eager_attention(attn: nn.Module) -> Callable:
    """The eager kernel of the layer's own modeling file (Gemma 2's applies softcapping); Llama's otherwise."""
    function = getattr(attn, "lisa_eager_attention", None)
    if function is None:
        function = getattr(sys.modules.get(type(attn).__module__), "eager_attention_forward", None)
    return function or eager_attention_forward


def source_attention(
    attn: nn.Module,
    carrier: Optional[LogitsCarrier],
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    attention_mask: Optional[torch.Tensor],
    cache: Any,
    kwargs: dict,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """A full layer ``attn`` whose logits S_l = softcap(scale Q_l K_l^T) feed the next (shared) layer.

    On prefill it attends exactly as the base layer does, with the model's own attention implementation and the
    keyword arguments the base layer hands it (scaling, sliding window, softcap), and hands on its rotary query and
    key: the shared layer computes S_l from them one block of queries at a time, so no T_q x T_k tensor is handed on.
    With at most ``EXPLICIT_SOURCE_MAX_QUERIES`` queries (decoding) it computes S_l once, attends from it and hands
    it on.

    With ``carrier=None`` the layer hands nothing on (a merged model's full layer that feeds no shared layer): it
    attends as the base layer does, except that its decode steps on CPU run through the kernel's decode rows without
    keeping their logits, as a source layer's do (``docs/method.md``, "Decoding").
    """
    implementation = check_attn_implementation(attn)
    layout = AttentionLayout.from_attention(attn)
    batch, q_len, _ = hidden_states.shape
    query, key, value = project_full_qkv(attn, hidden_states, position_embeddings, layout)
    key, value, attention_mask = update_cache(cache, key, value, attn.layer_idx, kwargs, attention_mask)
    dropout = getattr(attn, "attention_dropout", 0.0) if attn.training else 0.0
    decoding = q_len <= EXPLICIT_SOURCE_MAX_QUERIES
    route = decode_rows_route(value, attention_mask) if decoding and dropout == 0.0 else None
    if route is not None and carrier is None:  # on CPU, a decode step of a layer that hands nothing on
        kernel, kernel_mask_rows = route
        attn_output, _ = decode_rows(
            kernel, query * layout.scaling, key, value, kernel_mask_rows, softcap=layout.softcap, hand_on=False
        )
        return attn.o_proj(attn_output.to(hidden_states.dtype)), None
    if decoding and carrier is not None:
        # Decoding: a single row of logits is cheaper to compute once, use here and hand on, than to have the shared
        # layer recompute Q K^T over the whole key cache (measured ~5% per decode step on SmolLM2, batch 8 x 2048).
        if route is not None:  # on CPU: one call of the kernel's decode rows (docs/method.md, "Decoding")
            kernel, kernel_mask_rows = route
            attn_output, logits = decode_rows(
                kernel, query * layout.scaling, key, value, kernel_mask_rows, softcap=layout.softcap
            )
        else:
            logits = softcap_logits(grouped_scores(query, key, layout.scaling), layout.softcap)  # B x H x T_q x T_k
            mask = additive_mask_rows(attention_mask, slice(None), q_len, logits.shape[-1], logits.device)
            attn_output = attend_from_logits(logits, mask, value, dropout, attn.training)
        carrier.put(attn.layer_idx, MaterializedLogits(logits))
        return attn.o_proj(attn_output.to(hidden_states.dtype)), None
    if carrier is not None:
        handed = (
            FoldedScores.from_query_key(query, key, layout.scaling)
            if layout.softcap is None
            else ScoresFromQueryKey(query, key, layout.scaling, layout.softcap)
        )
        carrier.put(attn.layer_idx, handed)
    attention = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, family_eager_attention(attn))
    if layout.softcap is not None:
        kwargs = {**kwargs, "softcap": layout.softcap}
    attn_output, attn_weights = attention(
        attn,
        query,
        key,
        value,
        attention_mask,
        dropout=dropout,
        scaling=layout.scaling,
        sliding_window=layout.sliding_window,
        **kwargs,
    )  # B x T_q x H x d_h
    return attn.o_proj(attn_output.reshape(batch, q_len, -1)), attn_weights
