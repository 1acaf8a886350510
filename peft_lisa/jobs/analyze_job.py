"""The calibration-analysis job (``peft-lisa analyze``): measure, save ``analysis.json`` and plots, suggest layers."""

from __future__ import annotations

import logging
import os
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..analysis import CALIBRATED_SCORE_SETTINGS, choose_share_layers
from ..analysis import analyze as run_analysis
from ..data import load_evaluation_texts
from ..tuner.layer_choice import SCORES, score_switch
from .checks import (
    ANALYZE_SWITCH_OPTIONS,
    JobInputError,
    JobOptions,
    check_data_source,
    check_model_name,
    load_base_model,
    resolve_device,
)

logger = logging.getLogger("peft_lisa")


@dataclass(kw_only=True)
class AnalyzeJob(JobOptions):
    """What :func:`analyze` does; the fields are the options of ``peft-lisa analyze`` (and those of
    :class:`~.checks.JobOptions`: model, calibration data, device, progress).

    Args:
        seq_len, batch_size, max_batches: calibration blocks of ``seq_len`` tokens, ``batch_size`` per forward.
        sensitivity: also measure each layer's loss rise when it alone shares (one extra forward per layer).
        calibrated_sensitivity: also measure ``sensitivity_calibrated``, each layer calibrated alone and scored by
            the output KL to the base (``peft_lisa.analyze(..., **CALIBRATED_SCORE_SETTINGS)``).
        fraction, keep_first, score: the ``share_layers`` suggestion (:func:`peft_lisa.choose_share_layers`).
        output_dir: where ``analysis.json``, ``attention_heatmap.png`` and ``attention_layers.png`` go.
    """

    seq_len: int = 256
    batch_size: int = 4
    max_batches: int = 8
    sensitivity: bool = True
    calibrated_sensitivity: bool = False
    fraction: float = 0.5
    keep_first: int = 2
    score: str = "js_matched"
    output_dir: str | os.PathLike = "lisa-analysis"


@dataclass
class AnalyzeResult:
    """What :func:`analyze` produced: the analysis, the files written and the suggested ``share_layers`` (None, with
    ``no_suggestion`` saying why, when the analysis gives none)."""

    job: AnalyzeJob
    analysis: Any
    seconds: float
    files: list[Path] = field(default_factory=list)
    share_layers: Optional[list[int]] = None
    no_suggestion: Optional[str] = None

    def summary(self) -> str:
        """The report ``peft-lisa analyze`` prints: the per-layer table, the suggestion and the next command."""
        analysis, job = self.analysis, self.job
        lines = [
            analysis.summary_table(),
            "",
            f"{analysis.num_sequences} sequences x {analysis.seq_len} tokens, {analysis.query_rows} query rows each; "
            f"JS divergences in bits, loss rises and output KL in nats ({self.seconds:.0f} s)",
        ]
        if self.share_layers is None:
            lines.append(f"no share_layers suggestion: {self.no_suggestion}")
        else:
            lines.append(
                f"suggested share_layers ({len(self.share_layers)} of {analysis.num_layers} layers, fraction "
                f"{job.fraction}, lowest {job.score}, first {job.keep_first} kept full): "
                f"{','.join(map(str, self.share_layers))}"
            )
            model_flag = f" --model {shlex.quote(job.model)}" if job.model else ""
            analysis_file = Path(job.output_dir) / "analysis.json"
            lines.append(
                f"train with: peft-lisa train{model_flag} --analysis {shlex.quote(str(analysis_file))} "
                f"--share-fraction {job.fraction} --layer-score {job.score}"
            )
        lines.append("wrote " + ", ".join(str(path) for path in self.files))
        return "\n".join(lines)


def analyze(job: AnalyzeJob) -> AnalyzeResult:
    """Run a calibration analysis (:func:`peft_lisa.analyze`) of ``job.model`` on ``job.data``, save it to
    ``job.output_dir/analysis.json`` (atomically) with its two plots (when matplotlib is installed), and suggest
    ``share_layers``. Needs no training extras (no TRL)."""
    check_model_name(job.model)
    check_data_source(job.data)
    device = resolve_device(job.device)
    if job.score not in SCORES:
        raise JobInputError(f"--score {job.score}: expected one of {', '.join(SCORES)}")
    switch = score_switch(job.score)
    if switch is not None and not getattr(job, switch):
        raise JobInputError(f"--score {job.score} is measured only by an analysis {ANALYZE_SWITCH_OPTIONS[switch]}")

    model, tokenizer = load_base_model(job.model)
    model.to(device)
    texts = load_evaluation_texts(job.data, job.split, job.text_field, job.held_out_fraction, tokenizer)
    logger.info(
        f"analysing on {job.data} ({job.split}, {len(texts)} documents): up to {job.max_batches} batches of "
        f"{job.batch_size} x {job.seq_len} tokens{', with sensitivity' if job.sensitivity else ''}"
    )
    started = time.monotonic()
    analysis = run_analysis(
        model,
        tokenizer,
        texts,
        seq_len=job.seq_len,
        batch_size=job.batch_size,
        max_batches=job.max_batches,
        sensitivity=job.sensitivity,
        **(CALIBRATED_SCORE_SETTINGS if job.calibrated_sensitivity else {}),
        progress=job.progress,
    )
    result = AnalyzeResult(job, analysis, time.monotonic() - started)
    out = Path(job.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    scratch = out / ".analysis.json.tmp"
    analysis.to_json(scratch)
    os.replace(scratch, out / "analysis.json")
    result.files.append(out / "analysis.json")
    try:
        result.files.append(Path(analysis.plot_heatmap(out / "attention_heatmap.png")))
        result.files.append(Path(analysis.plot_layers(out / "attention_layers.png")))
    except ImportError as error:
        logger.warning(f"no plots: {error} (pip install matplotlib)")
    try:
        result.share_layers = choose_share_layers(
            analysis, fraction=job.fraction, keep_first=job.keep_first, score=job.score
        )
    except ValueError as error:
        result.no_suggestion = str(error)
    return result
