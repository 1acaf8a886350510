"""Calibration as the first step of training: the budget :class:`LiSACalibrationConfig` and the step itself,
:func:`calibrate_before_training`, which :class:`peft_lisa.training.LiSATrainer` and ``peft-lisa train`` run before
the first optimizer step (``docs/method.md``, "Calibration")."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any, Optional, Union

import torch
from torch import nn

from .calibration import DEFAULT_ADAM_STEPS, DEFAULT_LR, DEFAULT_NUM_SEQUENCES, CalibrationReport, calibrate

logger = logging.getLogger("peft_lisa")


@dataclass
class LiSACalibrationConfig:
    """The budget of the calibration that runs before training (see :func:`peft_lisa.calibrate`).

    Args:
        num_sequences: calibration sequences, read from the training texts.
        adam_steps: Adam steps per shared layer (after ``lbfgs_steps`` L-BFGS iterations on ``P``).
        lr: Adam learning rate (cosine-decayed).
        lbfgs_steps: L-BFGS iterations on the head alignment ``P`` per shared layer.
        seq_len: tokens per calibration sequence; None: the training's ``max_length``, at most 256.
        batch_size: sequences per base-model forward and per Adam step.
        copy_blocks: blocks of repeated random-token runs added to the calibration sequences (see
            :func:`peft_lisa.calibrate`); 0: text only.
        seed: seed of the Adam mini-batch order.
    """

    num_sequences: int = DEFAULT_NUM_SEQUENCES
    adam_steps: int = DEFAULT_ADAM_STEPS
    lr: float = DEFAULT_LR
    lbfgs_steps: int = 10
    seq_len: Optional[int] = None
    batch_size: int = 4
    copy_blocks: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_sequences < 1 or self.batch_size < 1:
            raise ValueError("LiSACalibrationConfig needs num_sequences >= 1 and batch_size >= 1.")
        if self.adam_steps < 0 or self.lbfgs_steps < 0 or self.copy_blocks < 0:
            raise ValueError("LiSACalibrationConfig needs adam_steps, lbfgs_steps and copy_blocks >= 0.")
        if self.lr <= 0:
            raise ValueError(f"LiSACalibrationConfig.lr must be > 0, got {self.lr}.")
        if self.seq_len is not None and self.seq_len < 2:
            raise ValueError(f"LiSACalibrationConfig.seq_len must be >= 2 (or None), got {self.seq_len}.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def dataset_texts(source: Any, tokenizer: Any = None) -> Iterable[str]:
    """The calibration texts of a training run: ``source`` itself if it is texts, else (a dataset) lazily its
    ``"text"`` column, or each ``"messages"`` conversation rendered with the tokenizer's chat template
    (:func:`peft_lisa.data.render_conversation`)."""
    from .data import render_conversation

    if source is None:
        raise ValueError("LiSATrainer has no texts to calibrate on: pass calibration_texts=..., or calibrate=False.")
    if not hasattr(source, "column_names"):
        return source
    columns = source.column_names or []
    if "text" in columns:
        return (row["text"] for row in source)
    if "messages" in columns:
        return (render_conversation(row["messages"], tokenizer) for row in source)
    raise ValueError(
        f"Calibration before training reads the training texts, but the dataset has no 'text' or 'messages' column "
        f"(columns: {columns}): pass calibration_texts=... to LiSATrainer, or calibrate=False."
    )


def calibration_seq_len(config: LiSACalibrationConfig, max_length: Optional[int] = None) -> int:
    """Tokens per calibration sequence before training: ``config.seq_len``, else the training's ``max_length``
    capped at 256."""
    return config.seq_len or min(256, max_length or 256)


def calibrate_before_training(
    peft_model: nn.Module,
    tokenizer: Any,
    texts: Union[Iterable[str], torch.LongTensor],
    config: LiSACalibrationConfig,
    *,
    max_length: Optional[int] = None,
    progress: bool = True,
) -> Optional[CalibrationReport]:
    """Run :func:`peft_lisa.calibrate` with the budget of ``config`` on ``texts`` (sequences of ``config.seq_len``
    tokens, by default the training's ``max_length`` capped at 256) and log its per-layer report.

    Returns the report, or None (with a warning) when the texts are shorter than one calibration sequence.
    """
    seq_len = calibration_seq_len(config, max_length)
    try:
        report = calibrate(
            peft_model,
            tokenizer,
            texts,
            num_sequences=config.num_sequences,
            seq_len=seq_len,
            batch_size=config.batch_size,
            lbfgs_steps=config.lbfgs_steps,
            adam_steps=config.adam_steps,
            lr=config.lr,
            copy_blocks=config.copy_blocks,
            seed=config.seed,
            progress=progress,
        )
    except ValueError as error:
        if "fewer than one sequence" not in str(error):
            raise
        logger.warning("calibration skipped: %s", error)
        return None
    logger.info("calibration before training:\n%s", report.to_markdown())
    return report


__all__ = ["LiSACalibrationConfig", "calibrate_before_training", "calibration_seq_len", "dataset_texts"]
