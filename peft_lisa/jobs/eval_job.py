"""The evaluation job (``peft-lisa eval``): held-out perplexity and greedy generations of a base model, a LiSA adapter
on its base model, or a merged LiSA model. Needs no training extras (no TRL)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional

from ..data import load_evaluation_texts
from ..tuner.compression import qk_compression_report
from . import checks
from .checks import HeldOutPerplexityOptions, JobInputError, JobOptions
from .metrics import measure_perplexity, perplexity_text, sample_generations, to_json, write_text_atomic

logger = logging.getLogger("peft_lisa")


@dataclass(kw_only=True)
class EvalJob(JobOptions, HeldOutPerplexityOptions):
    """What :func:`evaluate` does; the fields are the options of ``peft-lisa eval`` (and those of
    :class:`~.checks.JobOptions`; ``model`` None: the one recorded in ``adapter``/``merged``, else the built-in one;
    ``split`` "test" by default).

    Args:
        adapter: a LiSA adapter directory, evaluated on ``model``; or
        merged: a merged LiSA model directory (``peft-lisa merge``).
        compare_base: with ``adapter``, also evaluate the base model (adapter disabled).
        dtype: weights dtype, ``float32``, ``bfloat16`` or ``float16``.
        perplexity: measure the perplexity (:class:`~.checks.HeldOutPerplexityOptions`, spelled ``--window``,
            ``--stride``, ... on the command line) on the ``split`` part of ``data``.
        prompts, max_new_tokens: greedy generations (prompts None: the built-in ones; 0 tokens: none).
        json: also write the results to this JSON file.
        tasks: lm-evaluation-harness tasks to run on the model (``--tasks hellaswag,arc_easy``; needs the ``eval``
            extra), with ``task_dir`` (a folder of local task YAMLs), ``task_batch_size``, ``task_limit``
            (documents per task) and ``num_fewshot``; see :func:`peft_lisa.lm_eval_harness.evaluate_tasks`.
    """

    adapter: Optional[str] = None
    merged: Optional[str] = None
    compare_base: bool = False
    dtype: str = "float32"
    split: str = "test"
    perplexity: bool = True
    prompts: Optional[list[str]] = None
    max_new_tokens: int = 40
    json: Optional[str | os.PathLike] = None
    tasks: Optional[list[str]] = None
    task_dir: Optional[str | os.PathLike] = None
    task_batch_size: int = 1
    task_limit: Optional[float] = None
    num_fewshot: Optional[int] = None

    perplexity_option_prefix: ClassVar[str] = "--"


@dataclass
class EvalResult:
    """What :func:`evaluate` measured: ``results`` (what ``--json`` writes) and the generations by model kind."""

    results: dict[str, Any]
    prompts: list[str] = field(default_factory=list)
    generations: dict[str, list[str]] = field(default_factory=dict)
    json_file: Optional[Path] = None

    def summary(self) -> str:
        """The report ``peft-lisa eval`` prints."""
        results = self.results
        adapter, kind = results["adapter"], results["kind"]
        lines = [f"model: {results['model']}" + (f" with the LiSA adapter {adapter}" if adapter else f" ({kind})")]
        if "share_layers" in results:
            lines.append(f"shared layers: {results['share_layers']}; Q/K compression {results['qk_compression']:.2f}x")
        if "perplexity" in results:
            lines.append(f"perplexity: {perplexity_text(results['perplexity'], results['data'], results['split'])}")
        if "base_perplexity" in results:
            text = perplexity_text(results["base_perplexity"], results["data"], results["split"])
            lines.append(f"base model perplexity: {text}")
        if "lm_eval" in results:
            from ..lm_eval_harness import task_table

            lines.append("lm-evaluation-harness:")
            lines.append(task_table({results["kind"]: {"results": results["lm_eval"]}}))
        for index, prompt in enumerate(self.prompts):
            lines.append(f"\n>>> {prompt}")
            for key, samples in self.generations.items():
                lines.append(f"  [{key}] {samples[index]!r}" if len(self.generations) > 1 else f"  {samples[index]!r}")
        if self.json_file is not None:
            lines.append(f"\nwrote {self.json_file}")
        return "\n".join(lines)


def load_merged_model(
    path: str | os.PathLike, config: dict[str, Any], model: Optional[str] = None, dtype: Any = None
) -> tuple[Any, Any]:
    """A merged LiSA model and its tokenizer (saved with it, else the recorded base model's, else ``model``'s)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..resources import resolve_model_path

    path = Path(path)
    logger.info(f"loading the merged model {path}")
    merged = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    if (path / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(path)
    else:
        base = model if model is not None else checks.base_model_from_hint(config["lisa"].get("base_model"))
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(base))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return merged, tokenizer


def load_adapter_model(
    adapter: str | os.PathLike, config: dict[str, Any], model: Optional[str] = None, dtype: Any = None
) -> tuple[Any, Any, Optional[str]]:
    """``(peft_model, tokenizer, base_name)``: the LiSA adapter on ``model`` (None: the base model it records)."""
    from peft import PeftModel

    base_name = model if model is not None else checks.base_model_from_hint(config.get("base_model_name_or_path"))
    base, tokenizer = checks.load_base_model(base_name, dtype=dtype)
    logger.info(f"applying the adapter {adapter}")
    return PeftModel.from_pretrained(base, str(adapter)), tokenizer, base_name


def evaluate(job: EvalJob) -> EvalResult:
    """Evaluate a base model, an adapter or a merged model as ``job`` says (see :class:`EvalJob`): shared layers and
    Q/K compression, held-out perplexity, greedy generations; with ``compare_base`` the adapter's base model too."""
    checks.check_model_name(job.model)
    checks.check_data_source(job.data)
    device = checks.resolve_device(job.device)
    dtype = checks.resolve_dtype(job.dtype)
    settings = job.perplexity_settings() if job.perplexity else None
    if job.adapter and job.merged:
        raise JobInputError("give --adapter or --merged, not both")
    if job.compare_base and not job.adapter:
        raise JobInputError("--compare-base needs --adapter (it evaluates the adapter's base model too)")
    adapter = merged = None
    if job.adapter:
        adapter, adapter_config = checks.check_adapter_dir(job.adapter)
    if job.merged:
        merged, merged_config = checks.check_merged_dir(job.merged)
    prompts = checks.load_prompts(job.prompts) if job.max_new_tokens else []
    if job.task_dir is not None and not Path(job.task_dir).is_dir():
        raise JobInputError(f"--task-dir {job.task_dir}: not a directory (a folder of lm-eval task YAMLs)")
    if job.task_dir is not None and not job.tasks:
        raise JobInputError("--task-dir needs --tasks (the task names to run)")

    base_name = job.model
    if merged is not None:
        model, tokenizer = load_merged_model(merged, merged_config, job.model, dtype)
        kind = "merged LiSA model"
    elif adapter is not None:
        model, tokenizer, base_name = load_adapter_model(adapter, adapter_config, job.model, dtype)
        kind = "LiSA adapter"
    else:
        model, tokenizer = checks.load_base_model(job.model, dtype=dtype)
        kind = "base model"
    model.to(device).eval()

    results: dict[str, Any] = {
        "model": str(merged) if merged is not None else checks.model_label(base_name),
        "adapter": str(adapter) if adapter is not None else None,
        "merged": str(merged) if merged is not None else None,
        "kind": kind,
        "dtype": job.dtype,
        "data": job.data,
        "split": job.split,
    }
    if kind != "base model":
        report = qk_compression_report(model)
        results["share_layers"] = [row.layer for row in report.layers]
        results["qk_compression"] = report.ratio
    if settings is not None:
        texts = load_evaluation_texts(job.data, job.split, job.text_field, job.held_out_fraction, tokenizer)
        results["perplexity"] = measure_perplexity(
            model, tokenizer, texts, settings, progress=job.progress, label=kind
        )
        if job.compare_base:
            with model.disable_adapter():
                results["base_perplexity"] = measure_perplexity(
                    model, tokenizer, texts, settings, progress=job.progress, label="base model"
                )
    if job.tasks:
        from ..lm_eval_harness import evaluate_tasks

        limit = job.task_limit
        if limit is not None and float(limit).is_integer() and limit >= 1:
            limit = int(limit)
        harness = evaluate_tasks(
            model,
            tokenizer,
            job.tasks,
            task_dir=job.task_dir,
            batch_size=job.task_batch_size,
            limit=limit,
            num_fewshot=job.num_fewshot,
        )
        results["lm_eval"] = harness.get("results", {})
    generations: dict[str, list[str]] = {}
    if prompts:
        generations[kind] = sample_generations(model, tokenizer, prompts, job.max_new_tokens, kind)
        if job.compare_base:
            with model.disable_adapter():
                generations["base model"] = sample_generations(
                    model, tokenizer, prompts, job.max_new_tokens, "base model"
                )
        results["generations"] = [
            {"prompt": prompt, **{key: samples[index] for key, samples in generations.items()}}
            for index, prompt in enumerate(prompts)
        ]
    json_file = None
    if job.json:
        json_file = Path(job.json)
        write_text_atomic(json_file, to_json(results))
    return EvalResult(results, prompts, generations, json_file)
