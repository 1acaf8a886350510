"""The merge job (``peft-lisa merge``): merge a LiSA adapter into a standalone compact model, save it atomically with
its model card, and check that the saved model reloads to the same outputs."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..data import load_evaluation_texts
from ..tuner.artifacts import atomic_directory
from ..tuner.compression import qk_compression_report
from . import checks
from .checks import HeldOutPerplexityOptions, JobFailedError, JobInputError, JobOptions
from .eval_job import load_adapter_model
from .metrics import (
    ADAPTER_METRICS_FILE,
    card_metrics,
    measure_perplexity,
    perplexity_text,
    recorded_card_metrics,
    to_json,
)

logger = logging.getLogger("peft_lisa")


@dataclass(kw_only=True)
class MergeJob(JobOptions, HeldOutPerplexityOptions):
    """What :func:`merge` does; the fields are the options of ``peft-lisa merge`` (and those of
    :class:`~.checks.JobOptions`, ``model`` None: the one recorded in the adapter; ``split`` "test" by default).

    Args:
        adapter: the LiSA adapter directory; output: the directory for the merged model.
        dtype: saved dtype (``float32``, ``bfloat16``, ``float16``).
        verify: reload the saved model and check that it gives the same outputs (:func:`check_reload`).
        evaluate: measure the merged model's perplexity on the ``split`` part of ``data``
            (:class:`~.checks.HeldOutPerplexityOptions`) for its card; without it the card carries the perplexity
            recorded with the adapter.
    """

    adapter: str | os.PathLike
    output: str | os.PathLike
    dtype: str = "float32"
    verify: bool = True
    evaluate: bool = False
    split: str = "test"


@dataclass
class MergeResult:
    """What :func:`merge` produced: the merged model's directory, compression report, parameter counts, metrics."""

    output: Path
    model_type: str
    report: Any
    params_before: int
    params_after: int
    metrics: dict[str, Any]

    def summary(self) -> str:
        """The report ``peft-lisa merge`` prints."""
        fewer = 100 * (1 - self.params_after / self.params_before)
        lines = [
            self.report.to_markdown(),
            "",
            f"parameters: {self.params_before:,} -> {self.params_after:,} ({fewer:.2f}% fewer); Q/K of the shared "
            f"layers {self.report.ratio:.2f}x smaller",
        ]
        measured = self.metrics.get("perplexity")
        if measured:
            text = perplexity_text(measured, self.metrics.get("data", "?"), self.metrics.get("split", "test"))
            lines.append(f"perplexity: {text}")
        lines.append(f"merged model: {self.output} (model_type {self.model_type}; load it after 'import peft_lisa')")
        return "\n".join(lines)


def check_reload(merged: Any, directory: str | os.PathLike, dtype: torch.dtype, device: Any = None) -> None:
    """Reload the merged model saved in ``directory`` and check that it is of the same class and gives the same
    logits as ``merged`` on a fixed input (tolerance 1e-4 in float32, 5e-2 in half precision); a
    :class:`~.checks.JobFailedError` otherwise."""
    from transformers import AutoModelForCausalLM

    device = device if device is not None else next(merged.parameters()).device
    ids = torch.tensor([[(i * 7 + 3) % merged.config.vocab_size for i in range(16)]], device=device)
    reloaded = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).to(device).eval()
    saved, loaded = merged.state_dict(), reloaded.state_dict()
    if type(reloaded) is not type(merged) or saved.keys() != loaded.keys():
        raise JobFailedError(f"the merged model saved to {directory} reloads as a different model")
    changed = [name for name, value in saved.items() if not torch.equal(value.to(loaded[name].device), loaded[name])]
    if dtype == torch.float32 and changed:
        raise JobFailedError(f"the merged model saved to {directory} reloads with other weights: {changed[:3]}")
    with torch.no_grad():
        expected, actual = merged(ids).logits.float(), reloaded(ids).logits.float()
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    if not torch.allclose(expected, actual, atol=tolerance, rtol=tolerance):
        difference = (expected - actual).abs().max().item()
        if not _has_experts(merged.config):
            raise JobFailedError(f"the merged model saved to {directory} does not reload to the same outputs")
        # Mixture-of-experts routing picks the top experts: float rounding at the 1e-8 level can flip a near tie.
        logger.warning(
            "reloaded the saved model: same weights; outputs differ by up to %.3g where expert routing flipped",
            difference,
        )
        return
    logger.info("reloaded the saved model: same outputs")


def _has_experts(config: Any) -> bool:
    """Whether the model routes tokens to experts (Mixtral, Qwen3-MoE...)."""
    return any(getattr(config, name, None) for name in ("num_local_experts", "num_experts"))


def merge(job: MergeJob) -> MergeResult:
    """Merge the LiSA adapter ``job.adapter`` into its base model (``merge_and_unload()``: the shared layers lose
    ``q_proj``/``k_proj``) and save the merged model and tokenizer atomically to ``job.output`` with a model card
    (:func:`~.metrics.card_metrics`) and ``lisa_metrics.json``; then, unless ``job.verify`` is off, reload it and
    compare (:func:`check_reload`)."""
    checks.check_model_name(job.model)
    device = checks.resolve_device(job.device)
    dtype = checks.resolve_dtype(job.dtype)
    adapter, adapter_config = checks.check_adapter_dir(str(job.adapter))
    output = Path(job.output).expanduser()
    if output.exists() and not output.is_dir():
        raise JobInputError(f"--output {job.output}: exists and is not a directory")
    if output.resolve() == adapter.resolve():
        raise JobInputError("--output must not be the adapter directory")
    settings = None
    if job.evaluate:
        checks.check_data_source(job.data)
        settings = job.perplexity_settings()

    peft_model, tokenizer, _ = load_adapter_model(adapter, adapter_config, job.model, dtype)
    params_before = sum(p.numel() for name, p in peft_model.named_parameters() if "lisa_" not in name)  # the base
    logger.info("merging (merge_and_unload)")
    merged = peft_model.merge_and_unload().to(device).eval()
    params_after = sum(p.numel() for p in merged.parameters())
    report = qk_compression_report(merged)
    spec = merged.config.lisa

    if settings is not None:
        texts = load_evaluation_texts(job.data, job.split, job.text_field, job.held_out_fraction, tokenizer)
        measured = measure_perplexity(merged, tokenizer, texts, settings, progress=job.progress, label="merged model")
        metrics: dict[str, Any] = {"data": job.data, "split": job.split, "perplexity": measured}
        card = card_metrics(spec["rank"], spec["align_hidden"], metrics)
    else:
        metrics, card = recorded_card_metrics(spec["rank"], spec["align_hidden"], adapter)

    logger.info(f"saving to {output}")
    with atomic_directory(output) as scratch:
        merged.save_pretrained(scratch, metrics=card)
        tokenizer.save_pretrained(scratch)
        (scratch / ADAPTER_METRICS_FILE).write_text(to_json(metrics), encoding="utf-8")
    if job.verify:
        check_reload(merged, output, dtype, device)
    return MergeResult(output, merged.config.model_type, report, params_before, params_after, metrics)
