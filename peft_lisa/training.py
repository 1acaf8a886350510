"""Training LiSA adapters with TRL's ``SFTTrainer``, with optional distillation losses.

The objective is the causal-LM loss of ``SFTTrainer`` (continued pre-training on plain text with packing, or SFT on
chat data), with the base model frozen, plus two optional terms, both off by default: layer-local attention
distillation and output distillation to the adapter-disabled model (:mod:`peft_lisa.distillation`,
``docs/method.md``, "Training objective").

Use :class:`LiSATrainer` (an ``SFTTrainer``) with a :class:`LiSADistillationConfig`; with both weights at zero it is
exactly ``SFTTrainer``. :func:`lisa_sft_config` builds an ``SFTConfig`` with settings LiSA needs; the datasets come
from :mod:`peft_lisa.data` (:func:`~peft_lisa.data.text_dataset`, :func:`~peft_lisa.data.chat_dataset`,
:func:`~peft_lisa.data.load_sft_dataset`, also importable from here).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

import peft_lisa  # noqa: F401  (registers the LiSA PEFT type before SFTTrainer calls get_peft_model)

from .calibration import CalibrationReport
from .calibration_step import LiSACalibrationConfig, calibrate_before_training, dataset_texts
from .data import (  # noqa: F401  (the dataset builders, importable from here as before)
    chat_dataset,
    evaluation_texts,
    is_conversational_dataset,
    load_conversations,
    load_sft_dataset,
    text_dataset,
)
from .distillation import (  # noqa: F401  (the distillation terms, importable from here as before)
    AttentionDistiller,
    AttnKLSchedule,
    LayerReduction,
    LiSADistillationConfig,
    attention_kl,
    lm_and_output_kl,
    output_kl,
    teacher_attention_logits,
)

# --------------------------------------------------------------------------------------------------------------
# 4-bit base models on CPU
# --------------------------------------------------------------------------------------------------------------


def keep_4bit_weights_trainable(model: nn.Module) -> int:
    """Work around a bitsandbytes CPU issue that silently stops training of adapters on a 4-bit base.

    On CPUs with AVX512-BF16, bitsandbytes (0.4x-0.50) repacks the weight of a ``Linear4bit`` into an inference-only
    layout the first time the layer runs in eval mode without gradients (e.g. a perplexity evaluation), and from then
    on computes it with a kernel that has no autograd: gradients no longer flow through the frozen base layers, so
    the adapter gets no gradient (with only a warning). This turns that repacking off for every ``Linear4bit`` of
    ``model``, which also keeps evaluation on the same (float) compute path as training, and unpacks weights already
    repacked (approximately: the repacking rounded their block scales to bfloat16). Call it right after loading a
    4-bit model, before any evaluation. Returns the number of weights unpacked. A no-op without bitsandbytes or
    4-bit layers.
    """
    try:
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return 0
    restored = 0
    for module in model.modules():
        if not isinstance(module, Linear4bit):
            continue
        module.support_avx512bf16_for_cpu = False
        state = getattr(module.weight, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            data, state = _convert_weight_packed_for_cpu_inverse(module.weight.data, state)
            if not getattr(state, "nested", False) and state.absmax.dim() == 2:
                # bitsandbytes 0.50 leaves non-nested block scales in the packed (K / blocksize, N) layout.
                state.absmax = state.absmax.T.reshape(-1)
            if not getattr(state, "nested", False) and state.absmax.dtype == torch.bfloat16:
                state.absmax = state.absmax.float()
            module.weight.data, module.weight.quant_state = data, state
            if getattr(module, "quant_state", None) is not None:
                module.quant_state = state
            restored += 1
    return restored


# --------------------------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------------------------


def _checkpointing_names(args: Any) -> tuple[str, str]:
    """The names of the checkpointing switch and kwargs of these training arguments: ``activation_checkpointing*``
    since transformers 5.2x (``gradient_checkpointing*`` are deprecated aliases), ``gradient_checkpointing*`` before.
    """
    if hasattr(args, "activation_checkpointing"):
        return "activation_checkpointing", "activation_checkpointing_kwargs"
    return "gradient_checkpointing", "gradient_checkpointing_kwargs"


def _force_non_reentrant_checkpointing(args: Any) -> None:
    """With checkpointing on, make ``use_reentrant=False`` explicit (LiSA refuses anything else); refuse ``True``."""
    switch, kwargs_name = _checkpointing_names(args)
    if not getattr(args, switch, False):
        return
    checkpoint_kwargs = dict(getattr(args, kwargs_name, None) or {})
    if checkpoint_kwargs.get("use_reentrant", False):
        raise ValueError(
            "LiSA hands attention logits from layer to layer, which reentrant gradient checkpointing cannot carry: "
            f"set {kwargs_name}={{'use_reentrant': False}} (or leave use_reentrant unset)."
        )
    checkpoint_kwargs["use_reentrant"] = False
    setattr(args, kwargs_name, checkpoint_kwargs)
    if kwargs_name != "gradient_checkpointing_kwargs" and hasattr(args, "gradient_checkpointing_kwargs"):
        args.gradient_checkpointing_kwargs = checkpoint_kwargs  # the deprecated alias mirrors the new name


def _sft_trainer_cls():
    from trl import SFTTrainer

    return SFTTrainer


class LiSATrainer(_sft_trainer_cls()):
    """``trl.SFTTrainer`` for LiSA adapters, with the optional distillation terms of :class:`LiSADistillationConfig`.

    Pass the base model and ``peft_config=LiSAConfig(...)`` (``SFTTrainer`` calls ``get_peft_model``), or a
    ``PeftModel`` with a LiSA adapter. Beyond ``SFTTrainer`` it

    * enables non-reentrant gradient checkpointing when checkpointing is on without ``use_reentrant`` set (LiSA
      hands logits between layers, which reentrant checkpointing cannot carry) and refuses ``use_reentrant=True``;
    * keeps the LiSA parameters in float32 on a quantized base (``SFTTrainer`` casts trainable parameters of a
      quantized model to bfloat16, QLoRA style; pass ``keep_adapter_fp32=False`` to keep that), and applies
      :func:`keep_4bit_weights_trainable` (bitsandbytes on CPU otherwise stops gradients after any evaluation);
    * calibrates the adapter (:func:`peft_lisa.calibrate`, budget ``calibration``, on ``calibration_texts`` or the
      training dataset's texts; ``calibration_texts`` may also be token blocks, e.g. of several domains from
      :func:`peft_lisa.mixed_token_blocks`, used as they are: ``calibration.num_sequences`` and ``seq_len`` do not
      apply to them) before the first training step, unless ``calibrate=False`` or the run
      resumes from a checkpoint (whose adapter replaces it); the report is ``calibration_report``. Under DDP / FSDP
      every process calibrates, on the same texts with the same seed, before the model is wrapped; the wrapper then
      broadcasts the main process's parameters, so all processes start training from one state;
    * adds ``attn_kl_weight_at(step) * attn_kl + output_kl_weight * output_kl`` to the loss and logs ``lm_loss``,
      ``attn_kl``, ``attn_kl_weight`` and ``output_kl`` (unweighted values) next to ``loss``.

    With both distillation weights zero, ``compute_loss`` is ``SFTTrainer.compute_loss`` unchanged. With the output KL
    on, the LM loss comes from the same student logits as the KL (one LM-head pass per step,
    :func:`~peft_lisa.distillation.lm_and_output_kl`), normalised and logged as ``SFTTrainer`` does; label smoothing
    and ``compute_loss_func`` are then refused.
    """

    def __init__(
        self,
        *args: Any,
        distillation: Optional[LiSADistillationConfig] = None,
        keep_adapter_fp32: bool = True,
        calibrate: bool = True,
        calibration: Optional[LiSACalibrationConfig] = None,
        calibration_texts: Optional[Union[Iterable[str], torch.LongTensor]] = None,
        **kwargs: Any,
    ) -> None:
        self.distillation = distillation or LiSADistillationConfig()
        self.calibrate = calibrate
        self.calibration = calibration or LiSACalibrationConfig()
        self.calibration_report: Optional[CalibrationReport] = None
        self._calibrated = False
        # SFTTrainer tokenises (and packs) the dataset: keep the raw one for the calibration texts.
        raw_dataset = kwargs.get("train_dataset", args[3] if len(args) > 3 else None)
        self._calibration_source = calibration_texts if calibration_texts is not None else raw_dataset
        training_args = kwargs.get("args") if "args" in kwargs else (args[1] if len(args) > 1 else None)
        if training_args is not None:
            _force_non_reentrant_checkpointing(training_args)
        super().__init__(*args, **kwargs)
        unwrapped = self.accelerator.unwrap_model(self.model)
        quantized = getattr(unwrapped, "is_loaded_in_4bit", False) or getattr(unwrapped, "is_loaded_in_8bit", False)
        if quantized:
            keep_4bit_weights_trainable(unwrapped)
        if keep_adapter_fp32 and quantized:
            for name, param in unwrapped.named_parameters():
                if param.requires_grad and "lisa_" in name and param.dtype != torch.float32:
                    param.data = param.data.float()
        if self.distillation.output_kl_weight > 0 and (
            self.label_smoother is not None or self.compute_loss_func is not None
        ):
            raise ValueError(
                "Output distillation (output_kl_weight > 0) computes the LM loss from the logits it shares with the "
                "KL, without label smoothing or a compute_loss_func: drop label_smoothing_factor / "
                "compute_loss_func, or set output_kl_weight=0."
            )
        self.attention_distiller: Optional[AttentionDistiller] = None
        if self.distillation.attn_kl_weight > 0:
            self.attention_distiller = AttentionDistiller(unwrapped, self.distillation.attn_kl_layer_reduction)

    def calibrate_adapter(self) -> Optional[CalibrationReport]:
        """Calibrate the adapter now (once: later calls, and :meth:`train`, do not calibrate again); returns the
        report (None if the texts are shorter than one calibration sequence)."""
        if self._calibrated:
            return self.calibration_report
        texts = dataset_texts(self._calibration_source, self.processing_class)
        unwrapped = self.accelerator.unwrap_model(self.model)
        self.calibration_report = calibrate_before_training(
            unwrapped,
            self.processing_class,
            texts,
            self.calibration,
            max_length=getattr(self.args, "max_length", None),
            progress=not self.args.disable_tqdm,
        )
        self._calibrated = True
        return self.calibration_report

    def train(self, resume_from_checkpoint: Any = None, *args: Any, **kwargs: Any) -> Any:
        """``SFTTrainer.train``, after :meth:`calibrate_adapter` when ``calibrate`` is on and the run starts fresh
        (not when resuming from a checkpoint)."""
        if self.calibrate and not resume_from_checkpoint and self.state.global_step == 0:
            self.calibrate_adapter()
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Optional[torch.Tensor] = None,
    ):
        """``SFTTrainer``'s loss plus the weighted distillation terms (when any weight is non-zero).

        With the output KL on, the LM loss is computed here from the same student logits as the KL
        (:func:`~peft_lisa.distillation.lm_and_output_kl`), with ``SFTTrainer``'s normalisation and metrics."""
        config = self.distillation
        attn_weight = config.attn_kl_weight_at(self.state.global_step) if self.attention_distiller else 0.0
        use_output_kl = config.output_kl_weight > 0
        if attn_weight == 0.0 and not use_output_kl and config.lm_weight == 1.0:
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )

        mode = "train" if self.model.training else "eval"
        distiller_ctx = (
            self.attention_distiller.collect(query_mask=inputs.get("attention_mask"))
            if attn_weight > 0
            else contextlib.nullcontext()
        )
        with distiller_ctx:
            if use_output_kl:
                outputs = model(**self._logits_inputs(inputs))  # the student's B x T x V logits, with grad
            else:
                result = super().compute_loss(
                    model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
                )
                loss, outputs = result if return_outputs else (result, None)
        if use_output_kl:
            loss, out_term = self._lm_loss_and_output_kl(model, inputs, outputs, num_items_in_batch, mode)
        lm_loss = loss.detach()
        loss = loss * config.lm_weight
        # Like SFTTrainer's auxiliary loss: with num_items_in_batch the LM loss is already split over the
        # gradient-accumulation micro-batches, so split these per-micro-batch means the same way.
        steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1

        if attn_weight > 0:
            attn_term = self.attention_distiller.loss().to(loss.device)
            loss = loss + attn_weight * attn_term / steps
            self._metrics[mode]["attn_kl"].append(attn_term.item())
            self._metrics[mode]["attn_kl_weight"].append(attn_weight)
        if use_output_kl:
            loss = loss + config.output_kl_weight * out_term.to(loss.device) / steps
            self._metrics[mode]["output_kl"].append(out_term.item())
        self._metrics[mode]["lm_loss"].append(lm_loss.item())
        return (loss, outputs) if return_outputs else loss

    def _logits_inputs(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        """The model's inputs for a forward that returns the full logits (no labels: the loss is computed here)."""
        if "shift_labels" in inputs:
            raise ValueError(
                "Output distillation (output_kl_weight > 0) does not support pre-shifted labels (context or "
                "sequence parallelism); set output_kl_weight=0 or train without context parallelism."
            )
        logits_inputs = {key: value for key, value in inputs.items() if key not in ("labels", "num_items_in_batch")}
        logits_inputs["use_cache"] = False
        if self.aux_loss_enabled:  # MoE: the model returns its router load-balancing loss, as under SFTTrainer
            logits_inputs["output_router_logits"] = True
        return logits_inputs

    def _lm_loss_and_output_kl(
        self,
        model: nn.Module,
        inputs: Mapping[str, Any],
        outputs: Any,
        num_items_in_batch: Optional[torch.Tensor],
        mode: str,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``SFTTrainer``'s LM loss (with its cross-device factor and MoE auxiliary loss) and the output KL against
        the adapter-disabled model, both from the student ``outputs``; logs ``SFTTrainer``'s token metrics."""
        unwrapped = self.accelerator.unwrap_model(model)
        if not hasattr(unwrapped, "disable_adapter"):
            raise ValueError("Output distillation needs a PeftModel (its teacher is the adapter-disabled model).")
        with torch.no_grad(), unwrapped.disable_adapter():
            teacher_logits = unwrapped(**self._logits_inputs(inputs)).logits  # B x T x V
        labels = inputs["labels"] if inputs.get("labels") is not None else inputs["input_ids"]
        terms = lm_and_output_kl(
            outputs.logits,
            teacher_logits,
            labels,
            num_items_in_batch=num_items_in_batch,
            temperature=self.distillation.temperature,
            loss_type=self.args.loss_type,
        )
        loss = terms.lm_loss
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        if self.aux_loss_enabled:
            steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss / steps

        gather = self.accelerator.gather_for_metrics  # SFTTrainer's per-step metrics, from the same logits
        num_valid = gather(terms.num_scored).sum()
        for name, total in (("entropy", terms.entropy_sum), ("mean_token_accuracy", terms.num_correct)):
            self._metrics[mode][name].append((gather(total).sum() / num_valid).item() if num_valid > 0 else 0.0)
        if mode == "train":
            if "attention_mask" in inputs:
                num_tokens = gather(inputs["attention_mask"].sum()).sum().item()
            else:  # padding-free batches carry position_ids instead
                num_tokens = gather(torch.tensor(inputs["position_ids"].size(1), device=labels.device)).sum().item()
            self._total_train_tokens += num_tokens // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        return loss, terms.output_kl

    def save_distillation_config(self, output_dir: str | os.PathLike) -> None:
        """Write the distillation settings next to a saved adapter (``lisa_distillation.json``)."""
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        (Path(output_dir) / "lisa_distillation.json").write_text(json.dumps(self.distillation.to_dict(), indent=2))


# --------------------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------------------


def lisa_sft_config(
    output_dir: str | os.PathLike,
    *,
    max_steps: int = 120,
    seq_len: int = 256,
    batch_size: int = 4,
    learning_rate: float = 2e-3,
    packing: bool = True,
    gradient_checkpointing: bool = False,
    **overrides: Any,
):
    """An ``SFTConfig`` with settings that suit LiSA training (any of them can be overridden by keyword).

    * ``packing`` uses the ``"wrapped"`` strategy: the tokenised texts are concatenated and cut into blocks of
      ``seq_len`` (continued pre-training style, ``batch_size x seq_len`` tokens per step). TRL's default ``"bfd"``
      strategy is padding-free (one row of ``batch_size x seq_len`` tokens with a block-diagonal mask), which makes
      LiSA's explicit attention logits ``batch_size`` times larger; pass ``packing_strategy="bfd"`` if you want it.
    * gradient (activation) checkpointing, when on, is non-reentrant (LiSA requires it); off by default since it
      costs a recomputation of every layer and LiSA's memory is dominated by the frozen base anyway.
    * ``bf16`` only on a CUDA device that supports it (``SFTConfig`` defaults to ``bf16=True``, which on CPU means
      slow bfloat16 autocast); no checkpoints, no reporting, warm-up of 5% of the steps, cosine decay.
    """
    import dataclasses

    from trl import SFTConfig

    bf16 = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    names = {field.name for field in dataclasses.fields(SFTConfig)}
    switch, kwargs_name = (
        ("activation_checkpointing", "activation_checkpointing_kwargs")
        if "activation_checkpointing" in names
        else ("gradient_checkpointing", "gradient_checkpointing_kwargs")
    )
    settings: dict[str, Any] = dict(
        output_dir=os.fspath(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=1,
        learning_rate=learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, round(0.05 * max_steps)),
        weight_decay=0.0,
        max_length=seq_len,
        packing=packing,
        packing_strategy="wrapped",
        dataset_text_field="text",
        **{switch: gradient_checkpointing, kwargs_name: {"use_reentrant": False}},
        bf16=bf16,
        fp16=False,
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        seed=0,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
    )
    # Accept the deprecated names as overrides too, without passing both spellings.
    for old, new in (("gradient_checkpointing", switch), ("gradient_checkpointing_kwargs", kwargs_name)):
        if old != new and old in overrides:
            settings[new] = overrides.pop(old)
    settings.update(overrides)
    if settings.get(switch) and settings.get(kwargs_name) is None:
        settings[kwargs_name] = {"use_reentrant": False}
    return SFTConfig(**settings)


def adapter_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of the LiSA adapter parameters (names containing ``lisa_``)."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if "lisa_" in name}
