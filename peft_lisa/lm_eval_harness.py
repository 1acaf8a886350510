"""lm-evaluation-harness on a base model, a LiSA adapter (``PeftModel``) or a merged LiSA model.

:func:`evaluate_tasks` wraps an already loaded model in lm-eval's ``HFLM(pretrained=model, tokenizer=tokenizer)``
and runs ``lm_eval.simple_evaluate`` on hub tasks (``hellaswag``, ``arc_easy``, ... downloaded by ``datasets``) or on
local task YAMLs from ``task_dir``. Needs the ``eval`` extra (``pip install peft-lisa[eval]``, lm_eval 0.4.x).

Example::

    from peft_lisa.lm_eval_harness import evaluate_tasks, task_table
    results = evaluate_tasks(peft_model, tokenizer, ["hellaswag", "arc_easy"], batch_size=8, limit=200)
    print(task_table({"LiSA adapter": results}))
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any, Optional

logger = logging.getLogger("peft_lisa")

EVAL_EXTRA_HINT = "lm-evaluation-harness is not installed: pip install 'peft-lisa[eval]' (or pip install lm_eval)"


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as error:
        raise ImportError(EVAL_EXTRA_HINT) from error
    return lm_eval, HFLM, TaskManager


@functools.lru_cache(maxsize=8)
def _task_manager(task_dir: Optional[str]) -> Any:
    """lm-eval's task index (built once per ``task_dir``: indexing lm-eval's thousands of task YAMLs takes seconds)."""
    _, _, TaskManager = _lm_eval()
    return TaskManager(include_path=task_dir)


def evaluate_tasks(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[str],
    *,
    task_dir: Optional[str | os.PathLike] = None,
    batch_size: int = 1,
    num_fewshot: Optional[int] = None,
    limit: Optional[int | float] = None,
    log_samples: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """Run the lm-evaluation-harness ``tasks`` on ``model`` (a loaded causal LM, ``PeftModel`` or merged model).

    Args:
        model: the model, already on its device and in eval mode (lm-eval does not move it).
        tokenizer: its tokenizer.
        tasks: task or group names: lm-eval's built-in ones (their data come from the Hugging Face hub) and those
            defined by the YAML files in ``task_dir``.
        task_dir: a folder of task YAMLs (lm-eval's ``include_path``), e.g. local tasks on local data.
        batch_size, num_fewshot, limit: as in ``lm_eval.simple_evaluate`` (``limit``: documents per task, or a
            fraction).
        log_samples: keep the per-document requests and responses (``results["samples"]``).
        seed: the random, numpy, torch and few-shot seeds.

    Returns:
        lm-eval's result dictionary: ``results[task][metric + ",none"]`` (e.g. ``"acc,none"``), ``configs``,
        ``versions``, ``n-samples`` and, with ``log_samples``, ``samples``.
    """
    lm_eval, HFLM, _ = _lm_eval()
    if not tasks:
        raise ValueError("evaluate_tasks needs at least one task name (e.g. ['hellaswag']).")
    if task_dir is not None and not os.path.isdir(task_dir):
        raise FileNotFoundError(f"task directory {task_dir} does not exist: pass a folder of lm-eval task YAMLs.")
    manager = _task_manager(os.path.abspath(task_dir) if task_dir is not None else None)
    missing = [name for name in tasks if name not in manager.all_tasks]
    if missing:
        where = f" or in {task_dir}" if task_dir is not None else " (pass --task-dir for local task YAMLs)"
        raise ValueError(f"unknown lm-eval task(s) {missing}: not among lm-eval's tasks{where}.")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    logger.info(f"lm-eval: {', '.join(tasks)} on {type(model).__name__}")
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(tasks),
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=manager,
        log_samples=log_samples,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    if results is None:  # lm-eval returns None on non-zero ranks
        return {}
    return results


def task_metrics(results: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` from lm-eval results (``"acc,none"`` becomes ``"acc"``; stderr kept as
    ``"acc_stderr"``); non-numeric entries (aliases) are dropped."""
    table: dict[str, dict[str, float]] = {}
    for task, metrics in results.get("results", {}).items():
        row = {}
        for key, value in metrics.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            metric, _, _filter = key.partition(",")
            row[metric] = float(value)
        table[task] = row
    return table


def task_table(results_by_model: Mapping[str, Mapping[str, Any]], metrics: Sequence[str] = ("acc", "acc_norm")) -> str:
    """A plain-text table: one row per (model, task), one column per metric present (``value ± stderr``)."""
    rows = []
    for label, results in results_by_model.items():
        for task, values in task_metrics(results).items():
            cells = []
            for metric in metrics:
                if metric in values:
                    stderr = values.get(f"{metric}_stderr")
                    cells.append(f"{values[metric]:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else ""))
                else:
                    cells.append("-")
            rows.append((label, task, *cells))
    header = ("model", "task", *metrics)
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)) for row in [header, *rows]
    ]
    return "\n".join(line.rstrip() for line in lines)
