"""The jobs of the ``peft-lisa`` command, as Python functions: each takes a job description (a dataclass whose fields
are the command's options) and returns a result with a ``summary()`` (the report the command prints).

=======================  ===================  ================================================================
``peft-lisa analyze``    :func:`analyze`      calibration analysis, ``analysis.json`` and plots, suggested layers
``peft-lisa train``      :func:`train`        train an adapter (TRL), evaluate it, save it, ``results.json``
``peft-lisa calibrate``  :func:`calibrate`    fit an adapter layer by layer to its base model, save it
``peft-lisa eval``       :func:`evaluate`     held-out perplexity and greedy generations
``peft-lisa merge``      :func:`merge`        merge an adapter into a compact model, save it, check it reloads
=======================  ===================  ================================================================

Example::

    from peft_lisa.jobs import TrainJob, train

    result = train(TrainJob(share_fraction=0.5, max_steps=120, eval_base=True, output_dir="lisa-run"))
    print(result.summary())

Bad input raises :class:`JobInputError` (a ``ValueError``) before anything slow runs; a wrong result raises
:class:`JobFailedError`. Progress goes to the ``peft_lisa`` logger. Only :func:`train` and :func:`calibrate` need the
``train`` extras (TRL, datasets); analysing, evaluating and merging do not.

Modules, each importing only those above it: :mod:`.checks` (errors, input checks, device, base model),
:mod:`.metrics` (perplexity, model-card metrics, JSON), :mod:`.analyze_job`, :mod:`.eval_job`, :mod:`.merge_job`,
:mod:`.train_setup` (layer choice, resuming, the model to train), :mod:`.calibrate_job` and :mod:`.train_job`.
"""

from .analyze_job import AnalyzeJob, AnalyzeResult, analyze
from .calibrate_job import CalibrateJob, CalibrateResult, calibrate
from .checks import JobError, JobFailedError, JobInputError
from .eval_job import EvalJob, EvalResult, evaluate, load_adapter_model, load_merged_model
from .merge_job import MergeJob, MergeResult, check_reload, merge
from .metrics import adapter_recorded_metrics, card_metrics
from .train_job import TrainJob, TrainResult, train
from .train_setup import choose_lisa_config, config_from_checkpoint, find_checkpoint

__all__ = [
    "AnalyzeJob",
    "AnalyzeResult",
    "CalibrateJob",
    "CalibrateResult",
    "EvalJob",
    "EvalResult",
    "JobError",
    "JobFailedError",
    "JobInputError",
    "MergeJob",
    "MergeResult",
    "TrainJob",
    "TrainResult",
    "adapter_recorded_metrics",
    "analyze",
    "calibrate",
    "card_metrics",
    "check_reload",
    "choose_lisa_config",
    "config_from_checkpoint",
    "evaluate",
    "find_checkpoint",
    "load_adapter_model",
    "load_merged_model",
    "merge",
    "train",
]
