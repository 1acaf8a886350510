"""Setting up a training run: the model to train, the LiSA configuration (shared layers chosen explicitly, from a
calibration analysis, or taken from a checkpoint when resuming) and the checkpoint to resume from."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Optional

import torch

from ..analysis import CALIBRATED_SCORE_SETTINGS, analyze
from ..calibration_blocks import mixed_token_blocks
from ..data import load_evaluation_texts
from ..resources import DEFAULT_MODEL
from ..tuner.config import DEFAULT_ALIGN_HIDDEN, LiSAConfig
from ..tuner.layer_choice import SCORES, score_switch
from .checks import (
    JobInputError,
    JobOptions,
    check_adapter_dir,
    check_analysis_score,
    check_data_source,
    check_share_layers,
    load_base_model,
)

logger = logging.getLogger("peft_lisa")

# The job options (TrainJob / CalibrateJob fields) that choose_lisa_config takes under their own names.
NEW_ADAPTER_OPTIONS = (
    "share_layers",
    "share_fraction",
    "layer_score",
    "keep_first",
    "max_chain",
    "analysis_batches",
    "rank",
    "align_hidden",
    "head_mixing",
)
# The default score a new run chooses its layers by (any of peft_lisa.tuner.layer_choice.SCORES may be asked for),
# measured in docs/calibration/layer_choice.md: each candidate layer calibrated alone, scored by the output KL to the
# base.
DEFAULT_LAYER_SCORE = "sensitivity_calibrated"
# The LiSAConfig fields a resumed run takes from its checkpoint's adapter_config.json.
CHECKPOINT_CONFIG_KEYS = (
    "share_layers",
    "rank",
    "align_hidden",
    "head_mixing",
    "align_activation",
    "align_init_permutations",
    "rotary_frequencies",
    "init_lowrank",
)


def check_calibration_data(sources: Optional[list[str]], num_sequences: int) -> None:
    """Refuse ``--calibration-data`` sources that name missing files (see :func:`~.checks.check_data_source`), or
    more of them than ``--calibration-sequences``."""
    for source in sources or ():
        check_data_source(source, "--calibration-data")
    if sources and len(sources) > num_sequences:
        raise JobInputError(
            f"--calibration-data gives {len(sources)} sources for --calibration-sequences {num_sequences}: each "
            "source needs at least one sequence; raise --calibration-sequences or give fewer sources"
        )


def calibration_data_blocks(
    job: JobOptions, sources: Optional[list[str]], tokenizer: Any, num_sequences: int, seq_len: int
) -> Optional[torch.LongTensor]:
    """The calibration blocks of the ``--calibration-data`` ``sources`` (None without them): each source's
    ``--split`` part (with ``job``'s ``--text-field`` and ``--held-out-fraction``, chat data rendered by the
    tokenizer's template), in equal shares (:func:`peft_lisa.mixed_token_blocks`)."""
    if not sources:
        return None
    try:
        texts = [
            load_evaluation_texts(source, job.split, job.text_field, job.held_out_fraction, tokenizer)
            for source in sources
        ]
        blocks = mixed_token_blocks(tokenizer, texts, num_sequences, seq_len, names=sources)
    except ValueError as error:
        raise JobInputError(f"--calibration-data: {error} (--calibration-sequences, --seq-len)") from None
    names = ", ".join(sources)
    logger.info(f"calibrating on {len(blocks)} sequences of {seq_len} tokens from {names} in equal shares")
    return blocks


def find_checkpoint(resume: str | os.PathLike, output_dir: str | os.PathLike) -> Path:
    """The checkpoint a run resumes from: ``resume`` itself (a ``checkpoint-STEP`` directory of a run), or with
    ``resume="latest"`` the last ``checkpoint-*`` in ``output_dir``."""
    from transformers.trainer_utils import get_last_checkpoint

    output_dir = Path(output_dir)
    if resume == "latest":
        last = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
        if last is None:
            raise JobInputError(f"--resume latest: no checkpoint-* directory in {output_dir}")
        return Path(last)
    path = Path(resume).expanduser()
    if not path.is_dir():
        raise JobInputError(f"--resume {resume}: no such directory")
    if not (path / "trainer_state.json").is_file() or not (path / "adapter_config.json").is_file():
        raise JobInputError(
            f"--resume {resume}: not a training checkpoint (no trainer_state.json / adapter_config.json)"
        )
    return path


def config_from_checkpoint(
    checkpoint: str | os.PathLike,
    *,
    share_layers: Optional[list[int]] = None,
    rank: Optional[int] = None,
    align_hidden: Optional[int] = None,
) -> LiSAConfig:
    """The LiSA configuration of a checkpoint's adapter, rebuilt to continue training it.

    ``share_layers``, ``rank`` and ``align_hidden``, when given, must match the checkpoint's (the adapter's shape
    cannot change mid-run): a :class:`~.checks.JobInputError` says which differs.
    """
    _, saved = check_adapter_dir(str(checkpoint), "--resume")
    for option, key, value in (
        ("--share-layers", "share_layers", share_layers),
        ("--rank", "rank", rank),
        ("--align-hidden", "align_hidden", align_hidden),
    ):
        if key == "share_layers" and value is not None:
            value = sorted(value)
        if value is not None and saved.get(key) != value:
            raise JobInputError(
                f"{option} {value} differs from the checkpoint's {key}={saved.get(key)} ({checkpoint})"
            )
    return LiSAConfig(task_type="CAUSAL_LM", **{key: saved[key] for key in CHECKPOINT_CONFIG_KEYS if key in saved})


def choose_lisa_config(
    model: Any,
    tokenizer: Any,
    train_texts: list[str],
    *,
    share_layers: Optional[list[int]] = None,
    share_fraction: Optional[float] = None,
    layer_score: str = DEFAULT_LAYER_SCORE,
    analysis: Any = None,
    analysis_file: Optional[str | os.PathLike] = None,
    keep_first: int = 2,
    max_chain: Optional[int] = None,
    analysis_batches: int = 2,
    rank: Optional[int] = None,
    align_hidden: Optional[int] = None,
    head_mixing: Optional[str] = None,
    output_dir: str | os.PathLike = "lisa-run",
    progress: bool = True,
) -> tuple[LiSAConfig, dict[str, Any]]:
    """The :class:`~peft_lisa.LiSAConfig` of a new training run, and a record of how its layers were chosen.

    * ``share_layers`` given: exactly those (checked against the model's layer count); with an ``analysis``, its
      head permutations initialise their alignment.
    * otherwise ``share_fraction`` (default 0.5) of all layers, the lowest ``layer_score`` first and the first
      ``keep_first`` layers kept full, no run of adjacent shared layers longer than ``max_chain`` (when given;
      :meth:`LiSAConfig.from_analysis`), from ``analysis`` (loaded from
      ``analysis_file``) or, without one, from a calibration analysis of ``analysis_batches`` batches of 4 x 256
      tokens of ``train_texts`` run here and saved to ``output_dir/analysis.json``. ``layer_score``
      ``sensitivity_calibrated`` (the default) makes that analysis calibrate every candidate layer alone, at rank
      ``rank`` (``peft_lisa.analysis.CALIBRATED_SCORE_SETTINGS``); ``js_matched`` is the cheaper
      attention-similarity score (any of ``peft_lisa.tuner.layer_choice.SCORES`` may be asked for).

    ``rank`` defaults to 8, ``align_hidden`` to the library default (0: linear alignment only), ``head_mixing`` to
    ``LiSAConfig``'s.
    """
    common: dict[str, Any] = {
        "rank": rank or 8,
        "align_hidden": DEFAULT_ALIGN_HIDDEN if align_hidden is None else align_hidden,
        **({} if head_mixing is None else {"head_mixing": head_mixing}),
        "task_type": "CAUSAL_LM",
    }
    num_layers = model.config.num_hidden_layers
    if analysis is not None and analysis.num_layers != num_layers:
        raise JobInputError(
            f"--analysis {analysis_file} is of a model with {analysis.num_layers} layers, not {num_layers}"
        )
    if share_layers is not None:
        share_layers = check_share_layers(share_layers, num_layers)
        permutations = None
        if analysis is not None:
            permutations = {layer: analysis.permutations[layer] for layer in share_layers}
            permutations = {k: v for k, v in permutations.items() if v is not None} or None
        config = LiSAConfig(share_layers=share_layers, align_init_permutations=permutations, **common)
        return config, {"method": "explicit", "analysis": None if analysis_file is None else str(analysis_file)}
    fraction = 0.5 if share_fraction is None else share_fraction
    if layer_score not in SCORES:
        raise JobInputError(f"--layer-score {layer_score}: expected one of {', '.join(SCORES)}")
    switch = score_switch(layer_score)
    calibrated = switch == "calibrated_sensitivity"
    check_analysis_score(analysis, analysis_file, layer_score)
    analysis_minutes = None
    if analysis is None:
        started = time.monotonic()
        logger.info(
            f"calibration analysis for --share-fraction {fraction} ({analysis_batches} batch(es) of 4 x 256"
            f"{', each layer calibrated alone' if calibrated else ''})"
        )
        analysis = analyze(
            model,
            tokenizer,
            train_texts,
            seq_len=256,
            batch_size=4,
            max_batches=analysis_batches,
            sensitivity=switch == "sensitivity",
            calibration_rank=common["rank"],
            **(CALIBRATED_SCORE_SETTINGS if calibrated else {}),
            progress=progress,
        )
        analysis_file = Path(output_dir) / "analysis.json"
        analysis.to_json(analysis_file)  # creates the output directory
        analysis_minutes = round((time.monotonic() - started) / 60, 2)
    try:
        config = LiSAConfig.from_analysis(
            analysis, fraction=fraction, keep_first=keep_first, score=layer_score, max_chain=max_chain, **common
        )
    except ValueError as error:
        raise JobInputError(f"--share-fraction {fraction}: {error}") from None
    info = {"method": f"analysis ({layer_score})", "fraction": fraction, "keep_first": keep_first}
    if max_chain is not None:
        info["max_chain"] = max_chain
    if analysis_minutes is not None:
        info["analysis_minutes"] = analysis_minutes
    return config, {**info, "analysis": None if analysis_file is None else str(analysis_file)}


def load_training_model(name: Optional[str], device: torch.device, load_in_4bit: bool = False) -> tuple[Any, Any]:
    """The base model and tokenizer to train on ``device``: plain, or in 4-bit NF4 (bitsandbytes; compute in
    bfloat16 on CUDA, float32 on CPU) with :func:`peft_lisa.training.keep_4bit_weights_trainable` applied."""
    from ..training import keep_4bit_weights_trainable

    load_kwargs: dict[str, Any] = {}
    if load_in_4bit:
        from transformers import BitsAndBytesConfig

        compute_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        load_kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype
        )
    model, tokenizer = load_base_model(name, **load_kwargs)
    if load_in_4bit:
        keep_4bit_weights_trainable(model)  # the same float compute path for evaluation and training on CPU
    elif device.type != "cpu":
        model.to(device)
    return model, tokenizer


def portable_base_name(name: Optional[str]) -> Optional[str]:
    """What an adapter records as its base model so that it loads from anywhere: the built-in model's hub id (it
    resolves to the local copy), a local directory as an absolute path, a hub id unchanged (None: keep what the
    model says)."""
    if name is None or name == DEFAULT_MODEL:
        return DEFAULT_MODEL
    path = Path(name).expanduser()
    return str(path.resolve()) if path.is_dir() else None
