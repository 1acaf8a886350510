"""The result of a calibration analysis: :class:`AttentionAnalysis`, its JSON form, summary table and plots."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

ANALYSIS_FORMAT_VERSION = 1
_SIGNIFICANT_DIGITS = 6  # stored values are rounded: far below the sampling noise, and a readable JSON


@dataclass
class AttentionAnalysis:
    """Result of :func:`analyze`; serialisable to JSON (:meth:`to_json` / :meth:`from_json`) and plottable.

    Per-layer lists have one entry per decoder layer, indexed by layer; entry 0 is ``None`` (layer 0 has no
    predecessor and can never share). All divergences are Jensen-Shannon divergences in bits (``[0, 1]``);
    sensitivities are rises of the mean LM loss in nats per token.

    Attributes:
        model_name: ``config._name_or_path`` of the analysed model (or its model type).
        num_layers, num_heads, num_kv_heads: layout of the model.
        seq_len: tokens per calibration sequence.
        num_sequences: calibration sequences used for the divergences.
        num_tokens: tokens in those sequences (``num_sequences * seq_len``).
        query_rows: query positions per sequence whose attention rows enter the per-layer divergences (the middles
            of equal strata of positions ``1..seq_len-1``; position 0 attends only to itself and is skipped).
        matrix_rows: query positions per sequence (a subset of those) used for ``js_layers``.
        js_indexed: mean JS between head ``i`` of layer ``l`` and head ``i`` of layer ``l-1``.
        js_matched: mean JS after the best head matching.
        js_matched_grouped: mean JS of the best matching that keeps KV groups together (see the
            ``peft_lisa.analysis`` package docstring).
        permutations: best matching per layer; ``permutations[l][i]`` = head of layer ``l-1`` for head ``i`` of
            layer ``l`` (the convention of ``LiSAConfig.align_init_permutations``).
        js_heads: the ``H x H`` matrices ``JS[l][i, j]`` (head ``i`` of layer ``l`` vs head ``j`` of ``l-1``).
        js_layers: ``L x L`` symmetric matrix of best-matched mean JS between every pair of layers (zero diagonal),
            from the ``matrix_rows`` subset of query rows, so its first off-diagonal is close to, not equal to,
            ``js_matched``.
        sensitivity_direct: rise of the LM loss when only layer ``l`` shares directly (identity permutation,
            untrained LiSA); ``None`` if not measured.
        sensitivity_permuted: the same with ``permutations[l]`` as initial alignment.
        sensitivity_calibrated: the mean per-token ``KL(base || adapted)`` of the next-token distributions (nats)
            when only layer ``l`` shares, after a short layer-wise calibration of that layer alone (``calibration``
            says how); ``None`` if not measured.
        calibration: rank, sequences and Adam steps of the calibration behind ``sensitivity_calibrated``.
        base_loss: LM loss of the unmodified model on the sensitivity batch.
        sensitivity_tokens: tokens in the sensitivity batch.
        format_version: version of this format.
    """

    model_name: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    seq_len: int
    num_sequences: int
    num_tokens: int
    query_rows: int
    matrix_rows: int
    js_indexed: list[Optional[float]]
    js_matched: list[Optional[float]]
    js_matched_grouped: list[Optional[float]]
    permutations: list[Optional[list[int]]]
    js_heads: list[Optional[list[list[float]]]]
    js_layers: list[list[float]]
    sensitivity_direct: Optional[list[Optional[float]]] = None
    sensitivity_permuted: Optional[list[Optional[float]]] = None
    sensitivity_calibrated: Optional[list[Optional[float]]] = None
    calibration: Optional[dict[str, int]] = None
    base_loss: Optional[float] = None
    sensitivity_tokens: int = 0
    format_version: int = field(default=ANALYSIS_FORMAT_VERSION)

    # ---- serialisation ---------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python (JSON-ready) form of the analysis."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AttentionAnalysis:
        """Rebuild an analysis from :meth:`to_dict` output (unknown keys are ignored)."""
        if not isinstance(data, dict):
            raise ValueError(f"A LiSA attention analysis is a JSON object, got {type(data).__name__}.")
        version = data.get("format_version", ANALYSIS_FORMAT_VERSION)
        if version > ANALYSIS_FORMAT_VERSION:
            raise ValueError(
                f"This attention analysis has format version {version}; the installed peft_lisa reads versions up "
                f"to {ANALYSIS_FORMAT_VERSION}. Upgrade peft_lisa."
            )
        names = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
        missing = sorted(required - set(data))
        if missing:
            raise ValueError(f"Not a LiSA attention analysis: missing keys {missing}.")
        return cls(**{key: value for key, value in data.items() if key in names})

    def to_json(self, path: Union[str, os.PathLike]) -> str:
        """Write the analysis as JSON (one top-level key per line) and return the path."""
        data = self.to_dict()
        body = ",\n".join(f"  {json.dumps(key)}: {json.dumps(value, allow_nan=False)}" for key, value in data.items())
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{\n" + body + "\n}\n", encoding="utf-8")
        return str(path)

    @classmethod
    def from_json(cls, path: Union[str, os.PathLike]) -> AttentionAnalysis:
        """Read an analysis written by :meth:`to_json`; ``from_json(p) == analysis`` after ``to_json(p)``."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON ({error.msg}); expected a LiSA attention analysis.") from error
        return cls.from_dict(data)

    # ---- reporting -------------------------------------------------------------------------------------------

    @property
    def display_name(self) -> str:
        """Short model name for titles: the last component of a local path, else the name as given."""
        name = self.model_name.rstrip("/\\")
        return os.path.basename(name) if os.path.isabs(name) else name

    def summary_table(self) -> str:
        """A markdown table: one row per layer with divergences, best permutation and sensitivities."""
        header = ["layer", "JS indexed", "JS matched", "JS matched (KV groups kept)", "best permutation"]
        if self.sensitivity_direct is not None:
            header += ["loss rise, direct", "loss rise, permuted"]
        if self.sensitivity_calibrated is not None:
            header += ["output KL, calibrated"]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

        def fmt(values: Optional[Sequence[Optional[float]]], layer: int) -> str:
            value = None if values is None else values[layer]
            return "-" if value is None else f"{value:.4f}"

        for layer in range(self.num_layers):
            perm = self.permutations[layer]
            if perm is None:
                perm_text = "-"
            elif perm == list(range(len(perm))):
                perm_text = "identity"
            else:
                perm_text = " ".join(str(h) for h in perm)
            cells = [
                str(layer),
                fmt(self.js_indexed, layer),
                fmt(self.js_matched, layer),
                fmt(self.js_matched_grouped, layer),
                perm_text,
            ]
            if self.sensitivity_direct is not None:
                cells += [fmt(self.sensitivity_direct, layer), fmt(self.sensitivity_permuted, layer)]
            if self.sensitivity_calibrated is not None:
                cells.append(fmt(self.sensitivity_calibrated, layer))
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def plot_heatmap(self, path: Union[str, os.PathLike]) -> str:
        """Save a PNG heatmap of the layer-by-layer best-matched JS matrix (``js_layers``); returns the path."""
        from matplotlib.figure import Figure

        size = min(10.0, 3.0 + 0.22 * self.num_layers)
        fig = Figure(figsize=(size + 1.2, size))
        ax = fig.add_subplot()
        image = ax.imshow(np.asarray(self.js_layers, dtype=float), cmap="viridis", origin="upper")
        colorbar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        colorbar.set_label("best-matched JS divergence (bits)")
        step = max(1, math.ceil(self.num_layers / 16))
        ticks = list(range(0, self.num_layers, step))
        ax.set_xticks(ticks)
        ax.set_yticks(ticks)
        ax.set_xlabel("layer")
        ax.set_ylabel("layer")
        ax.set_title(
            f"{self.display_name}: attention divergence between layers\n"
            f"(heads optimally matched; {self.num_sequences} x {self.seq_len} tokens)",
            fontsize=10,
        )
        return _save(fig, path)

    def plot_layers(self, path: Union[str, os.PathLike]) -> str:
        """Save a PNG bar chart per layer: indexed vs matched JS to the previous layer, and (if measured) the
        loss rise when only that layer shares; returns the path."""
        from matplotlib.figure import Figure

        layers = np.arange(self.num_layers)
        rises = [
            (values, label, color)
            for values, label, color in (
                (self.sensitivity_direct, "untrained, identity", "tab:red"),
                (self.sensitivity_permuted, "untrained, best permutation", "tab:orange"),
                (self.sensitivity_calibrated, "calibrated", "tab:green"),
            )
            if values is not None
        ]
        has_sensitivity = bool(rises)
        width_in = min(16.0, 4.0 + 0.35 * self.num_layers)
        fig = Figure(figsize=(width_in, 7.0 if has_sensitivity else 4.0))
        axes = fig.subplots(2 if has_sensitivity else 1, 1, sharex=True, squeeze=False)[:, 0]
        bar = 0.4
        top = axes[0]
        top.bar(layers - bar / 2, _nan(self.js_indexed), bar, label="head i <- head i (indexed)", color="tab:gray")
        top.bar(layers + bar / 2, _nan(self.js_matched), bar, label="best head matching", color="tab:blue")
        top.set_ylabel("JS to layer l-1 (bits)")
        top.set_title(
            f"mean over {self.num_sequences} x {self.seq_len} tokens, {self.query_rows} query rows each", fontsize=9
        )
        top.legend(fontsize=8, loc="upper right")
        top.grid(axis="y", alpha=0.3)
        if has_sensitivity:
            bottom = axes[1]
            width = 0.8 / len(rises)
            for index, (values, label, color) in enumerate(rises):
                offset = (index - (len(rises) - 1) / 2) * width
                bottom.bar(layers + offset, _nan(values), width, label=label, color=color)
            if self.base_loss is not None:
                bottom.set_title(
                    f"LiSA on layer l alone; {self.sensitivity_tokens} tokens, base loss {self.base_loss:.3f}",
                    fontsize=9,
                )
            bottom.set_yscale("symlog", linthresh=0.01)
            bottom.set_ylabel("loss rise when only\nlayer l shares (nats)")
            bottom.legend(fontsize=8, loc="upper right")
            bottom.grid(axis="y", alpha=0.3)
        axes[-1].set_xlabel("layer l")
        axes[-1].set_xticks(layers)
        axes[-1].tick_params(axis="x", labelsize=8)
        axes[-1].set_xlim(-0.7, self.num_layers - 0.3)
        fig.suptitle(
            f"{self.display_name}: attention similarity to the previous layer and sharing sensitivity",
            fontsize=11,
        )
        return _save(fig, path)


def _nan(values: Sequence[Optional[float]]) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=float)


def _save(fig: Any, path: Union[str, os.PathLike]) -> str:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return str(path)


def round_stored(value: float) -> Optional[float]:
    """``value`` rounded to the precision an analysis stores (6 significant digits); ``None`` if not finite."""
    value = float(value)
    if not math.isfinite(value):
        return None
    return float(f"{value:.{_SIGNIFICANT_DIGITS}g}")
