"""How much smaller LiSA makes the Q/K side of a model: parameters and key-cache bytes per token."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

from torch import nn

from .architectures import attention_of, base_model_type, decoder_layers
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


def _original_qk_params(model: nn.Module, layout: AttentionLayout, hidden_size: int) -> int:
    config = model.config
    qk_dims = (layout.num_heads + layout.num_kv_heads) * layout.head_dim
    has_bias = bool(getattr(config, "attention_bias", False)) or base_model_type(model) == "qwen2"
    norm_params = 2 * layout.head_dim if base_model_type(model) == "qwen3" else 0
    return hidden_size * qk_dims + (qk_dims if has_bias else 0) + norm_params


def qk_compression_report(model: nn.Module, adapter_name: Optional[str] = None) -> CompressionReport:
    """Q/K parameter compression of a LiSA model: a ``PeftModel`` with a LiSA adapter, or a merged model.

    For a ``PeftModel`` the active adapter is reported unless ``adapter_name`` is given.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if adapter_name is None and hasattr(model, "active_adapter"):
        adapter_name = model.active_adapter
    report = CompressionReport()
    hidden_size = base.config.hidden_size
    for idx, layer in enumerate(decoder_layers(base)):
        attn = layer.self_attn
        # A merged shared layer (a LiSASubstitute) no longer has the q_proj/k_proj its layout was read from.
        layout = (
            attn.layout if isinstance(attn, LiSASubstitute) else AttentionLayout.from_attention(attention_of(layer))
        )
        original = _original_qk_params(base, layout, hidden_size)
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
