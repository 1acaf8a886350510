"""How much smaller LiSA makes the Q/K side of a model: parameters and key-cache bytes per token."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

from torch import nn

from .architectures import attention_of, decoder_layers
from .attention import LiSASubstitute
from .functional import AttentionLayout
from .layer import ROLE_SHARED, LiSALayer


@dataclass
class LayerCompression:
    """Q/K parameters of one shared layer, in the original model and with LiSA."""

    layer: int
    qk_params_original: int
    qk_params_lisa: int
    key_cache_dims_original: int
    key_cache_dims_lisa: int

    @property
    def ratio(self) -> float:
        return self.qk_params_original / self.qk_params_lisa


@dataclass
class CompressionReport:
    """Q/K compression of a LiSA model (adapter or merged), per shared layer and in total."""

    layers: list[LayerCompression] = field(default_factory=list)
    qk_params_original_model: int = 0

    @property
    def qk_params_original(self) -> int:
        """Q/K parameters of the shared layers in the original model."""
        return sum(row.qk_params_original for row in self.layers)

    @property
    def qk_params_lisa(self) -> int:
        """Parameters that replace them: alignment FFN plus low-rank Q/K."""
        return sum(row.qk_params_lisa for row in self.layers)

    @property
    def ratio(self) -> float:
        """Q/K compression of the shared layers (the paper reports 6x)."""
        return self.qk_params_original / self.qk_params_lisa if self.layers else 1.0

    @property
    def model_qk_ratio(self) -> float:
        """Q/K parameters of the whole original model over those of the LiSA model."""
        after = self.qk_params_original_model - self.qk_params_original + self.qk_params_lisa
        return self.qk_params_original_model / after

    def to_dict(self) -> dict:
        out = asdict(self)
        for row, layer in zip(out["layers"], self.layers, strict=True):
            row["ratio"] = layer.ratio
        out.update(
            qk_params_original=self.qk_params_original,
            qk_params_lisa=self.qk_params_lisa,
            ratio=self.ratio,
            model_qk_ratio=self.model_qk_ratio,
        )
        return out

    def to_markdown(self) -> str:
        lines = [
            "| layer | Q/K params (original) | LiSA params (align + low-rank Q/K) | ratio | key-cache dims/token |",
            "|---:|---:|---:|---:|---:|",
        ]
        for row in self.layers:
            lines.append(
                f"| {row.layer} | {row.qk_params_original:,} | {row.qk_params_lisa:,} | {row.ratio:.2f}x "
                f"| {row.key_cache_dims_original} -> {row.key_cache_dims_lisa} |"
            )
        lines.append(
            f"| **shared layers** | {self.qk_params_original:,} | {self.qk_params_lisa:,} | **{self.ratio:.2f}x** | |"
        )
        lines.append(f"| whole model Q/K | | | {self.model_qk_ratio:.2f}x | |")
        return "\n".join(lines)


def _linear_params(linear: nn.Module, rows: Optional[int] = None) -> int:
    """Weights (+ bias) of a linear layer, or of its first ``rows`` output rows; from its shape, so that a quantized
    layer counts what it stands for."""
    out_features = linear.out_features if rows is None else rows
    bias = getattr(linear, "bias", None)
    return linear.in_features * out_features + (out_features if bias is not None else 0)


def _original_qk_params(attn: nn.Module, layout: AttentionLayout) -> int:
    """Q/K parameters of a full attention layer, counted off its structure: the q/k projections (or the q/k rows of
    a fused qkv projection), with their biases, and the q/k norms."""
    if layout.fused_qkv:
        params = _linear_params(attn.qkv_proj, (layout.num_heads + layout.num_kv_heads) * layout.head_dim)
    else:
        params = _linear_params(attn.q_proj) + _linear_params(attn.k_proj)
    for name in layout.qk_norm_names if layout.qk_norm != "none" else ():
        params += sum(p.numel() for p in getattr(attn, name).parameters())
    return params


def qk_compression_report(model: nn.Module, adapter_name: Optional[str] = None) -> CompressionReport:
    """Q/K parameter compression of a LiSA model: a ``PeftModel`` with a LiSA adapter, or a merged model.

    For a ``PeftModel`` the active adapter is reported unless ``adapter_name`` is given.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if adapter_name is None and hasattr(model, "active_adapter"):
        adapter_name = model.active_adapter
    report = CompressionReport()
    layers = decoder_layers(base)
    # A merged shared layer (a LiSASubstitute) no longer has its q/k projections: it counts as layer 0 (never shared).
    first = attention_of(layers[0])
    first_params = _original_qk_params(first, AttentionLayout.from_attention(first))
    for idx, layer in enumerate(layers):
        attn = layer.self_attn
        if isinstance(attn, LiSASubstitute):
            layout, original = attn.layout, first_params
        else:
            layout = AttentionLayout.from_attention(attention_of(layer))
            original = _original_qk_params(attention_of(layer), layout)
        report.qk_params_original_model += original
        if isinstance(attn, LiSALayer) and attn.lisa_role.get(adapter_name) == ROLE_SHARED:
            substitute = attn.lisa_substitute[adapter_name]
        elif isinstance(attn, LiSASubstitute):
            substitute = attn
        else:
            continue
        rank = substitute.rank
        lisa_params = sum(
            p.numel()
            for part in (substitute.align, substitute.q_lowrank, substitute.k_lowrank)
            for p in part.parameters()
        )
        report.layers.append(
            LayerCompression(
                layer=idx,
                qk_params_original=original,
                qk_params_lisa=lisa_params,
                key_cache_dims_original=layout.num_kv_heads * layout.head_dim,
                key_cache_dims_lisa=layout.num_kv_heads * rank,
            )
        )
    return report
