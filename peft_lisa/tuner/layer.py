"""The math of LiSA attention (``shared/METHOD.md`` part (b), steps 1-6) and the PEFT layer that applies it.

Notation (METHOD.md): B batch, H query heads, H_kv key/value heads, d_h head size, r low-rank size, T_q queries,
T_k keys (cached + new). Logits are the pre-softmax, pre-mask scores ``scale * Q K^T``; they are cast to float32 as
soon as the matmul in the model's dtype returns, so bf16/fp16 models hand finite logits from layer to layer.

The functions here are shared by the PEFT wrapper :class:`LiSALayer` (training, several adapters) and by the merged
modules of :mod:`peft_lisa.merged` (deployment), so both compute exactly the same thing.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import eager_attention_forward

from ..architectures import SUPPORTED_ATTN_IMPLEMENTATIONS, UnsupportedModelError

ACTIVATIONS = {"gelu": nn.GELU, "silu": nn.SiLU, "relu": nn.ReLU, "tanh": nn.Tanh}
ROLE_SHARED = "shared"  # the layer's attention is replaced by LiSA
ROLE_SOURCE = "source"  # a full layer whose logits feed the next (shared) layer
# Queries per block in a shared layer's attention: bounds the alignment FFN's activations on long prefills.
QUERY_BLOCK_SIZE = 256
# A source layer with at most this many queries (a decode step) computes its logits explicitly and hands them on;
# with more it runs the model's attention kernel and hands on Q/K (see source_attention).
EXPLICIT_SOURCE_MAX_QUERIES = 1


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


class LogitsCarrier:
    """Hands the pre-softmax logits of one wrapped layer to the next within a forward pass (METHOD.md step 1).

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
    """The logits S_{l-1} a shared layer reads (METHOD.md step 1), one block of queries at a time.

    ``shape`` is B x H x T_q x T_k; ``rows(rows)`` gives the float32 logits of those queries, B x H x len(rows) x T_k.
    """

    shape: torch.Size

    def rows(self, rows: slice) -> torch.Tensor:
        raise NotImplementedError


class MaterializedLogits(SourceLogits):
    """Logits held as one tensor: those a shared layer reconstructed and hands on to the next shared layer."""

    def __init__(self, logits: torch.Tensor) -> None:
        self.logits, self.shape = logits, logits.shape

    def rows(self, rows: slice) -> torch.Tensor:
        return self.logits[:, :, rows]


class ScoresFromQueryKey(SourceLogits):
    """A full layer's logits ``scale Q K^T``, kept as its rotary query and key and computed block by block on demand.

    The full layer itself attends with the model's own kernel (sdpa or eager), so no T_q x T_k tensor is handed
    between the layers.
    """

    def __init__(self, query: torch.Tensor, key: torch.Tensor, scaling: float) -> None:
        # query: B x H x T_q x d_h, key: B x H_kv x T_k x d_h (cached keys included)
        self.query, self.key, self.scaling = query, key, scaling
        self.shape = torch.Size((query.shape[0], query.shape[1], query.shape[2], key.shape[2]))

    def rows(self, rows: slice) -> torch.Tensor:
        return grouped_scores(self.query[:, :, rows], self.key, self.scaling)


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


class HeadAlign(nn.Module):
    """Head alignment ``align(s) = P s + W2 act(W1 s + b1) + b2`` along the head axis (METHOD.md step 2).

    It acts independently at every (query, key) entry and never mixes positions. ``P`` starts as a permutation
    matrix and ``W2``, ``b2`` at zero, so an untrained module is exactly "take head ``perm[i]`` of the previous layer".
    """

    def __init__(
        self,
        num_heads: int,
        hidden: int,
        activation: str = "gelu",
        init_permutation: Optional[list[int]] = None,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.hidden = hidden
        self.permute = nn.Parameter(permutation_matrix(init_permutation or list(range(num_heads))))  # P: H x H
        self.out_bias = nn.Parameter(torch.zeros(num_heads))  # b2: H
        if hidden > 0:
            self.up = nn.Linear(num_heads, hidden)  # W1, b1: m x H
            self.act = ACTIVATIONS[activation]()
            self.down = nn.Linear(hidden, num_heads, bias=False)  # W2: H x m
            nn.init.zeros_(self.down.weight)

    def forward(self, source_logits: torch.Tensor) -> torch.Tensor:
        # source_logits: B x H x T_q x T_k -> aligned: B x H x T_q x T_k, computed in float32 whatever the
        # parameters' dtype (a merged bf16 model keeps them in bf16).
        source_logits = source_logits.float()
        if self.hidden == 0:
            aligned = torch.einsum("gh,bhqk->bgqk", self.permute.float(), source_logits)
            return aligned + self.out_bias.float()[:, None, None]
        # P and W1 read the logits in one pass: [P; W1] is (H + m) x H.
        stacked = torch.cat([self.permute, self.up.weight]).float()
        projected = torch.einsum("gh,bhqk->bgqk", stacked, source_logits)  # B x (H + m) x T_q x T_k
        aligned, hidden = projected[:, : self.num_heads], projected[:, self.num_heads :]
        hidden = self.act(hidden + self.up.bias.float()[:, None, None])
        aligned = aligned + torch.einsum("hm,bmqk->bhqk", self.down.weight.float(), hidden)
        return aligned + self.out_bias.float()[:, None, None]


def permutation_matrix(permutation: list[int]) -> torch.Tensor:
    """``P`` with ``P[i, permutation[i]] = 1``: row ``i`` of ``P s`` is head ``permutation[i]`` of ``s``."""
    num_heads = len(permutation)
    matrix = torch.zeros(num_heads, num_heads)
    matrix[torch.arange(num_heads), torch.tensor(permutation)] = 1.0
    return matrix


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``x`` (B x heads x T x d) with ``cos``/``sin`` (B x T x d), rotate-half convention."""
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


def lowrank_frequency_index(head_dim: int, rank: int, rotary_frequencies: str) -> tuple[int, ...]:
    """Indices of the ``rank/2`` rotary frequencies (out of ``head_dim/2``) the rank-``r`` query/key use.

    ``"first"`` takes the first (highest) frequencies, as METHOD.md step 3 suggests; ``"strided"`` spreads them over
    the whole spectrum so that slow, long-range frequencies are represented too.
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
    """``softmax(S + M) V`` (METHOD.md steps 4-5) from float32 logits S (B x H x T_q x T_k) and the additive mask M
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


def source_attention(
    attn: nn.Module,
    carrier: LogitsCarrier,
    layer_idx: int,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    attention_mask: Optional[torch.Tensor],
    cache: Any,
    kwargs: dict,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """A full layer whose logits S_l = scale Q_l K_l^T feed the next (shared) layer.

    On prefill it attends exactly as the base layer does, with the model's own attention implementation, and hands on
    its rotary query and key: the shared layer computes S_l from them one block of queries at a time, so no
    T_q x T_k tensor is handed on. With at most ``EXPLICIT_SOURCE_MAX_QUERIES`` queries (decoding) it computes S_l
    once, attends from it and hands it on.
    """
    implementation = attn.config._attn_implementation or "eager"
    if implementation not in SUPPORTED_ATTN_IMPLEMENTATIONS:
        # Shared layers read the eager/sdpa mask format; flash/flex masks would be misread.
        raise UnsupportedModelError(
            f"LiSA layers need the 'eager' or 'sdpa' attention implementation, but the model now uses "
            f"{implementation!r}: call model.set_attn_implementation('sdpa')."
        )
    batch, q_len, _ = hidden_states.shape
    query, key, value = project_full_qkv(attn, hidden_states, position_embeddings)
    key, value = update_cache(cache, key, value, layer_idx, kwargs)
    if q_len <= EXPLICIT_SOURCE_MAX_QUERIES:
        # Decoding: a single row of logits is cheaper to compute once, use here and hand on, than to have the shared
        # layer recompute Q K^T over the whole key cache (measured ~5% per decode step on SmolLM2, batch 8 x 2048).
        logits = grouped_scores(query, key, attn.scaling)  # B x H x T_q x T_k
        carrier.put(layer_idx, MaterializedLogits(logits))
        mask = carrier.additive_mask(attention_mask, q_len, logits.shape[-1], logits.device)
        dropout = attn.attention_dropout if attn.training else 0.0
        return attn.o_proj(attend_from_logits(logits, mask, value, dropout, attn.training)), None
    carrier.put(layer_idx, ScoresFromQueryKey(query, key, attn.scaling))
    attention = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
    attn_output, attn_weights = attention(
        attn,
        query,
        key,
        value,
        attention_mask,
        dropout=attn.attention_dropout if attn.training else 0.0,
        scaling=attn.scaling,
        sliding_window=sliding_window_of(attn),
        **kwargs,
    )  # B x T_q x H x d_h
    return attn.o_proj(attn_output.reshape(batch, q_len, -1)), attn_weights


def sliding_window_of(attn: nn.Module) -> Optional[int]:
    """The sliding window the base attention passes its kernel: a per-layer attribute (Qwen2) or the config's
    (Mistral)."""
    if hasattr(attn, "sliding_window"):
        return attn.sliding_window
    return getattr(attn.config, "sliding_window", None)


def shared_attention(
    *,
    align: HeadAlign,
    q_lowrank: nn.Linear,
    k_lowrank: nn.Linear,
    v_proj: nn.Module,
    o_proj: nn.Module,
    layout: AttentionLayout,
    rank: int,
    frequency_index: tuple[int, ...],
    carrier: LogitsCarrier,
    layer_idx: int,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    attention_mask: Optional[torch.Tensor],
    cache: Any,
    kwargs: dict,
    dropout: float,
    training: bool,
    hands_on: bool = True,
    query_block_size: int = QUERY_BLOCK_SIZE,
) -> tuple[torch.Tensor, None]:
    """LiSA attention of a shared layer, METHOD.md steps 1-5.

    The cache of a shared layer holds the rank-r rotary keys K_r (B x H_kv x T x r) and the values. ``hands_on``
    says whether the next layer shares too and so needs this layer's logits S_l.
    """
    batch, q_len, _ = hidden_states.shape
    # Step 3: low-rank rotary query/key of the current layer's input.
    x = hidden_states.to(q_lowrank.weight.dtype)
    q_small = q_lowrank(x).view(batch, q_len, layout.num_heads, rank).transpose(1, 2)  # B x H x T_q x r
    k_small = k_lowrank(x).view(batch, q_len, layout.num_kv_heads, rank).transpose(1, 2)  # B x H_kv x T_q x r
    cos_r, sin_r = lowrank_rotary(position_embeddings, frequency_index)
    q_small = apply_rotary(q_small, cos_r.to(x.dtype), sin_r.to(x.dtype))
    k_small = apply_rotary(k_small, cos_r.to(x.dtype), sin_r.to(x.dtype))
    value = v_proj(hidden_states).view(batch, q_len, layout.num_kv_heads, layout.head_dim).transpose(1, 2)
    k_small, value = update_cache(cache, k_small, value, layer_idx, kwargs)

    # Step 1: the logits layer l-1 actually used (reconstructed ones if it is shared too), read block by block.
    source_logits = carrier.take(layer_idx - 1)  # B x H x T_q x T_k
    k_len = k_small.shape[-2]
    if source_logits.shape[-2:] != (q_len, k_len) or source_logits.shape[0] != batch:
        raise RuntimeError(
            f"LiSA layer {layer_idx}: logits of layer {layer_idx - 1} have shape {tuple(source_logits.shape)}, "
            f"expected (batch={batch}, heads, {q_len}, {k_len}). Both layers must see the same keys."
        )
    keep_logits = hands_on or bool(carrier.observers)
    mask = carrier.additive_mask(attention_mask, q_len, k_len, hidden_states.device)  # broadcasts to B x H x T_q x T_k
    logits_blocks, output_blocks = [], []
    # Steps 2-5 one block of queries at a time, so that the alignment FFN's B x m x block x T_k hidden activations
    # stay bounded during long prefills. The alignment never mixes positions, so blocks are independent.
    for start in range(0, q_len, query_block_size):
        rows = slice(start, min(start + query_block_size, q_len))
        # Steps 2-4: S_l = align(S_{l-1}) + scale_r Q_r K_r^T; the mask is applied after alignment.
        logits = align(source_logits.rows(rows)) + grouped_scores(q_small[:, :, rows], k_small, rank**-0.5)
        if keep_logits:
            logits_blocks.append(logits)
        output_blocks.append(attend_from_logits(logits, mask[..., rows, :], value, dropout, training))  # Step 5
    if keep_logits:
        logits = torch.cat(logits_blocks, dim=2) if len(logits_blocks) > 1 else logits_blocks[0]
        carrier.put(layer_idx, MaterializedLogits(logits))
        if carrier.observers:
            carrier.observe(SharedLayerCall(layer_idx, logits, attention_mask, hidden_states, position_embeddings))
    attn_output = torch.cat(output_blocks, dim=1) if len(output_blocks) > 1 else output_blocks[0]
    return o_proj(attn_output.to(hidden_states.dtype)), None


class LiSALayer(nn.Module, BaseTunerLayer):
    """PEFT wrapper of a decoder layer's self-attention module.

    Per adapter, the wrapped layer either *shares* (LiSA attention with its own align / low-rank Q/K modules) or is a
    *source* (a full layer that attends with the model's own kernel and hands its rotary Q/K to the next, shared,
    layer). With the
    adapter disabled, or none of the active adapters touching this layer, the base attention runs untouched.
    """

    adapter_layer_names = ("lisa_align", "lisa_q_lowrank", "lisa_k_lowrank")
    other_param_names = ("lisa_role", "lisa_rank", "lisa_frequency_index", "lisa_hands_on")

    def __init__(self, base_layer: nn.Module, carrier: LogitsCarrier) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.layer_idx: int = base_layer.layer_idx
        self.layout = AttentionLayout.from_attention(base_layer)
        self.carrier = carrier
        self.lisa_align = nn.ModuleDict()
        self.lisa_q_lowrank = nn.ModuleDict()
        self.lisa_k_lowrank = nn.ModuleDict()
        self.lisa_role: dict[str, str] = {}
        self.lisa_rank: dict[str, int] = {}
        self.lisa_frequency_index: dict[str, tuple[int, ...]] = {}
        self.lisa_hands_on: dict[str, bool] = {}
        self._disable_adapters = False
        self.merged_adapters = []

    def update_layer(self, adapter_name: str, role: str, config: Any) -> None:
        """Add ``adapter_name`` to this layer with the given role, shaped by the ``LiSAConfig``."""
        self.lisa_role[adapter_name] = role
        if role == ROLE_SHARED:
            layout, rank = self.layout, config.rank
            align_hidden = 4 * layout.num_heads if config.align_hidden is None else config.align_hidden
            permutation = (config.align_init_permutations or {}).get(self.layer_idx)
            self.lisa_align[adapter_name] = HeadAlign(
                layout.num_heads, align_hidden, config.align_activation, init_permutation=permutation
            )
            hidden_size = self.base_layer.v_proj.in_features
            self.lisa_q_lowrank[adapter_name] = nn.Linear(hidden_size, layout.num_heads * rank, bias=False)
            self.lisa_k_lowrank[adapter_name] = nn.Linear(hidden_size, layout.num_kv_heads * rank, bias=False)
            init_lowrank(self.lisa_q_lowrank[adapter_name], self.lisa_k_lowrank[adapter_name], config.init_lowrank)
            self.lisa_rank[adapter_name] = rank
            self.lisa_hands_on[adapter_name] = self.layer_idx + 1 in config.share_layers
            self.lisa_frequency_index[adapter_name] = lowrank_frequency_index(
                layout.head_dim, rank, config.rotary_frequencies
            )
            self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: Optional[torch.device] = None) -> None:
        # The base attention has no ``weight``; follow its value projection (a quantized layer keeps a float dtype
        # for its compute, so the adapter stays float32 and is cast by peft's autocast rules).
        reference = next(self.base_layer.v_proj.parameters())
        for module_dict in (self.lisa_align, self.lisa_q_lowrank, self.lisa_k_lowrank):
            if adapter_name in module_dict:
                module_dict[adapter_name].to(device or reference.device)

    def _active_lisa_adapter(self) -> Optional[str]:
        active = [name for name in self.active_adapters if name in self.lisa_role]
        if len(active) > 1:
            raise ValueError(
                f"LiSA adapters {active} are active together, but each one replaces the attention of its layers; "
                "activate one at a time with model.set_adapter(name)."
            )
        return active[0] if active else None

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
        attention_mask: Optional[torch.Tensor] = None,
        cache: Any = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        if cache is None and "past_key_values" in kwargs:
            cache = kwargs.pop("past_key_values")
        adapter = None if self.disable_adapters else self._active_lisa_adapter()
        if adapter is None:
            return self.base_layer(
                hidden_states,
                position_embeddings=position_embeddings,
                attention_mask=attention_mask,
                cache=cache,
                **kwargs,
            )
        if self.lisa_role[adapter] == ROLE_SOURCE:  # the base kernel gets the base layer's kwargs
            return source_attention(
                self.base_layer,
                self.carrier,
                self.layer_idx,
                hidden_states,
                position_embeddings,
                attention_mask,
                cache,
                kwargs,
            )
        kwargs.pop("position_ids", None)
        kwargs.pop("use_cache", None)
        base = self.base_layer
        return shared_attention(
            align=self.lisa_align[adapter],
            q_lowrank=self.lisa_q_lowrank[adapter],
            k_lowrank=self.lisa_k_lowrank[adapter],
            v_proj=base.v_proj,
            o_proj=base.o_proj,
            layout=self.layout,
            rank=self.lisa_rank[adapter],
            frequency_index=self.lisa_frequency_index[adapter],
            carrier=self.carrier,
            layer_idx=self.layer_idx,
            hidden_states=hidden_states,
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            cache=cache,
            kwargs=kwargs,
            dropout=base.attention_dropout if self.training else 0.0,
            training=self.training,
            hands_on=self.lisa_hands_on[adapter],
        )

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        raise NotImplementedError(
            "LiSA changes the structure of the attention (it removes q_proj/k_proj), so it cannot be merged in place. "
            "Use model.merge_and_unload(), which returns a compact model."
        )

    def unmerge(self) -> None:
        raise NotImplementedError("LiSA adapters are never merged in place; there is nothing to unmerge.")

    def extra_repr(self) -> str:
        return f"layer_idx={self.layer_idx}, roles={self.lisa_role}"


def init_lowrank(q_lowrank: nn.Linear, k_lowrank: nn.Linear, mode: str) -> None:
    """Initialise the low-rank factors: ``"zero"`` makes the delta start at exactly zero (METHOD.md step 3)."""
    nn.init.normal_(k_lowrank.weight, std=1.0 / math.sqrt(k_lowrank.in_features))
    if mode == "zero":
        nn.init.zeros_(q_lowrank.weight)
    else:
        nn.init.normal_(q_lowrank.weight, std=0.1 / math.sqrt(q_lowrank.in_features))


def check_single_head_layout(layout: AttentionLayout, rank: int, layer_idx: int) -> None:
    """Raise if ``rank`` does not fit the layer's head size."""
    if rank > layout.head_dim:
        raise ValueError(
            f"LiSAConfig.rank={rank} is larger than the head size {layout.head_dim} of layer {layer_idx}; a low-rank "
            f"query/key must have rank <= head size. Use rank <= {layout.head_dim}."
        )
