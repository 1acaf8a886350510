"""The analytic cost model: a model's shapes, the working memory a run needs, and FLOPs / bytes per token.

* :class:`ModelShape` reads the sizes the estimates need off a (base or merged) model, with its KV-cache bytes per
  token;
* :func:`estimate_working_bytes` predicts the working memory of a prefill or decode run, to skip runs that do not
  fit;
* :func:`analytic_breakdown` is the FLOPs / bytes breakdown per layer type, which bounds the speedup LiSA can give.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from ..tuner.architectures import attention_of, decoder_layers
from ..tuner.merged import LiSASharedAttention, LiSASourceAttention


@dataclass(frozen=True)
class ModelShape:
    """The sizes the analytic estimates need, read off a (base or merged) model."""

    hidden: int
    intermediate: int
    vocab: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    share_layers: tuple[int, ...]
    source_layers: tuple[int, ...]
    rank: int
    align_hidden: int
    element_bytes: int
    weight_bytes: int
    lowrank_key_bytes: int = 0  # element size of a shared layer's rank-r keys (its k_lowrank weight dtype)

    @classmethod
    def of(cls, model: nn.Module) -> ModelShape:
        config = model.config
        layers = decoder_layers(model)
        shared = [i for i, layer in enumerate(layers) if isinstance(layer.self_attn, LiSASharedAttention)]
        sources = [i for i, layer in enumerate(layers) if isinstance(layer.self_attn, LiSASourceAttention)]
        param = next(model.parameters())
        rank, align_hidden, key_bytes = 0, 0, param.element_size()
        if shared:
            attn = layers[shared[0]].self_attn
            rank, align_hidden, key_bytes = attn.rank, attn.align.hidden, attn.k_lowrank.weight.element_size()
        head_dim = attention_of(layers[0]).head_dim  # layer 0 never shares
        num_heads = config.num_attention_heads
        return cls(
            hidden=config.hidden_size,
            intermediate=config.intermediate_size,
            vocab=config.vocab_size,
            num_layers=len(layers),
            num_heads=num_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            share_layers=tuple(shared),
            source_layers=tuple(sources),
            rank=rank,
            align_hidden=align_hidden,
            element_bytes=param.element_size(),
            weight_bytes=_weight_bytes(model),
            lowrank_key_bytes=key_bytes,
        )

    @property
    def mixed_dtype(self) -> bool:
        """True when the shared layers' low-rank modules are not in the model's dtype (their keys are cached in
        theirs: e.g. float32 keys in a bfloat16 model, when a merged model was not cast after merging)."""
        return bool(self.share_layers) and self.lowrank_key_bytes != self.element_bytes

    @property
    def full_layer_cache_bytes(self) -> int:
        """KV-cache bytes per token of a full layer: ``2 * H_kv * d_h * bytes``."""
        return 2 * self.num_kv_heads * self.head_dim * self.element_bytes

    @property
    def shared_layer_cache_bytes(self) -> int:
        """KV-cache bytes per token of a shared layer: ``H_kv * (r + d_h) * bytes`` (rank-r keys, full values)."""
        return self.num_kv_heads * (self.rank * self.lowrank_key_bytes + self.head_dim * self.element_bytes)

    @property
    def cache_bytes_per_token(self) -> int:
        shared = len(self.share_layers)
        return (self.num_layers - shared) * self.full_layer_cache_bytes + shared * self.shared_layer_cache_bytes


def _weight_bytes(model: nn.Module) -> int:
    """Parameters and buffers (tied ones once), and the copy of the low-rank factors a merged shared layer keeps for
    generation (:meth:`LiSASharedAttention.fused_copy_bytes`)."""
    seen: set[int] = set()
    total = sum(m.fused_copy_bytes() for m in model.modules() if isinstance(m, LiSASharedAttention))
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.data_ptr() in seen:  # tied embeddings
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
    return total


def estimate_working_bytes(shape: ModelShape, batch: int, context: int, decode_tokens: int, phase: str) -> int:
    """Working memory (above the resident weights) of one run, estimated from the shapes; used to skip runs.

    ``phase`` is "prefill" (the prefill forward of ``[batch, context]``) or "decode" (``decode_tokens`` steps on a
    cache of ``context`` tokens). Counted: the KV cache, one layer's transient activations, the last-position logits
    and, for LiSA layers, the ``B x H x T_q x T_k`` float32 logits and the ``B x m x T_q x T_k`` hidden tensor of the
    head-alignment FFN that the unfused implementation materialises (``m + 3H`` float32 values per (query, key)
    entry at the peak of a shared layer; about ``m + 1.5H`` was measured on SmolLM2-135M on CPU). sdpa layers,
    source layers included, are taken as fused (no ``T_q x T_k`` tensor).
    """
    heads, kv_heads, head_dim, e = shape.num_heads, shape.num_kv_heads, shape.head_dim, shape.element_bytes
    q_len = context if phase == "prefill" else 1
    k_len = context if phase == "prefill" else context + decode_tokens
    cache = shape.cache_bytes_per_token * batch * k_len
    per_token = 4 * shape.hidden + 3 * shape.intermediate + (heads + 2 * kv_heads) * head_dim
    activations = 3 * batch * q_len * per_token * e  # x3: temporaries and allocator slack, measured on SmolLM2
    logits = batch * shape.vocab * 4 * 2
    # Shared layers with an alignment FFN materialise m + 3H float32 values per entry for one block of 256 queries
    # (the linear alignment runs fused and materialises none).
    entry_floats = shape.align_hidden + 3 * heads if shape.share_layers and shape.align_hidden else 0
    explicit = batch * min(q_len, 256) * k_len * 4 * entry_floats
    return cache + activations + logits + explicit


def analytic_breakdown(shape: ModelShape, contexts: tuple[int, ...] = (128, 512, 2048)) -> dict[str, Any]:
    """FLOPs and bytes per query token, per layer type, of the base model and of the merged LiSA model.

    A multiply-add counts 2 FLOPs. Per query token against ``T_k`` keys (``d`` hidden size, ``H``/``H_kv`` query/KV
    heads, ``d_h`` head size, ``r`` LiSA rank, ``m`` alignment FFN hidden size, ``I`` MLP size):

    * full layer: projections ``2d(H d_h) + 2 * 2d(H_kv d_h) + 2(H d_h)d``; per key ``QK^T`` ``2 H d_h`` and ``AV``
      ``2 H d_h``.
    * source layer (a full layer feeding a shared one): as a full layer. On a decode step it computes its logits
      row explicitly and hands it on; on prefill it runs sdpa and hands Q/K on, and the shared layer after it
      recomputes ``QK^T`` (``2 H d_h`` more per key, block by block) instead of reading a ``T x T`` tensor.
    * shared layer: projections ``2d(H r) + 2d(H_kv r) + 2d(H_kv d_h) + 2(H d_h)d``; per key the alignment, which
      runs on every (query, key) entry of all H heads: ``P`` ``2H^2``, FFN ``W1`` and ``W2`` ``4Hm`` (plus ``m``
      activations and biases); low-rank ``QK^T`` ``2 H r``; ``AV`` ``2 H d_h``.
    * every layer also runs its MLP, ``6 d I``; the LM head adds ``2 d V`` per token.

    The table is per decode token. ``materialised_fp32_per_entry`` counts the float32 tensors of size
    ``T_q x T_k`` per head-like channel the current (unfused) implementation writes per (query, key) entry on a
    decode step: fused sdpa writes none, a source layer about ``4H`` (logits, masked logits, probabilities, cast),
    a shared layer about ``3m + 8H``.
    """
    d, inter, vocab = shape.hidden, shape.intermediate, shape.vocab
    heads, kv_heads, dh, r, m = shape.num_heads, shape.num_kv_heads, shape.head_dim, shape.rank, shape.align_hidden
    e = shape.element_bytes
    mlp = 6 * d * inter
    full_proj = 2 * d * heads * dh + 2 * 2 * d * kv_heads * dh + 2 * heads * dh * d
    shared_proj = 2 * d * heads * r + 2 * d * kv_heads * r + 2 * d * kv_heads * dh + 2 * heads * dh * d
    full_key = {"QK^T": 2 * heads * dh, "AV": 2 * heads * dh}
    shared_key = {
        "align P": 2 * heads * heads,
        "align FFN": 4 * heads * m + 2 * m + heads,
        "low-rank QK^T": 2 * heads * r,
        "AV": 2 * heads * dh,
    }
    n_shared, n_source = len(shape.share_layers), len(shape.source_layers)
    layer_types = [
        {
            "layer_type": "full (sdpa)",
            "layers_base": shape.num_layers,
            "layers_merged": shape.num_layers - n_shared - n_source,
            "projection_flops": full_proj,
            "mlp_flops": mlp,
            "per_key_flops": full_key,
            "per_key_flops_total": sum(full_key.values()),
            "kv_cache_bytes_per_token": 2 * kv_heads * dh * e,
            "materialised_fp32_per_entry": 0,
        },
        {
            "layer_type": "source (full, hands its logits on)",
            "layers_base": 0,
            "layers_merged": n_source,
            "projection_flops": full_proj,
            "mlp_flops": mlp,
            "per_key_flops": full_key,
            "per_key_flops_total": sum(full_key.values()),
            "kv_cache_bytes_per_token": 2 * kv_heads * dh * e,
            "materialised_fp32_per_entry": 4 * heads,
        },
        {
            "layer_type": "shared (LiSA)",
            "layers_base": 0,
            "layers_merged": n_shared,
            "projection_flops": shared_proj,
            "mlp_flops": mlp,
            "per_key_flops": shared_key,
            "per_key_flops_total": sum(shared_key.values()),
            "kv_cache_bytes_per_token": shape.shared_layer_cache_bytes,
            "materialised_fp32_per_entry": 3 * m + 8 * heads,
        },
    ]

    def per_token(which: str, keys: int) -> dict[str, float]:
        flops = 2 * d * vocab
        cache = 0
        fp32 = 0
        for row in layer_types:
            count = row[f"layers_{which}"]
            flops += count * (row["projection_flops"] + row["mlp_flops"] + row["per_key_flops_total"] * keys)
            cache += count * row["kv_cache_bytes_per_token"] * keys
            fp32 += count * row["materialised_fp32_per_entry"] * keys * 4
        return {"flops": flops, "kv_cache_bytes_read": cache, "materialised_fp32_bytes": fp32}

    per_context = []
    for keys in contexts:
        base, merged = per_token("base", keys), per_token("merged", keys)
        per_context.append(
            {
                "context": keys,
                "base_flops_per_token": base["flops"],
                "merged_flops_per_token": merged["flops"],
                "flops_ratio_base_over_merged": base["flops"] / merged["flops"],
                "base_kv_bytes_read_per_decode_token": base["kv_cache_bytes_read"],
                "merged_kv_bytes_read_per_decode_token": merged["kv_cache_bytes_read"],
                "kv_read_ratio_base_over_merged": base["kv_cache_bytes_read"] / merged["kv_cache_bytes_read"],
                "merged_materialised_fp32_bytes_per_decode_token": merged["materialised_fp32_bytes"],
            }
        )
    return {
        "dims": {
            "d": d,
            "I": inter,
            "V": vocab,
            "H": heads,
            "H_kv": kv_heads,
            "d_h": dh,
            "r": r,
            "m": m,
            "bytes_per_element": e,
            "layers": shape.num_layers,
            "shared": n_shared,
            "source": n_source,
        },
        "layer_types": layer_types,
        "per_context": per_context,
        "notes": [
            "FLOPs per query token against T_k keys; a multiply-add is 2 FLOPs; decode has T_k = context.",
            "Prefill: shared layers compute all T x T entries (masked ones included) in blocks of queries, and the "
            "first shared layer after a source layer recomputes that layer's QK^T from its handed Q/K (2 H d_h more "
            "per key); source layers themselves run sdpa.",
            "The alignment FFN runs on every (query, key) entry: ~4 H m FLOPs per entry, versus 2 H d_h for QK^T; "
            "it can cost more than the Q/K it replaces, so the compute saving is in the projections only.",
            "Decode at large batch is bound by reading the KV cache; the cache ratio bounds the decode speedup "
            "there, less whatever the materialised float32 logits/FFN tensors add.",
        ],
    }


def chain_depths(share_layers: tuple[int, ...]) -> dict[int, int]:
    """Each shared layer's place in its chain: 1 for a shared layer after a full one, ``d + 1`` after a shared layer
    of depth ``d`` (its source logits are that layer's, which are themselves derived)."""
    depths: dict[int, int] = {}
    for layer in sorted(share_layers):
        depths[layer] = depths.get(layer - 1, 0) + 1
    return depths


def earlier_link_pair_flops(shape: ModelShape) -> int:
    """FLOPs per (query, key) pair that a chain link's source logits cost for each shared layer before it in the chain,
    at the least of the two ways to recompute them (no ``T x T`` tensor is held between layers): the earlier link's
    alignment and low-rank term in its own head basis (``2 H^2 + 2 H r``, ``+ 4 H m`` with an FFN alignment), or,
    with the linear alignment, its rank-``r`` queries mixed and laid against all KV heads' rank-``r`` keys
    (``2 H H_kv r``)."""
    heads, kv_heads, r, m = shape.num_heads, shape.num_kv_heads, shape.rank, shape.align_hidden
    recomputed = 2 * heads * heads + 4 * heads * m + 2 * heads * r
    return recomputed if m else min(recomputed, 2 * heads * kv_heads * r)


def ceilings(base: ModelShape, merged: ModelShape, batch: int, context: int) -> dict[str, float]:
    """Arithmetic bounds of the speedup at one (batch, context).

    ``prefill``: base / merged FLOPs of a prefill of ``context`` tokens (causal: query t sees t keys; the LM head for
    the last token only). A shared layer is counted at its arithmetic minimum per (query, key) pair: the source
    logits it needs ``2 H d_h`` (its chain's root ``QK^T``) plus, at depth ``d`` of a chain, ``d - 1`` times
    :func:`earlier_link_pair_flops` (the earlier links' terms of its source logits, recomputed because no ``T x T``
    tensor is held between layers), the alignment ``2 H^2`` (+ ``4 H m`` with an FFN), the low-rank term ``2 H r``
    and ``AV`` ``2 H d_h``, against ``QK^T`` + ``AV`` ``4 H d_h`` of a full layer; projections as they are.
    ``prefill_no_chain``: the same without the earlier links' terms (every shared layer as if its source were a full
    layer): the bound a layer choice without chains would have.
    ``decode``: base / merged bytes read by one decode step after ``context`` tokens: the weights plus the KV cache
    of ``batch`` sequences (a decode step hands each layer's logits row on: no chain is recomputed).
    """
    pairs = context * (context + 1) / 2  # causal (query, key) pairs of the prefill

    def prefill_flops(shape: ModelShape, chains: bool = True) -> float:
        d, heads, kv_heads, dh, r, m = (
            shape.hidden, shape.num_heads, shape.num_kv_heads, shape.head_dim, shape.rank, shape.align_hidden
        )  # fmt: skip
        mlp = 6 * d * shape.intermediate
        full = (2 * d * heads * dh + 4 * d * kv_heads * dh + 2 * heads * dh * d + mlp) * context
        full += 4 * heads * dh * pairs
        shared = (2 * d * (heads + kv_heads) * r + 2 * d * kv_heads * dh + 2 * heads * dh * d + mlp) * context
        shared += (4 * heads * dh + 2 * heads * heads + 4 * heads * m + 2 * heads * r) * pairs
        n_shared = len(shape.share_layers)
        flops = (shape.num_layers - n_shared) * full + n_shared * shared + 2 * d * shape.vocab
        if chains and n_shared:
            earlier_links = sum(depth - 1 for depth in chain_depths(shape.share_layers).values())
            flops += earlier_links * earlier_link_pair_flops(shape) * pairs
        return flops

    def decode_bytes(shape: ModelShape) -> float:
        return shape.weight_bytes + shape.cache_bytes_per_token * batch * context

    return {
        "prefill": prefill_flops(base) / prefill_flops(merged),
        "prefill_no_chain": prefill_flops(base) / prefill_flops(merged, chains=False),
        "decode": decode_bytes(base) / decode_bytes(merged),
    }
