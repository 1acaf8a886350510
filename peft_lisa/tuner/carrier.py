"""How one layer's pre-softmax logits reach the next, shared, layer within a forward pass (step 1 of
``docs/method.md``)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Optional

import torch

from .cpu_kernel import CPUKernel, kernel_mask, process_kernel, shared_attention
from .functional import (
    additive_mask_rows,
    batched_matmul,
    fused_attention,
    grouped_attend,
    grouped_product,
    grouped_scores,
    lowrank_rotary,
    softcap_logits,
)

# Inference (no autograd) on CPU attends through the compiled kernel (cpu_kernel.py). Where that is off or cannot be
# built, it computes a shared layer's logits explicitly, a small block of queries at a time, when the fused call
# would be at least this many times wider than the values: with head_mixing="full" on a GQA model the
# fused head size is H_kv d_h + r, and a fused kernel pays that width twice (Q K^T and the zero-padded A V) where the
# explicit logits pay d_h for Q K^T, 2H for the P mixing (one GEMM over the head axis) and d_h for A V. Measured on
# SmolLM2 shapes (1 x 2048 tokens, one CPU thread, `python examples/attention_core.py`): full mixing, fused head
# size 200, 274 ms; explicit blocks 151 ms; the base's sdpa 89 ms; kv_group's fused head size 72: 112 ms, explicit
# 153 ms (it stays fused). Training keeps the fused call, whose backward needs no T_q x T_k tensor either. On the
# Zen 5 CPU, since a part that reads one key head is multiplied at its own width (FoldedScores.rows): full explicit
# 70 ms against sdpa 60 ms; kv_group explicit 64 ms against fused 70 ms with one thread, equal with two (it stays
# fused: not measured end to end).
EXPLICIT_MIN_WIDENING = 2.0
# The widest head size of torch's flash attention kernel (CUDA): a wider fused call falls back to the math kernel,
# which holds the T_q x T_k logits of all heads in float32. On an accelerator such a shared layer (the end of a long
# chain under head_mixing="full") attends by explicit blocks of about EXPLICIT_BLOCK_BYTES_ACCELERATOR of logits.
FUSED_MAX_HEAD_DIM = 256
EXPLICIT_BLOCK_BYTES_ACCELERATOR = 64 * 2**20
# Query rows per block of the explicit path: its B x H x rows x T_k float32 logits are the largest tensors of a block.
EXPLICIT_QUERY_BLOCK = 64
# ... and at least this many (sequence, query) rows per block for blocks of EXPLICIT_MIN_ROWS_KEYS keys: a block of
# one sequence of 256-1024 tokens takes 128 queries. Every block costs about 10 tensor operations whatever its size,
# and with batch 1 those dominate short prefills. Measured on SmolLM2 with 2 threads (in-process A/B, the base
# alternating with both; docs/benchmark/prefill_variants): batch 1 in bf16, 64 against 128 queries, 0.94x against
# 0.98x of the base at 512 tokens. At 2048 keys it changed nothing beyond the spread (fp32 0.89x against 0.90x); at
# 2048 and at 128 (0.89x against 0.93x in bf16) its larger buffers raised the peak tensors of a batch-1 prefill above
# the base's (5.2 against 4.5 MiB at 1 x 128). A larger block also computes more masked logits on its diagonal, so 8
# sequences keep 64 queries (8 x 512: 1.10x against 1.07x with 128).
EXPLICIT_MIN_BLOCK_ROWS = 128
EXPLICIT_MIN_ROWS_KEYS = (256, 1024)
# ... for as many sequences as give at most this many keys (one sequence of 2048 tokens, 8 of 512, 32 of 128).
EXPLICIT_BLOCK_KEYS = 4096


class LogitsCarrier:
    """Hands the pre-softmax logits of one wrapped layer to the next within a forward pass (``docs/method.md`` step 1).

    A model owns exactly one carrier, shared by its wrapped attention modules. It holds :class:`SourceLogits` keyed
    by the index of the layer that produced them: a full layer's rotary query/key (the logits are computed block by
    block by the reader), or the logits a shared layer reconstructed when the next layer shares too. Without
    autograd the reader pops them at once. With autograd they stay until the model's next forward clears the
    carrier: the backward pass keeps them alive anyway, and gradient checkpointing re-runs a shared layer, which
    must read them again.
    """

    def __init__(self) -> None:
        self._logits: dict[int, SourceLogits] = {}
        self.observers: list[Callable[[SharedLayerCall], None]] = []
        self._rotary: dict[tuple, tuple[torch.Tensor, ...]] = {}

    def lowrank_rotary(
        self, position_embeddings: tuple[torch.Tensor, torch.Tensor], columns: tuple[int, ...]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`lowrank_rotary`, computed once per forward pass for all shared layers that get the same cos/sin."""
        cos = position_embeddings[0]
        key = (id(cos), columns)
        cached = self._rotary.get(key)
        if cached is None or cached[0] is not cos:
            cached = (cos, *lowrank_rotary(position_embeddings, columns))  # holds cos, so its id cannot be reused
            if len(self._rotary) >= 8:  # callers outside a forward pass (calibration) never clear: keep a few
                self._rotary.pop(next(iter(self._rotary)))
            self._rotary[key] = cached
        return cached[1], cached[2]

    def put(self, layer_idx: int, logits: SourceLogits) -> None:
        self._logits[layer_idx] = logits

    def observe(self, call: SharedLayerCall) -> None:
        """Hand a shared layer's call to the observers (e.g. attention distillation); no-op without any."""
        for observer in self.observers:
            observer(call)

    def take(self, layer_idx: int) -> SourceLogits:
        if layer_idx not in self._logits:
            raise RuntimeError(
                f"LiSA: layer {layer_idx + 1} shares attention but layer {layer_idx} handed it no logits in this "
                "forward pass. Decoder layers must run in order within one forward call."
            )
        if torch.is_grad_enabled():
            return self._logits[layer_idx]
        return self._logits.pop(layer_idx)

    def clear(self) -> None:
        self._logits.clear()
        self._rotary.clear()


class SourceLogits:
    """The logits S_{l-1} a shared layer reads (``docs/method.md`` step 1), one block of queries at a time.

    ``shape`` is B x H x T_q x T_k; ``rows(rows, keys)`` gives the float32 logits of those queries against the last
    ``keys`` keys (all when None), B x H x len(rows) x keys: a sliding-window layer sharing from a full one caches
    only the last keys of its window, the full layer all of them.
    """

    shape: torch.Size

    def rows(self, rows: slice, keys: Optional[int] = None) -> torch.Tensor:
        raise NotImplementedError

    def first_keys(self, keys: int) -> SourceLogits:
        """These logits against their first ``keys`` keys alone (views, no copy): a static cache's full layers return
        all their slots, the empty ones after the tokens held included."""
        raise NotImplementedError


class MaterializedLogits(SourceLogits):
    """Logits held as one tensor: those a shared layer reconstructed and hands on to the next shared layer."""

    def __init__(self, logits: torch.Tensor) -> None:
        self.logits, self.shape = logits, logits.shape

    def rows(self, rows: slice, keys: Optional[int] = None) -> torch.Tensor:
        logits = self.logits[:, :, rows]
        return logits if keys is None or keys == logits.shape[-1] else logits[..., -keys:]

    def first_keys(self, keys: int) -> MaterializedLogits:
        return MaterializedLogits(self.logits[..., :keys])


class ScoresFromQueryKey(SourceLogits):
    """A full layer's logits ``scale Q K^T`` (softcapped as the layer's kernel does, if it does), kept as its rotary
    query and key and computed block by block on demand.

    The full layer itself attends with the model's own kernel (sdpa or eager), so no T_q x T_k tensor is handed
    between the layers.
    """

    def __init__(
        self, query: torch.Tensor, key: torch.Tensor, scaling: float, softcap: Optional[float] = None
    ) -> None:
        # query: B x H x T_q x d_h, key: B x H_kv x T_k x d_h (cached keys included)
        self.query, self.key, self.scaling, self.softcap = query, key, scaling, softcap
        self.shape = torch.Size((query.shape[0], query.shape[1], query.shape[2], key.shape[2]))

    def rows(self, rows: slice, keys: Optional[int] = None) -> torch.Tensor:
        key = self.key if keys is None or keys == self.key.shape[2] else self.key[:, :, -keys:]
        return softcap_logits(grouped_scores(self.query[:, :, rows], key, self.scaling), self.softcap)

    def first_keys(self, keys: int) -> ScoresFromQueryKey:
        return ScoresFromQueryKey(self.query, self.key[:, :, :keys], self.scaling, self.softcap)


class BlockBuffers:
    """Reusable memory for the explicit logits of one block of queries (:meth:`FoldedScores.attend_by_blocks`).

    A block's logits are megabytes (B' x H x 64 x T_k float32: 4.7 MB at 2048 keys on SmolLM2); allocated afresh for
    every block, the allocator hands them back to the system and the next block pays page faults and zero-filling
    for them again (about 4,400 page faults and 10 ms of kernel time per shared layer at 1 x 2048 with 2 threads).
    Two slots of ``numel`` float32 elements each, written again by every block, hold a block's tensors in turn:
    ``"scores"``, a source's float32 scores before their mixing, then the probabilities for ``A V`` (in the values'
    dtype); ``"logits"``, the product ``q k^T`` in the model's dtype when that is not float32 (copied into
    ``"scores"``), then the mixed float32 logits, masked and soft-maxed in place."""

    def __init__(self, device: torch.device, numel: int) -> None:
        self.device, self.numel = device, numel
        self._slots: dict[str, torch.Tensor] = {}

    def take(self, slot: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A ``dtype`` tensor of ``shape`` (at most ``numel`` float32 elements' bytes) over ``slot``'s memory,
        holding whatever was written there last."""
        memory = self._slots.get(slot)
        if memory is None:
            memory = self._slots[slot] = torch.empty(self.numel * 4, dtype=torch.uint8, device=self.device)
        return memory[: dtype.itemsize * math.prod(shape)].view(dtype).view(shape)


@dataclass(eq=False)
class FoldedPart:
    """One term ``sum_g mix[h, g] q[g] k[kv(g)]^T`` of :class:`FoldedScores`: queries B x H x T_q x D, keys
    B x H_k x T_k x D (H_k is 1, one key for every head, or the number of KV heads: query head g reads key head
    ``g // (H / H_k)``), the H x H head mixing still to apply to the queries (None: none yet) and a scale (the
    layer's ``scaling``; kept apart so that the queries are the layer's own tensor, not a scaled copy of it).

    ``key_index`` records that the mixing is block-structured (``head_mixing="kv_group"``): the query heads of KV group
    j mix only query heads that read key head ``key_index[j]``, so they need that key head alone. None: any head may
    mix any other (``"full"``), so a head's mixed query is laid out against all key heads side by side.
    """

    query: torch.Tensor
    key: torch.Tensor
    mix: Optional[torch.Tensor] = None
    key_index: Optional[list[int]] = None
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.mix is None and self.key_index is None:
            self.key_index = list(range(self.key.shape[1]))  # unmixed: group j reads its own key head

    def mixed(self, permute: torch.Tensor, group_map: Optional[list[int]]) -> FoldedPart:
        """This part under ``P`` (composed with the mixing it already has; no tensor of queries is touched)."""
        mix = self.scale * (permute if self.mix is None else permute @ self.mix)
        key_index = None
        if group_map is not None and self.key_index is not None and len(group_map) == len(self.key_index):
            key_index = [self.key_index[source] for source in group_map]
        return FoldedPart(self.query, self.key, mix, key_index)

    @property
    def fused_dim(self) -> int:
        """This part's share of the fused head size."""
        spread = self.key.shape[1] > 1 and self.key_index is None
        return self.query.shape[-1] * (self.key.shape[1] if spread else 1)

    def fused(self, num_kv_heads: int, keys: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This part's share of one fused attention call over all heads: the mixed and scaled queries
        (B x H x T_q x D') and their keys, the last ``keys`` of them, per KV head of the values
        (B x num_kv_heads x T_k x D'). D' is :attr:`fused_dim`; a fully mixed part lays a head's queries against all
        key heads side by side (:meth:`spread_query`), so that its key, all key heads side by side, serves every
        query head."""
        query, key = self.query, self.key_heads_read(self.key[:, :, -keys:])
        batch, key_heads = key.shape[:2]
        if self.mix is None:
            query = self.mixed_query(query)
        elif key_heads == 1 or self.key_index is not None:  # each query head reads one key head: mix the queries
            query = self.mixed_query(query).to(key.dtype)
        else:
            query = self.spread_query(slice(None)).to(key.dtype)  # B x H x T_q x H_k D
            key = key.transpose(1, 2).reshape(batch, 1, keys, -1)  # B x 1 x T_k x H_k D
        if key.shape[1] != num_kv_heads:
            key = key.expand(batch, num_kv_heads, *key.shape[2:])
        return query, key

    @property
    def spread_width(self) -> int:
        """Head size of this part laid against all its key heads side by side (:meth:`spread_query`)."""
        return self.key.shape[1] * self.query.shape[-1]

    def spread_query(self, rows: slice) -> torch.Tensor:
        """Queries ``rows`` of every head, mixed and scaled, laid against all key heads side by side:
        B x H x len(rows) x (H_k D) float32, with zeros where a head reads no query of a key head's group. Against
        :meth:`spread_key` one product gives this part's mixed logits, with no pass over them for the mixing."""
        query = self.query[:, :, rows].float()
        batch, num_heads, q_len, dim = query.shape
        key_heads = self.key.shape[1]
        size = num_heads // key_heads
        mix = self.mixing()
        grouped = query.view(batch, key_heads, size, q_len, dim)
        spread = torch.einsum("hji,bjitd->bhtjd", mix.view(num_heads, key_heads, size), grouped)
        return spread.reshape(batch, num_heads, q_len, key_heads * dim)

    def mixing(self) -> torch.Tensor:
        """The H x H float32 mixing of this part's per-head scores, the scale included (unmixed: the scaled
        identity, head g reads its own key head)."""
        if self.mix is None:
            return torch.eye(self.query.shape[1], device=self.query.device) * self.scale
        return self.mix.float()

    def kernel_term(self, keys: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This part, whose query heads each read one key head (a link's own rank-r term, or an earlier link's under
        ``head_mixing="kv_group"``), as a term of the CPU kernel (``cpu_kernel.shared_attention``): its mixed and
        scaled queries B x H x T_q x W, float32, against the key heads they read, the last ``keys`` of them,
        B x H_k x T_k x W."""
        return self.mixed_query(self.query.float()), self.key_heads_read(self.last_keys(keys))

    def spread_key(self, keys: int) -> torch.Tensor:
        """The last ``keys`` keys of all key heads side by side, B x T_k x (H_k D) float32."""
        key = self.key[:, :, -keys:].float()
        batch, key_heads, k_len, dim = key.shape
        return key.transpose(1, 2).reshape(batch, k_len, key_heads * dim)

    def mixed_query(self, query: torch.Tensor) -> torch.Tensor:
        """``query`` (B x H x T x D, this part's queries or some of their rows) under this part's mixing and scale,
        for a part whose query heads each read one key head: scaled when unmixed, else mixed in float32
        (block-structured under kv_group: head h of KV group j mixes only heads that read ``key_index[j]``, the
        zeros of ``HeadAlign.mixing()`` outside its blocks)."""
        if self.mix is None:
            return query * self.scale
        return torch.einsum("hg,bgtd->bhtd", self.mix.float(), query.float())

    def key_heads_read(self, key: torch.Tensor) -> torch.Tensor:
        """``key`` (B x H_k x T_k x D, this part's keys or a slice of them) with KV group j's key head
        ``key_index[j]`` in place j (as it is when ``key_index`` is None or the identity)."""
        if self.key_index is None or self.key_index == list(range(key.shape[1])):
            return key
        return key[:, self.key_index]

    def last_keys(self, keys: int, stop: Optional[int] = None) -> torch.Tensor:
        """The last ``keys`` of this part's keys (the first ``stop`` of those, when given): B x H_k x keys (or
        stop) x D."""
        key = self.key[:, :, -keys:]
        return key if stop is None else key[:, :, :stop]

    def scores(
        self, rows: slice, keys: int, stop: Optional[int] = None, buffers: Optional[BlockBuffers] = None
    ) -> torch.Tensor:
        """This part's float32 logits ``q k^T``, before its mixing, of queries ``rows`` against the last ``keys``
        keys (the first ``stop`` of them, when given): B x H x len(rows) x keys (or stop), in ``buffers`` when
        given."""
        query, key = self.query[:, :, rows], self.last_keys(keys, stop)
        if buffers is None:
            return grouped_scores(query, key, self.scale)  # B x H x T_block x T_k
        shape = (*query.shape[:-1], key.shape[2])
        if query.dtype == torch.float32:
            return grouped_product(query * self.scale, key, out=buffers.take("scores", shape))
        product = grouped_product(query * self.scale, key, out=buffers.take("logits", shape, query.dtype))
        return buffers.take("scores", shape).copy_(product)


class FoldedScores(SourceLogits):
    """Logits kept as queries and keys, never as a T_q x T_k tensor (``docs/method.md``, "Fused attention of a
    shared layer"): ``S = sum_i mix_i (q_i k_i^T)`` over :class:`FoldedPart` s.

    A full layer's logits ``scale Q K^T`` are one part. A linear alignment ``P S`` and
    a low-rank term ``Q_r K_r^T`` keep this form: :meth:`mixed` composes ``P`` with each part's mixing (H x H, no
    tensor of queries is touched) and :meth:`with_lowrank` appends a part. :meth:`attend` either mixes the queries of
    one KV group at a time and runs them through fused attention calls of head size ``sum_i D_i`` (a part whose mixing
    may reach every key head counts ``H_kv D_i``; :meth:`attend_fused`), or, in inference when that head size is wide,
    computes the logits explicitly a block of queries at a time (:meth:`attend_by_blocks`). A chain of shared layers
    thus holds only its source's queries and the rank-r queries of its links, never the mixed queries of a link.
    """

    def __init__(self, parts: list[FoldedPart]) -> None:
        self.parts = parts
        query, key = parts[0].query, parts[0].key
        self.shape = torch.Size((query.shape[0], query.shape[1], query.shape[2], key.shape[2]))

    @classmethod
    def from_query_key(cls, query: torch.Tensor, key: torch.Tensor, scaling: float) -> FoldedScores:
        """A full layer's logits ``scaling Q K^T``: query B x H x T_q x d_h, key B x H_kv x T_k x d_h."""
        return cls([FoldedPart(query, key, scale=scaling)])

    @property
    def head_dim(self) -> int:
        """Head size of the fused attention call: ``sum_i D_i``, ``H_kv D_i`` for a fully mixed part."""
        return sum(part.fused_dim for part in self.parts)

    def mixed(self, permute: torch.Tensor, group_map: Optional[list[int]] = None) -> FoldedScores:
        """``P S`` for an H x H matrix ``P`` (the linear head alignment), still folded. ``group_map``
        (``head_mixing="kv_group"``): head h of KV group j mixes only the heads of key head ``group_map[j]``."""
        return FoldedScores([part.mixed(permute, group_map) for part in self.parts])

    def with_lowrank(self, q_small: torch.Tensor, k_small: torch.Tensor, scaling: float) -> FoldedScores:
        """``S + scaling Q_r K_r^T`` (q_small B x H x T_q x r, k_small B x H_kv x T_k x r), still folded."""
        return FoldedScores([*self.parts, FoldedPart(q_small, k_small, scale=scaling)])

    def rows(
        self,
        rows: slice,
        keys: Optional[int] = None,
        stop: Optional[int] = None,
        narrow_key: Optional[torch.Tensor] = None,
        buffers: Optional[BlockBuffers] = None,
    ) -> torch.Tensor:
        """The float32 logits of queries ``rows`` against the last ``keys`` keys (the first ``stop`` of them, when
        given), B x H x len(rows) x keys (or stop), in ``buffers`` when given, each part at the least width it
        needs:

        * a part whose query heads each read one key head (unmixed, like a link's rank-r term, or mixed within KV
          groups): its mixed queries against their key heads, the GQA product (``2 H D`` per query-key pair);
        * a fully mixed part no wider than the source's head size when laid against all key heads (a chain's
          earlier rank-r links): folded into one product of :meth:`FoldedPart.spread_query` against their keys
          side by side (``narrow_key``: :meth:`narrow_key`, when the caller keeps it for several blocks);
        * a wider fully mixed part (the source under ``head_mixing="full"`` with several KV heads): its scores at
          its own head size, mixed by one GEMM over the head axis, ``total += mix @ scores``
          (H x H @ B x H x (T_block T_k)).

        Each product after the first accumulates into the same tensor (``baddbmm_``)."""
        keys = self.shape[-1] if keys is None else keys
        batch, heads = self.shape[0], self.shape[1]
        logits_shape = (batch, heads, len(range(*rows.indices(self.shape[2]))), keys if stop is None else stop)
        out = None if buffers is None else buffers.take("logits", logits_shape)
        one_key_head, narrow, wide = self._parts_by_layout()
        total = None
        for part in wide:  # a later wide part's scores in their own tensor: the "logits" slot holds the total
            scores = part.scores(rows, keys, stop, buffers if total is None else None)
            q_len, k_len = scores.shape[2:]
            mix = part.mix.float().expand(batch, heads, heads)
            flat = scores.view(batch, heads, q_len * k_len)
            accumulate = None if total is None else total.view(batch, heads, q_len * k_len)
            total = batched_matmul(mix, flat, accumulate, None if out is None else out.view(batch, heads, -1))
        for part in one_key_head:
            query = part.mixed_query(part.query[:, :, rows].float())  # B x H x T_block x D
            key = part.key_heads_read(part.last_keys(keys, stop)).float()
            total = grouped_product(query, key, total, out if total is None else None)  # B x H x T_block x T_k
        if narrow:
            query = torch.cat([part.spread_query(rows) for part in narrow], dim=-1)  # B x H x T_block x W
            key = self.narrow_key(keys) if narrow_key is None else narrow_key  # B x T_k x W
            key = key if stop is None else key[:, :stop]
            q_len, width = query.shape[2:]
            accumulate = None if total is None else total.view(batch, heads * q_len, key.shape[1])
            flat_out = None if out is None or total is not None else out.view(batch, heads * q_len, key.shape[1])
            query = query.reshape(batch, heads * q_len, width)
            total = batched_matmul(query, key.transpose(1, 2), accumulate, flat_out)
        return total.view(batch, heads, -1, total.shape[-1])

    def narrow_key(self, keys: int) -> Optional[torch.Tensor]:
        """The keys of the fully mixed parts :meth:`rows` folds into one product, side by side: B x T_k x W
        float32 (None without such parts)."""
        _, narrow, _ = self._parts_by_layout()
        return torch.cat([part.spread_key(keys) for part in narrow], dim=-1) if narrow else None

    def _parts_by_layout(self) -> tuple[list[FoldedPart], list[FoldedPart], list[FoldedPart]]:
        """The parts whose query heads each read one key head, and the fully mixed ones no wider / wider than the
        source's head size when laid against all key heads (:meth:`rows`)."""
        width = self.parts[0].query.shape[-1]  # the source's head size
        one_key_head = [part for part in self.parts if part.key_index is not None]
        mixed = [part for part in self.parts if part.key_index is None]
        narrow = [part for part in mixed if part.spread_width <= width]
        return one_key_head, narrow, [part for part in mixed if part.spread_width > width]

    def attend(
        self, attention_mask: Optional[torch.Tensor], value: torch.Tensor, dropout: float = 0.0
    ) -> torch.Tensor:
        """``softmax(S + M) V`` -> B x T_q x (H d_v), for values B x H_kv x T_k x d_v.

        With autograd: :meth:`attend_fused`. In inference on CPU, :meth:`attend_by_kernel` (the compiled kernel,
        ``cpu_kernel.py``), kv_group included (``docs/method.md``, "The CPU kernel of a shared layer"). Where the
        kernel is off or cannot be built, :meth:`attend_by_blocks` when the fused head size is at least
        ``EXPLICIT_MIN_WIDENING`` times ``d_v`` (a widely mixed source), in blocks sized for a CPU's cache.
        On an accelerator the fused call, unless its head size is above ``FUSED_MAX_HEAD_DIM`` (no flash kernel
        takes it): then explicit blocks of about ``EXPLICIT_BLOCK_BYTES_ACCELERATOR`` each; the CPU's small blocks
        would be a loop of many small kernels (``docs/benchmark/README.md``, "GPU").
        """
        if torch.is_grad_enabled() or dropout > 0.0:
            return self.attend_fused(attention_mask, value, dropout)
        if value.device.type == "cpu":
            kernel = process_kernel()
            supported, mask = kernel_mask(attention_mask, value.shape[2])
            if kernel is not None and supported:
                return self.attend_by_kernel(kernel, mask, value)
            if self.head_dim >= EXPLICIT_MIN_WIDENING * value.shape[-1]:
                return self.attend_by_blocks(attention_mask, value)
        elif self.head_dim > FUSED_MAX_HEAD_DIM:
            return self.attend_by_blocks(attention_mask, value, block_bytes=EXPLICIT_BLOCK_BYTES_ACCELERATOR)
        return self.attend_fused(attention_mask, value, dropout)

    def attend_by_kernel(
        self, kernel: CPUKernel, mask: Optional[torch.Tensor], value: torch.Tensor, pack: bool = True
    ) -> torch.Tensor:
        """``softmax(S + M) V`` -> B x T_q x (H d_v), in the values' dtype, by the compiled CPU kernel
        (``cpu_kernel.py``): the source and a chain's fully mixed earlier links as per-head scores mixed by their
        H x H matrix; the parts whose query heads each read one key head (a link's own rank-r term, an earlier link's
        under kv_group) as terms, their queries mixed, at their own width (measured at link 6 of a chain, SmolLM2
        shapes, 1 x 2048, 2 threads: full 1.48x the base's sdpa time against 1.65x with the earlier links as terms
        laid against all key heads; kv_group 1.20x against 1.50x as mixed parts). ``mask`` as
        :func:`~peft_lisa.tuner.cpu_kernel.kernel_mask` gives it; ``pack`` as
        :func:`~peft_lisa.tuner.cpu_kernel.shared_attention` takes it."""
        keys = value.shape[2]
        source, *others = self.parts  # the source always as a mixed part, whatever its layout
        mixed = [(source.query, source.last_keys(keys), source.mixing())]
        mixed += [(part.query, part.last_keys(keys), part.mixing()) for part in others if part.key_index is None]
        terms = [part.kernel_term(keys) for part in others if part.key_index is not None]
        return shared_attention(kernel, mixed, terms, value, mask, pack)

    def attend_by_blocks(
        self,
        attention_mask: Optional[torch.Tensor],
        value: torch.Tensor,
        block: Optional[int] = None,
        block_bytes: Optional[int] = None,
    ) -> torch.Tensor:
        """``softmax(S + M) V`` -> B x T_q x (H d_v) from explicit float32 logits, ``block`` queries of a few
        sequences at a time (default :meth:`default_block`; so that a block's logits stay in the CPU's cache; with
        ``block_bytes``, an accelerator's: as many sequences and queries as give about that many bytes of logits, at
        least ``block`` queries, ``EXPLICIT_QUERY_BLOCK`` by default): each part's ``q k^T`` at its own head size, the
        mixing as one GEMM over the head axis, every block's logits in the same buffers (:class:`BlockBuffers`).
        Without a mask (causal, no padding) a block reads only the keys its last query sees and masks only the last
        ``block`` of them."""
        batch, num_heads, q_len, _ = self.shape
        k_len, value_dim = value.shape[-2], value.shape[-1]
        step = max(1, EXPLICIT_BLOCK_KEYS // k_len)  # sequences per block
        if block is None:  # EXPLICIT_QUERY_BLOCK queries, at least EXPLICIT_MIN_BLOCK_ROWS rows
            block = EXPLICIT_QUERY_BLOCK if block_bytes is not None else self.default_block(min(step, batch), k_len)
        if block_bytes is not None:  # as many (sequence, query) rows of logits as fit, whole sequences first
            rows = max(1, block_bytes // (num_heads * k_len * 4))
            step = max(1, min(batch, rows // max(1, min(q_len, block))))
            block = max(block, rows // step)
        output = value.new_empty(batch, q_len, num_heads * value_dim)
        buffers = BlockBuffers(value.device, min(step, batch) * num_heads * min(block, q_len) * k_len)
        for first in range(0, batch, step):
            sequences = slice(first, min(first + step, batch))
            part = self.sequences(sequences)
            narrow_key = part.narrow_key(k_len)  # laid out once for all blocks of these sequences
            mask = None
            if attention_mask is not None:
                mask = attention_mask[sequences] if attention_mask.shape[0] > 1 else attention_mask
            for start in range(0, q_len, block):
                rows = slice(start, min(start + block, q_len))
                logits, stop = part.masked_rows(mask, rows, k_len, narrow_key, buffers)  # B' x H x T_block x stop
                probs = torch.softmax(logits, dim=-1, out=logits)  # in place: no second block
                if probs.dtype != value.dtype:
                    probs = buffers.take("scores", probs.shape, value.dtype).copy_(probs)
                output[sequences, rows] = grouped_attend(probs, value[sequences, :, :stop])
        return output

    @staticmethod
    def default_block(sequences: int, keys: int) -> int:
        """Queries per block on CPU for blocks of ``sequences`` sequences of ``keys`` keys: ``EXPLICIT_QUERY_BLOCK``,
        or, for a number of keys within ``EXPLICIT_MIN_ROWS_KEYS``, more to make ``EXPLICIT_MIN_BLOCK_ROWS``
        (sequence, query) rows."""
        fewest, most = EXPLICIT_MIN_ROWS_KEYS
        if not fewest <= keys <= most:
            return EXPLICIT_QUERY_BLOCK
        return max(EXPLICIT_QUERY_BLOCK, -(-EXPLICIT_MIN_BLOCK_ROWS // sequences))

    def first_keys(self, keys: int) -> FoldedScores:
        return FoldedScores([replace(part, key=part.key[:, :, :keys]) for part in self.parts])

    def sequences(self, sequences: slice) -> FoldedScores:
        """These logits for ``sequences`` of the batch alone (views, no copy)."""
        return FoldedScores(
            [replace(part, query=part.query[sequences], key=part.key[sequences]) for part in self.parts]
        )

    def masked_rows(
        self,
        attention_mask: Optional[torch.Tensor],
        rows: slice,
        k_len: int,
        narrow_key: Optional[torch.Tensor] = None,
        buffers: Optional[BlockBuffers] = None,
    ) -> tuple[torch.Tensor, int]:
        """The logits of queries ``rows`` with the mask applied (B x H x len(rows) x stop, float32, in ``buffers``
        when given) and ``stop``, the keys they cover: without a mask (causal) only the keys up to the block's last
        query, masked in place on the diagonal block; with one, all ``k_len`` keys plus the mask's rows."""
        q_len = self.shape[-2]
        if attention_mask is not None:
            mask = additive_mask_rows(attention_mask, rows, q_len, k_len, self.parts[0].query.device)
            return self.rows(rows, k_len, narrow_key=narrow_key, buffers=buffers).add_(mask), k_len
        stop = k_len - q_len + rows.stop  # the position of the block's last query, + 1: later keys are masked
        logits = self.rows(rows, k_len, stop, narrow_key, buffers)
        size = rows.stop - rows.start
        future = torch.ones(size, size, dtype=torch.bool, device=logits.device).triu_(1)  # T_block x T_block
        logits[..., stop - size :].masked_fill_(future, float("-inf"))
        return logits, stop

    def attend_fused(
        self, attention_mask: Optional[torch.Tensor], value: torch.Tensor, dropout: float = 0.0
    ) -> torch.Tensor:
        """``softmax(S + M) V`` -> B x T_q x (H d_v) as one fused attention call of head size :attr:`head_dim` over
        all heads: each part's mixed queries and its keys (:meth:`FoldedPart.fused`) side by side."""
        num_kv_heads, keys = value.shape[1], value.shape[2]
        queries, key_parts = zip(*(part.fused(num_kv_heads, keys) for part in self.parts), strict=True)
        query = queries[0] if len(queries) == 1 else torch.cat(queries, dim=-1)  # B x H x T_q x D
        key = key_parts[0] if len(key_parts) == 1 else torch.cat(key_parts, dim=-1)  # B x H_kv x T_k x D
        return fused_attention(query, key, value, attention_mask, dropout)


class ChainedLogits(SourceLogits):
    """The logits of a shared layer whose alignment is not linear (or whose source is softcapped), handed to the next
    shared layer without a T_q x T_k tensor: each block of rows is recomputed from the layer's own source on demand.

    ``logits(source_rows, q_rows, k_small)`` is the shared layer's step 2-4 (:meth:`LiSASubstitute.logits`).
    """

    def __init__(
        self,
        logits: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
        source: SourceLogits,
        q_small: torch.Tensor,
        k_small: torch.Tensor,
    ) -> None:
        self.logits, self.source, self.q_small, self.k_small = logits, source, q_small, k_small
        self.shape = torch.Size((*q_small.shape[:3], k_small.shape[2]))

    def rows(self, rows: slice, keys: Optional[int] = None) -> torch.Tensor:
        keys = self.k_small.shape[2] if keys is None else keys
        k_small = self.k_small if keys == self.k_small.shape[2] else self.k_small[:, :, -keys:]
        return self.logits(self.source.rows(rows, keys), self.q_small[:, :, rows], k_small)

    def first_keys(self, keys: int) -> ChainedLogits:
        return ChainedLogits(self.logits, self.source.first_keys(keys), self.q_small, self.k_small[:, :, :keys])


@dataclass
class SharedLayerCall:
    """What a shared layer computed in one call, for observers such as attention distillation.

    ``logits`` are the LiSA logits S_l (B x H x T_q x T_k, float32, before the mask); ``hidden_states`` and
    ``position_embeddings`` are the layer's inputs, from which the layer's original attention can be recomputed.
    """

    layer_idx: int
    logits: torch.Tensor
    attention_mask: Optional[torch.Tensor]
    hidden_states: torch.Tensor
    position_embeddings: tuple[torch.Tensor, torch.Tensor]
