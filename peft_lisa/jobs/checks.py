"""What every job needs first: its errors, checks of the user's inputs, the device and dtype, and the base model.

Each check raises :class:`JobInputError` with one line that names the bad input (by its ``peft-lisa`` option, e.g.
``--adapter``; the job fields have the same names with underscores) and what is expected, before anything slow runs.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Optional

import torch

from ..analysis import AttentionAnalysis
from ..evaluation import DEFAULT_PROMPTS
from ..resources import DEFAULT_MODEL, DEFAULT_MODEL_DIRNAME, load_model_and_tokenizer
from ..tuner.config import validate_share_layers
from ..tuner.layer_choice import score_switch, validate_max_chain

logger = logging.getLogger("peft_lisa")

DTYPE_NAMES = ("float32", "bfloat16", "float16")
# How a 'peft-lisa analyze' command turns on each analyze() switch of peft_lisa.tuner.layer_choice.score_switch.
ANALYZE_SWITCH_OPTIONS = {
    "sensitivity": "without --no-sensitivity",
    "calibrated_sensitivity": "with --calibrated-sensitivity",
}
TEXT_SUFFIXES = (".txt", ".jsonl", ".json")


class JobError(Exception):
    """An expected failure of a job, told in one line that names the problem and the fix (no traceback needed)."""


class JobInputError(JobError, ValueError):
    """Bad input: a path, value or combination of options the job cannot use (``peft-lisa`` exits with code 2)."""


class JobFailedError(JobError, RuntimeError):
    """The job ran, but its result is wrong or could not be produced (``peft-lisa`` exits with code 1)."""


@dataclass(kw_only=True)
class JobOptions:
    """The options every job has: the base ``model`` (a local directory or hub id; None: the built-in
    SmolLM2-135M-Instruct), the text ``data`` (see :mod:`peft_lisa.data`: ``text_field``, the ``split`` to use and
    the ``held_out_fraction`` of a source without a test split), the ``device`` (``cpu``, ``cuda``, ``cuda:N``;
    None: cuda when available) and ``progress`` bars."""

    model: Optional[str] = None
    data: str = "pydoc"
    text_field: str = "text"
    split: str = "train"
    held_out_fraction: float = 0.1
    device: Optional[str] = None
    progress: bool = True


@dataclass(kw_only=True)
class HeldOutPerplexityOptions:
    """The perplexity a job measures on held-out text: sliding windows of ``eval_window`` tokens every
    ``eval_stride``, on the first ``eval_max_tokens`` tokens (0: all), ``eval_batch_size`` windows per forward."""

    perplexity_option_prefix: ClassVar[str] = "--eval-"  # how the command line spells these options

    eval_window: int = 256
    eval_stride: int = 128
    eval_max_tokens: int = 4096
    eval_batch_size: int = 8

    def perplexity_settings(self) -> dict[str, Any]:
        """The checked keyword arguments of :func:`peft_lisa.evaluation.perplexity` (see
        :func:`check_perplexity_settings`)."""
        window, stride, max_tokens = self.eval_window, self.eval_stride, self.eval_max_tokens
        return check_perplexity_settings(
            window, stride, max_tokens, self.eval_batch_size, option_prefix=self.perplexity_option_prefix
        )


def looks_like_path(name: str) -> bool:
    """Whether ``name`` is meant as a local path rather than a hub id (``org/name`` or ``name``)."""
    return (
        os.path.isabs(name)
        or name.startswith(("./", "../", "~", ".\\", "..\\"))
        or name in (".", "..")
        or name.count("/") > 1
        or "\\" in name
    )


def check_model_name(name: Optional[str], option: str = "--model") -> None:
    """Refuse a ``name`` that is an existing path but not a model directory, or a path that does not exist."""
    if name is None:
        return
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise JobInputError(f"{option} {name}: not a model directory (it has no config.json)")
    elif looks_like_path(name):
        raise JobInputError(f"{option} {name}: no such directory")


def check_data_source(data: str, option: str = "--data") -> None:
    """Refuse a data source that names a missing ``.txt``/``.jsonl``/``.json`` file or a missing local path."""
    if data == "pydoc":
        return
    path = Path(data).expanduser()
    if path.suffix.lower() in TEXT_SUFFIXES and not path.is_file():
        raise JobInputError(f"{option} {data}: no such file")
    if not path.exists() and looks_like_path(data):
        raise JobInputError(f"{option} {data}: no such file or directory")


def check_share_layers(layers: Any, num_layers: Optional[int] = None, option: str = "--share-layers") -> list[int]:
    """:func:`peft_lisa.tuner.config.validate_share_layers` (the one check of ``share_layers``), its error naming
    ``option``; returns the layers sorted."""
    try:
        return validate_share_layers(layers, num_layers)
    except ValueError as error:
        raise JobInputError(str(error).replace("LiSAConfig.share_layers", option, 1)) from None


def check_layer_choice(share_layers: Any, share_fraction: Optional[float], max_chain: Optional[int]) -> None:
    """The layer options of a new adapter (``train``, ``calibrate``): ``--share-layers`` (checked by
    :func:`check_share_layers`) or ``--share-fraction``, and ``--max-chain`` only for a choice from an analysis."""
    if share_layers is not None and share_fraction is not None:
        raise JobInputError("give --share-layers or --share-fraction, not both")
    if share_layers is not None:
        check_share_layers(share_layers)
        if max_chain is not None:
            raise JobInputError(
                "--max-chain caps the layers that --share-fraction chooses: drop it with --share-layers"
            )
    try:
        validate_max_chain(max_chain)
    except ValueError as error:
        raise JobInputError(f"--max-chain {max_chain}: {error}") from None


def check_analysis_score(analysis: Any, analysis_file: Any, score: str) -> None:
    """An analysis that does not hold ``score`` (``--layer-score``): a :class:`JobInputError` naming the ``peft-lisa
    analyze`` option that measures it."""
    if analysis is not None and getattr(analysis, score, None) is None:
        raise JobInputError(
            f"--analysis {analysis_file} has no {score} to choose layers by --layer-score: run 'peft-lisa analyze' "
            f"{ANALYZE_SWITCH_OPTIONS[score_switch(score)]}, or choose another --layer-score"
        )


def read_json_object(path: Path, what: str) -> dict[str, Any]:
    """The JSON object in ``path``; a :class:`JobInputError` saying it should hold ``what`` if it is not one."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise JobInputError(f"{path} is not valid JSON ({error.msg}); expected {what}") from None
    if not isinstance(data, dict):
        raise JobInputError(f"{path} holds a {type(data).__name__}; expected {what}")
    return data


def _artifact_config(name: str, option: str, config_name: str, kind: str, other: tuple[str, str]) -> dict[str, Any]:
    """The JSON ``config_name`` of the artifact directory ``name`` (``kind``: what it should be); ``other`` is the
    config file of the other kind of artifact and the hint given when it is that one instead."""
    path = Path(name).expanduser()
    if not path.exists():
        raise JobInputError(f"{option} {name}: no such directory")
    if not path.is_dir():
        raise JobInputError(f"{option} {name}: not a directory")
    if not (path / config_name).is_file():
        hint = f" (it is {other[1]})" if (path / other[0]).is_file() else ""
        raise JobInputError(f"{option} {name}: not a {kind} directory (no {config_name}){hint}")
    return read_json_object(path / config_name, f"a {kind} config")


def check_adapter_dir(name: str, option: str = "--adapter") -> tuple[Path, dict[str, Any]]:
    """The path and ``adapter_config.json`` of a LiSA adapter directory; a :class:`JobInputError` if it is not one."""
    merged_hint = ("config.json", "a merged model: use --merged")
    config = _artifact_config(name, option, "adapter_config.json", "PEFT adapter", merged_hint)
    peft_type = config.get("peft_type")
    if peft_type != "LISA":
        raise JobInputError(f"{option} {name}: not a LiSA adapter (its peft_type is {peft_type!r}, expected 'LISA')")
    path = Path(name).expanduser()
    if not (path / "adapter_model.safetensors").is_file():
        raise JobInputError(f"{option} {name}: the adapter has no adapter_model.safetensors (an interrupted save?)")
    return path, config


def check_merged_dir(name: str, option: str = "--merged") -> tuple[Path, dict[str, Any]]:
    """The path and ``config.json`` of a merged LiSA model directory; a :class:`JobInputError` if it is not one."""
    config = _artifact_config(
        name, option, "config.json", "model", ("adapter_config.json", "an adapter: use --adapter")
    )
    model_type = str(config.get("model_type", ""))
    if not model_type.startswith("lisa_") or not isinstance(config.get("lisa"), dict):
        raise JobInputError(
            f"{option} {name}: not a merged LiSA model (model_type {model_type!r}; 'peft-lisa merge' makes one)"
        )
    return Path(name).expanduser(), config


def load_analysis_file(name: str, option: str = "--analysis") -> Any:
    """The :class:`~peft_lisa.analysis.AttentionAnalysis` saved in ``name`` (an ``analysis.json``)."""
    path = Path(name).expanduser()
    if not path.is_file():
        raise JobInputError(f"{option} {name}: no such file")
    try:
        return AttentionAnalysis.from_json(path)
    except ValueError as error:
        raise JobInputError(f"{option} {name}: {error}") from None


def load_prompts(values: Optional[Sequence[str]], option: str = "--prompts") -> list[str]:
    """Prompts for sample generations: ``values`` themselves, the lines of a single ``.txt`` file, or (None or
    empty) :data:`peft_lisa.evaluation.DEFAULT_PROMPTS`."""
    if not values:
        return list(DEFAULT_PROMPTS)
    if len(values) == 1 and values[0].endswith(".txt"):
        path = Path(values[0]).expanduser()
        if not path.is_file():
            raise JobInputError(f"{option} {values[0]}: no such file")
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not prompts:
            raise JobInputError(f"{option} {values[0]}: the file has no prompts")
        return prompts
    return list(values)


def check_perplexity_settings(
    window: int, stride: int, max_tokens: Optional[int], batch_size: int, option_prefix: str = "--"
) -> dict[str, Any]:
    """The keyword arguments of :func:`peft_lisa.evaluation.perplexity` for these settings (``max_tokens`` 0 or None:
    all tokens). ``option_prefix`` names the options in errors (``"--eval-"`` gives ``--eval-stride``)."""
    if stride > window:
        raise JobInputError(
            f"{option_prefix}stride {stride} is larger than the window {window}: every token must be scored"
        )
    if window < 2:
        raise JobInputError(f"{option_prefix}window must be at least 2")
    if max_tokens == 1:
        raise JobInputError(f"{option_prefix}max-tokens must be 0 (all) or at least 2")
    return {"window": window, "stride": stride, "max_tokens": max_tokens or None, "batch_size": batch_size}


def base_model_from_hint(hint: Optional[str]) -> Optional[str]:
    """The base model recorded in an adapter or merged model, as a ``model`` value (None: the built-in one)."""
    if not hint or hint == DEFAULT_MODEL:
        return None
    path = Path(hint).expanduser()
    if path.is_dir():
        return hint
    if path.name == DEFAULT_MODEL_DIRNAME and looks_like_path(hint):
        return None  # the built-in model's cache directory on another machine
    if looks_like_path(hint):
        raise JobInputError(f"the recorded base model {hint} does not exist on this machine: pass --model")
    return hint


def resolve_device(name: Optional[str]) -> torch.device:
    """``name`` as a device (None: ``cuda`` when available, else ``cpu``); refuses an unavailable CUDA device."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise JobInputError(f"--device {name}: not a device (expected cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise JobInputError(f"--device {name}: CUDA is not available on this machine")
    return device


def resolve_dtype(name: Optional[str]) -> torch.dtype:
    """One of :data:`DTYPE_NAMES` (None: float32) as a ``torch.dtype``."""
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if (name or "float32") not in dtypes:
        raise JobInputError(f"--dtype {name}: expected one of {', '.join(DTYPE_NAMES)}")
    return dtypes[name or "float32"]


def model_label(name: Optional[str]) -> str:
    """How results name a base model: ``name``, or the built-in model's hub id marked ``(built-in)``."""
    return name or f"{DEFAULT_MODEL} (built-in)"


def load_base_model(name: Optional[str], **kwargs: Any) -> tuple[Any, Any]:
    """:func:`peft_lisa.resources.load_model_and_tokenizer`, logged, with a :class:`JobFailedError` if it fails."""
    label = name or "the built-in SmolLM2-135M-Instruct"
    logger.info(f"loading {label}")
    try:
        return load_model_and_tokenizer(name, **kwargs)
    except OSError as error:
        raise JobFailedError(f"could not load the model {label}: {error}") from None
