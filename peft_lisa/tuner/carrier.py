"""How one layer's pre-softmax logits reach the next, shared, layer within a forward pass (step 1 of
``docs/method.md``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

import torch

from .functional import additive_mask, grouped_scores, softcap_logits


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
        self._mask_cache: Optional[tuple[Any, tuple, torch.Tensor]] = None

    def additive_mask(
        self, attention_mask: Optional[torch.Tensor], q_len: int, k_len: int, device: torch.device
    ) -> torch.Tensor:
        """:func:`additive_mask`, built once per forward pass: every wrapped layer gets the same mask object."""
        key = (q_len, k_len, device)
        cached = self._mask_cache
        if cached is not None and cached[0] is attention_mask and cached[1] == key:
            return cached[2]
        mask = additive_mask(attention_mask, q_len, k_len, device)
        self._mask_cache = (attention_mask, key, mask)  # holds the mask object, so its id cannot be reused
        return mask

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
        self._mask_cache = None


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
