"""The calibration job (``peft-lisa calibrate``): create a LiSA adapter (or load one), fit it layer by layer to its
base model (:func:`peft_lisa.calibrate`), measure it, and save it with its per-layer report."""

from __future__ import annotations

import logging
import os
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..calibration import DEFAULT_ADAM_STEPS, DEFAULT_LR, DEFAULT_NUM_SEQUENCES
from ..calibration import calibrate as calibrate_layers
from ..data import load_evaluation_texts
from ..tuner.artifacts import atomic_directory, save_adapter
from .checks import (
    HeldOutPerplexityOptions,
    JobInputError,
    JobOptions,
    base_model_from_hint,
    check_adapter_dir,
    check_data_source,
    check_layer_choice,
    check_model_name,
    load_analysis_file,
    model_label,
    resolve_device,
)
from .metrics import ADAPTER_METRICS_FILE, card_metrics, measure_perplexity, to_json, write_text_atomic
from .train_setup import (
    DEFAULT_LAYER_SCORE,
    NEW_ADAPTER_OPTIONS,
    calibration_data_blocks,
    check_calibration_data,
    choose_lisa_config,
    load_training_model,
    portable_base_name,
)

logger = logging.getLogger("peft_lisa")

CALIBRATION_REPORT_FILE = "lisa_calibration.json"
LAYER_OPTIONS = NEW_ADAPTER_OPTIONS


@dataclass(kw_only=True)
class CalibrateJob(JobOptions, HeldOutPerplexityOptions):
    """What :func:`calibrate` does; the fields are the options of ``peft-lisa calibrate``.

    The adapter: ``adapter`` (an existing LiSA adapter directory, calibrated further), or a new one on ``model``
    (``load_in_4bit``) with the layer options of ``peft-lisa train`` (``share_layers`` or ``share_fraction``,
    ``layer_score``, ``analysis``, ``keep_first``, ``max_chain``, ``analysis_batches``, ``rank``, ``align_hidden``).
    The calibration:
    ``calibration_sequences`` of ``seq_len`` tokens of ``data`` (its ``split`` part), or of the ``calibration_data``
    sources in equal shares (their ``split`` parts; the layer choice still reads ``data``), ``batch_size`` per step,
    ``calibration_steps`` Adam steps per shared layer at ``calibration_lr``, ``calibration_copy_blocks`` (blocks of
    repeated random-token runs added, :func:`peft_lisa.calibrate`), ``seed``. ``evaluate``: the held-out
    perplexity before and after (:class:`~.checks.HeldOutPerplexityOptions`). ``output_dir`` receives ``adapter/``
    (with ``lisa_calibration.json``), ``calibration.md`` and ``results.json``.
    """

    load_in_4bit: bool = False
    adapter: Optional[str] = None
    share_layers: Optional[list[int]] = None
    share_fraction: Optional[float] = None
    layer_score: str = DEFAULT_LAYER_SCORE
    analysis: Optional[str] = None
    keep_first: int = 2
    max_chain: Optional[int] = None
    analysis_batches: int = 2
    rank: Optional[int] = None
    align_hidden: Optional[int] = None
    head_mixing: Optional[str] = None
    calibration_sequences: int = DEFAULT_NUM_SEQUENCES
    calibration_steps: int = DEFAULT_ADAM_STEPS
    calibration_copy_blocks: int = 0
    calibration_lr: float = DEFAULT_LR
    calibration_data: Optional[list[str]] = None
    seq_len: int = 256
    batch_size: int = 4
    seed: int = 0
    evaluate: bool = True
    output_dir: str | os.PathLike = "lisa-calibrated"
    command: Optional[str] = None


@dataclass
class CalibrateResult:
    """What :func:`calibrate` produced: ``results`` (also in ``results.json``), the report and the adapter."""

    results: dict[str, Any]
    report: Any
    adapter_dir: Path
    results_file: Path

    def summary(self) -> str:
        """The report ``peft-lisa calibrate`` prints: the per-layer table, the perplexities, the next commands."""
        results = self.results
        sources = ", ".join(map(str, results["calibration_data"]))
        lines = [f"shared layers: {results['share_layers']}; rank {results['rank']}; calibrated on {sources}", ""]
        lines += [self.report.to_markdown(), ""]
        metrics = self.results["metrics"]
        for key, label in (("untrained_perplexity", "before calibration"), ("perplexity", "calibrated")):
            if key in metrics:
                lines.append(f"held-out perplexity {label}: {metrics[key]['ppl']:.2f}")
        adapter, merged = shlex.quote(str(self.adapter_dir)), shlex.quote(str(self.results_file.parent / "merged"))
        lines += [
            f"adapter: {self.adapter_dir}; report: {self.results_file.parent / 'calibration.md'}",
            f"next: peft-lisa eval --adapter {adapter} --compare-base",
            f"      peft-lisa merge --adapter {adapter} --output {merged}",
        ]
        return "\n".join(lines)


def _check(job: CalibrateJob) -> Optional[dict[str, Any]]:
    check_model_name(job.model)
    check_data_source(job.data)
    check_calibration_data(job.calibration_data, job.calibration_sequences)
    check_layer_choice(job.share_layers, job.share_fraction, job.max_chain)
    chooses = job.share_layers or job.share_fraction is not None or job.analysis or job.max_chain is not None
    if job.adapter and (chooses or job.rank):
        raise JobInputError(
            "--adapter brings its own layers: drop --share-layers/--share-fraction/--analysis/--rank/--max-chain"
        )
    if job.calibration_sequences < 1 or job.calibration_steps < 0 or job.calibration_lr <= 0:
        raise JobInputError("--calibration-sequences must be >= 1, --calibration-steps >= 0, --calibration-lr > 0")
    return job.perplexity_settings() if job.evaluate else None


def _load(job: CalibrateJob, texts: list[str], out: Path) -> tuple[Any, Any, dict[str, Any]]:
    """The PEFT model to calibrate, its tokenizer and how its layers were chosen."""
    from peft import PeftModel, get_peft_model

    device = resolve_device(job.device)
    if job.adapter:
        path, saved = check_adapter_dir(job.adapter)
        name = job.model if job.model is not None else base_model_from_hint(saved.get("base_model_name_or_path"))
        model, tokenizer = load_training_model(name, device, job.load_in_4bit)
        logger.info(f"applying the adapter {path}")
        peft_model = PeftModel.from_pretrained(model, str(path), is_trainable=True)
        return peft_model, tokenizer, {"method": "from adapter", "adapter": str(path)}
    model, tokenizer = load_training_model(job.model, device, job.load_in_4bit)
    analysis = load_analysis_file(job.analysis) if job.analysis else None
    options = {name: getattr(job, name) for name in LAYER_OPTIONS}
    config, choice = choose_lisa_config(
        model, tokenizer, texts, analysis=analysis, analysis_file=job.analysis, output_dir=out, **options
    )
    peft_model = get_peft_model(model, config)
    base_name = portable_base_name(job.model)
    if base_name is not None:
        peft_model.peft_config[peft_model.active_adapter].base_model_name_or_path = base_name
    return peft_model, tokenizer, choice


def calibrate(job: CalibrateJob) -> CalibrateResult:
    """Calibrate a new or existing LiSA adapter as ``job`` says (see :class:`CalibrateJob`) and save it to
    ``job.output_dir/adapter`` with its model card, tokenizer, ``lisa_metrics.json`` and ``lisa_calibration.json``;
    write ``calibration.md`` (the per-layer report) and ``results.json``."""
    settings = _check(job)
    started = time.monotonic()
    out = Path(job.output_dir)
    texts = load_evaluation_texts(job.data, job.split, job.text_field, job.held_out_fraction)
    peft_model, tokenizer, choice = _load(job, texts, out)
    blocks = calibration_data_blocks(job, job.calibration_data, tokenizer, job.calibration_sequences, job.seq_len)
    adapter_name = peft_model.active_adapter
    config = peft_model.peft_config[adapter_name]
    metrics: dict[str, Any] = {}
    held_out: list[str] = []
    if settings is not None:
        held_out = load_evaluation_texts(job.data, "test", job.text_field, job.held_out_fraction, tokenizer)
        metrics = {"data": job.data, "split": "test"}
        if job.load_in_4bit:
            metrics["base_quantization"] = "4-bit NF4"
        metrics["untrained_perplexity"] = measure_perplexity(
            peft_model, tokenizer, held_out, settings, progress=job.progress, label="adapter before calibration"
        )
    report = calibrate_layers(
        peft_model,
        tokenizer,
        texts if blocks is None else blocks,
        num_sequences=job.calibration_sequences,
        seq_len=job.seq_len,
        batch_size=job.batch_size,
        adam_steps=job.calibration_steps,
        lr=job.calibration_lr,
        copy_blocks=job.calibration_copy_blocks,
        seed=job.seed,
        progress=job.progress,
    )
    if settings is not None:
        metrics["perplexity"] = measure_perplexity(
            peft_model, tokenizer, held_out, settings, progress=job.progress, label="calibrated adapter"
        )
    heads = peft_model.get_base_model().config.num_attention_heads
    align_hidden = config.resolved_align_hidden(heads)
    adapter_dir = out / "adapter"
    with atomic_directory(adapter_dir) as scratch:
        save_adapter(peft_model, scratch, metrics=card_metrics(config.rank, align_hidden, metrics))
        tokenizer.save_pretrained(scratch)
        (scratch / ADAPTER_METRICS_FILE).write_text(to_json(metrics), encoding="utf-8")
        (scratch / CALIBRATION_REPORT_FILE).write_text(to_json(report.to_dict()), encoding="utf-8")
    write_text_atomic(out / "calibration.md", f"# LiSA calibration\n\n{report.to_markdown()}\n")
    results = {
        "command": job.command,
        "model": model_label(job.model),
        "load_in_4bit": job.load_in_4bit,
        "data": job.data,
        "calibration_data": job.calibration_data or [job.data],
        "share_layers": list(config.share_layers),
        "layer_choice": choice,
        "rank": config.rank,
        "align_hidden": align_hidden,
        "calibration": report.to_dict(),
        "metrics": metrics,
        "adapter_dir": str(adapter_dir),
        "total_minutes": round((time.monotonic() - started) / 60, 2),
    }
    results_file = out / "results.json"
    write_text_atomic(results_file, to_json(results))
    return CalibrateResult(results, report, adapter_dir, results_file)
