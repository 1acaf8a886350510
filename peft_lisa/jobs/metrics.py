"""Measuring and recording results: perplexity and generations with progress logs, a run's perplexity table, the
model-card metrics of adapters and merged models, and atomic JSON output."""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from ..evaluation import generate_samples, perplexity

logger = logging.getLogger("peft_lisa")

ADAPTER_METRICS_FILE = "lisa_metrics.json"
"""The metrics saved next to an adapter or merged model: ``data``, ``split``, ``perplexity`` (and more, see
:func:`card_metrics`)."""


# Printed under the perplexity heading when the license text is measured: what its gap means.
LICENSE_NOTE = (
    "  (the license text is another domain, which nothing here calibrates or trains on: an adapter serves the "
    "domains of its calibration and training data, docs/calibration/domain.md)"
)
# Perplexities a run can measure: key in the metrics -> label in logs and in the summary.
PERPLEXITY_LABELS = {
    "base_perplexity": "base model",
    "untrained_perplexity": "untrained LiSA",
    "calibrated_perplexity": "calibrated LiSA",
    "perplexity": "trained LiSA",
}
# The second held-out text (--eval-license): its perplexities are in metrics["license"] under the same keys.
LICENSE_KEY = "license"


def measure_perplexity(
    model: Any, tokenizer: Any, texts: Sequence[str], settings: dict[str, Any], *, progress: bool = True, label: str
) -> dict[str, Any]:
    """:func:`peft_lisa.evaluation.perplexity` with ``settings`` (see :func:`~.checks.check_perplexity_settings`),
    logged as ``<label> perplexity: ...``; returns its ``to_dict()`` plus the ``seconds`` it took."""
    started = time.monotonic()
    result = perplexity(model, tokenizer, texts, progress=progress, **settings)
    seconds = time.monotonic() - started
    logger.info(f"{label} perplexity: {result.ppl:.2f} ({result.num_tokens} tokens, {seconds:.0f} s)")
    return {**result.to_dict(), "seconds": round(seconds, 1)}


def sample_generations(
    model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int, label: str
) -> list[str]:
    """:func:`peft_lisa.evaluation.generate_samples` (greedy), logged."""
    logger.info(f"{label}: generating {max_new_tokens} tokens for {len(prompts)} prompt(s)")
    return generate_samples(model, tokenizer, prompts, max_new_tokens)


def perplexity_text(result: dict[str, Any], data: str, split: str) -> str:
    """``12.34 (pydoc test, 4,096 tokens, window 256, stride 128)``: a perplexity with what it was measured on."""
    return (
        f"{result['ppl']:.2f} ({data} {split}, {result['num_tokens']:,} tokens, window {result['window']}, "
        f"stride {result['stride']})"
    )


def _card_key(result: dict[str, Any], data: str, split: str, note: str = "") -> str:
    return (
        f"Perplexity ({data} {split}, {result['num_tokens']:,} tokens, window {result['window']}, "
        f"stride {result['stride']}{note})"
    )


def card_metrics(
    rank: int, align_hidden: Optional[int], metrics: Optional[dict[str, Any]], note: str = ""
) -> dict[str, Any]:
    """The lines of a model card (``save_adapter(..., metrics=)``, ``merged.save_pretrained(..., metrics=)``): the
    LiSA shape, then the perplexities in ``metrics`` (the :data:`ADAPTER_METRICS_FILE` form: ``data``, ``split``,
    ``perplexity``, optionally ``base_perplexity`` and ``base_quantization``), or that none was measured. ``note``
    is added to the perplexity line (e.g. ``"; measured with the adapter"``)."""
    card: dict[str, Any] = {"LiSA rank r (per head)": rank}
    if align_hidden is not None:
        card["Head-alignment FFN hidden size"] = align_hidden
    measured = (metrics or {}).get("perplexity")
    if measured and metrics.get("base_quantization"):
        note = f"; {metrics['base_quantization']} base{note}"
    if measured:
        key = _card_key(measured, metrics.get("data", "?"), metrics.get("split", "test"), note)
        card[key] = f"{measured['ppl']:.2f}"
    else:
        card["Perplexity"] = "not measured for this artifact"
    base = (metrics or {}).get("base_perplexity")
    if base:
        key = _card_key(base, metrics.get("data", "?"), metrics.get("split", "test"), "; base model")
        card[key] = f"{base['ppl']:.2f}"
    return card


_CARD_PPL_LINE = re.compile(r"^- (?P<key>[^:\n]*[Pp]erplexity[^:\n]*): (?P<value>[0-9.]+)\s*$", re.MULTILINE)


def adapter_recorded_metrics(adapter: str | os.PathLike) -> dict[str, Any]:
    """The perplexity recorded with an adapter: its :data:`ADAPTER_METRICS_FILE`, else the perplexity lines of its
    model card as ``{"card_lines": {key: value}}``, else ``{}``."""
    adapter = Path(adapter)
    metrics_file = adapter / ADAPTER_METRICS_FILE
    if metrics_file.is_file():
        try:
            metrics = json.loads(metrics_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            metrics = {}
        if isinstance(metrics, dict) and metrics.get("perplexity"):
            return metrics
    readme = adapter / "README.md"
    if readme.is_file():
        lines = {m["key"]: m["value"] for m in _CARD_PPL_LINE.finditer(readme.read_text(encoding="utf-8"))}
        if lines:
            return {"card_lines": lines}
    return {}


def recorded_card_metrics(
    rank: int, align_hidden: Optional[int], adapter: str | os.PathLike
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(metrics, card)`` for a merged model that was not evaluated itself: the adapter's recorded perplexity
    (:func:`adapter_recorded_metrics`), marked on the card as measured with the adapter."""
    metrics = adapter_recorded_metrics(adapter)
    if "card_lines" not in metrics:
        return metrics, card_metrics(rank, align_hidden, metrics, note="; measured with the adapter")
    card = card_metrics(rank, align_hidden, None)
    card.pop("Perplexity")
    card.update({f"{key} (measured with the adapter)": value for key, value in metrics["card_lines"].items()})
    return metrics, card


def to_json(data: Any) -> str:
    """``data`` as indented JSON text (anything not JSON-native written with ``str``)."""
    return json.dumps(data, indent=2, default=str) + "\n"


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a scratch file and a rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(f".{path.name}.tmp")
    scratch.write_text(text, encoding="utf-8")
    os.replace(scratch, path)


def perplexity_table(metrics: dict[str, Any], data: str) -> list[str]:
    """The held-out perplexities of a run side by side: one row per model (base, untrained, calibrated, trained),
    the training data's held-out part and, when measured, the second held-out text, each with its change vs base."""
    texts = [("held-out", metrics)]
    if isinstance(metrics.get(LICENSE_KEY), dict):
        texts.append(("license text", metrics[LICENSE_KEY]))
    keys = [key for key in PERPLEXITY_LABELS if key in metrics]
    if not keys:
        return []
    first = metrics[keys[0]]
    lines = [
        f"perplexity on the held-out part of {data} ({first['num_tokens']:,} tokens, window {first['window']}, stride "
        f"{first['stride']})"
        + (f" and on the license text {metrics[LICENSE_KEY].get('text')}" if len(texts) > 1 else "")
        + ":",
        f"  {'':<16}" + "".join(f"{name:>16}{'vs base':>9}" for name, _ in texts),
    ]
    if len(texts) > 1:
        lines.insert(1, LICENSE_NOTE)
    for key in keys:
        row = f"  {PERPLEXITY_LABELS[key]:<16}"
        for _, measured in texts:
            value, base = measured.get(key), measured.get("base_perplexity")
            row += f"{value['ppl']:>16.2f}" if value else f"{'':>16}"
            compared = value and base and key != "base_perplexity"
            row += f"{value['ppl'] / base['ppl'] - 1:>+9.1%}" if compared else f"{'':>9}"
        lines.append(row)
    return lines
