"""How one layer's pre-softmax logits reach the next, shared, layer within a forward pass (step 1 of
``docs/method.md``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch

from .functional import fused_attention, grouped_scores, lowrank_rotary, softcap_logits


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


class MaterializedLogits(SourceLogits):
    """Logits held as one tensor: those a shared layer reconstructed and hands on to the next shared layer."""

    def __init__(self, logits: torch.Tensor) -> None:
        self.logits, self.shape = logits, logits.shape

    def rows(self, rows: slice, keys: Optional[int] = None) -> torch.Tensor:
        logits = self.logits[:, :, rows]
        return logits if keys is None or keys == logits.shape[-1] else logits[..., -keys:]


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


class FoldedScores(SourceLogits):
    """Logits kept as queries and keys: ``S[h] = q_shared[h] k_shared^T + q_grouped[h] k_grouped[g(h)]^T``, never
    as a T_q x T_k tensor (``docs/method.md``, "Fused attention of a shared layer").

    q_shared: B x H x T_q x D_s against k_shared: B x 1 x T_k x D_s (one key for every head);
    q_grouped: B x H x T_q x D_g against k_grouped: B x H_g x T_k x D_g (query head h reads key head h // (H / H_g)).
    Either part may be missing. A full layer's logits ``scale Q K^T`` are the grouped part alone (scale folded into
    the queries). A linear alignment ``P S`` and a low-rank term ``Q_r K_r^T`` stay in this form: :meth:`mixed` and
    :meth:`with_lowrank` return the logits of the next shared layer, and :meth:`attend` runs them through one fused
    attention call, whose head size is ``D_s + D_g``.
    """

    def __init__(
        self,
        q_shared: Optional[torch.Tensor],
        k_shared: Optional[torch.Tensor],
        q_grouped: Optional[torch.Tensor],
        k_grouped: Optional[torch.Tensor],
    ) -> None:
        self.q_shared, self.k_shared, self.q_grouped, self.k_grouped = q_shared, k_shared, q_grouped, k_grouped
        query = q_shared if q_shared is not None else q_grouped
        key = k_shared if k_shared is not None else k_grouped
        self.shape = torch.Size((query.shape[0], query.shape[1], query.shape[2], key.shape[2]))

    @classmethod
    def from_query_key(cls, query: torch.Tensor, key: torch.Tensor, scaling: float) -> FoldedScores:
        """A full layer's logits ``scaling Q K^T``: query B x H x T_q x d_h, key B x H_kv x T_k x d_h."""
        return cls(None, None, query * scaling, key)

    @property
    def head_dim(self) -> int:
        """Head size of the fused attention call: ``D_s + D_g``."""
        return sum(part.shape[-1] for part in (self.q_shared, self.q_grouped) if part is not None)

    def mixed(self, permute: torch.Tensor, group_map: Optional[list[int]] = None) -> FoldedScores:
        """``P S`` for an H x H matrix ``P`` (the linear head alignment), still folded.

        The shared part's queries are mixed by P. With ``group_map`` (``head_mixing="kv_group"``: head h of KV group
        j mixes only the heads of key head ``group_map[j]``), the grouped part keeps its head size: its queries are
        mixed by P and its keys re-indexed. Otherwise it becomes shared: head h's queries against key head j are
        ``sum_{g in group j} P[h, g] q_grouped[g]``, laid side by side for every j, against all key heads laid side
        by side; its head size grows from D_g to H_g D_g.
        """
        parts = {"q_shared": [], "k_shared": [], "q_grouped": None, "k_grouped": None}
        if self.q_shared is not None:
            parts["q_shared"].append(torch.einsum("hg,bgtd->bhtd", permute, self.q_shared.float()))
            parts["k_shared"].append(self.k_shared)
        if self.q_grouped is not None and group_map is not None and len(group_map) == self.k_grouped.shape[1]:
            parts["q_grouped"] = torch.einsum("hg,bgtd->bhtd", permute, self.q_grouped.float())
            parts["k_grouped"] = self.k_grouped[:, group_map]
        elif self.q_grouped is not None:
            batch, num_heads, q_len, dim = self.q_grouped.shape
            key_heads = self.k_grouped.shape[1]
            grouped = self.q_grouped.float().view(batch, key_heads, num_heads // key_heads, q_len, dim)
            by_key = permute.view(num_heads, key_heads, num_heads // key_heads)  # P[h, j, i] = P[h, j G + i]
            mixed = torch.einsum("hji,bjitd->bhtjd", by_key, grouped)  # B x H x T_q x H_g x D_g
            parts["q_shared"].append(mixed.reshape(batch, num_heads, q_len, key_heads * dim))
            key = self.k_grouped.transpose(1, 2).reshape(batch, 1, self.k_grouped.shape[2], key_heads * dim)
            parts["k_shared"].append(key)
        dtype = (self.k_shared if self.k_shared is not None else self.k_grouped).dtype
        q_shared = torch.cat(parts["q_shared"], dim=-1).to(dtype) if parts["q_shared"] else None
        k_shared = torch.cat(parts["k_shared"], dim=-1) if parts["k_shared"] else None
        q_grouped = parts["q_grouped"].to(dtype) if parts["q_grouped"] is not None else None
        return FoldedScores(q_shared, k_shared, q_grouped, parts["k_grouped"])

    def with_lowrank(self, q_small: torch.Tensor, k_small: torch.Tensor, scaling: float) -> FoldedScores:
        """``S + scaling Q_r K_r^T`` (q_small B x H x T_q x r, k_small B x H_kv x T_k x r), still folded: the
        low-rank query and key join the grouped part, whose key heads must then be the layer's H_kv."""
        if self.q_grouped is None:
            return FoldedScores(self.q_shared, self.k_shared, q_small * scaling, k_small)
        if self.k_grouped.shape[1] != k_small.shape[1]:
            raise ValueError(
                f"FoldedScores.with_lowrank: the grouped keys have {self.k_grouped.shape[1]} heads, the low-rank keys "
                f"{k_small.shape[1]}; mix the logits without a group map first."
            )
        q_grouped = torch.cat([self.q_grouped, q_small * scaling], dim=-1)
        k_grouped = self.k_grouped[:, :, -k_small.shape[2] :]  # a sliding-window layer keeps its last keys only
        return FoldedScores(self.q_shared, self.k_shared, q_grouped, torch.cat([k_grouped, k_small], dim=-1))

    def query_key(self, keys: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The fused query (B x H x T_q x D) and key (B x H_g x T_k x D) with ``S = query key^T`` per head; the last
        ``keys`` keys only, if given."""
        parts_q = [part for part in (self.q_shared, self.q_grouped) if part is not None]
        parts_k = []
        key_heads = self.k_grouped.shape[1] if self.k_grouped is not None else 1
        for part in (self.k_shared, self.k_grouped):
            if part is None:
                continue
            part = part if keys is None or keys == part.shape[2] else part[:, :, -keys:]
            parts_k.append(part.expand(part.shape[0], key_heads, *part.shape[2:]))
        query = parts_q[0] if len(parts_q) == 1 else torch.cat(parts_q, dim=-1)
        key = parts_k[0] if len(parts_k) == 1 else torch.cat(parts_k, dim=-1)
        return query, key

    def rows(self, rows: slice, keys: Optional[int] = None) -> torch.Tensor:
        query, key = self.query_key(keys)
        return grouped_scores(query[:, :, rows], key, 1.0)

    def attend(
        self, attention_mask: Optional[torch.Tensor], value: torch.Tensor, dropout: float = 0.0
    ) -> torch.Tensor:
        """``softmax(S + M) V`` in one fused attention call -> B x T_q x (H d_v)."""
        query, key = self.query_key(value.shape[2])
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
