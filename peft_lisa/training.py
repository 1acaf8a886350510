"""Training LiSA adapters with TRL's ``SFTTrainer``, with optional distillation losses.

The objective is the causal-LM loss of ``SFTTrainer`` (continued pre-training on plain text with packing, or SFT on
chat data), with the base model frozen. Two optional terms, both off by default (``docs/method.md``, "Training
objective"):

* **Layer-local attention distillation**: for every shared layer ``l``, ``KL(A_l^orig || A_l^LiSA)`` between the
  attention the layer would have computed with its own (still present) ``q_proj``/``k_proj`` and the LiSA attention,
  averaged over valid query rows and heads, then *averaged over the shared layers* (not summed: a prototype showed
  that the sum over 15 layers at weight 1 swamps the LM loss, 46.6 vs 24.3 perplexity), weighted, and optionally
  decayed linearly to zero over the first steps.
* **Output distillation**: ``T^2 KL(p_teacher || p_student)`` of the next-token distributions at temperature ``T``,
  the teacher being the same model with the adapter disabled (i.e. the original base model).

Use :class:`LiSATrainer` (an ``SFTTrainer``) with a :class:`LiSADistillationConfig`; with both weights at zero it is
exactly ``SFTTrainer``. :func:`lisa_sft_config` builds an ``SFTConfig`` with settings LiSA needs; the datasets come
from :mod:`peft_lisa.data` (:func:`~peft_lisa.data.text_dataset`, :func:`~peft_lisa.data.chat_dataset`,
:func:`~peft_lisa.data.load_sft_dataset`, also importable from here).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
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
from .tuner.carrier import SharedLayerCall
from .tuner.functional import additive_mask, layer_logits
from .tuner.layer import LiSALayer

AttnKLSchedule = Literal["constant", "linear_decay"]
LayerReduction = Literal["mean", "sum"]


# --------------------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------------------


@dataclass
class LiSADistillationConfig:
    """Optional distillation terms added to the LM loss by :class:`LiSATrainer`. All off by default.

    Args:
        attn_kl_weight: Weight of the layer-local attention KL. ``0`` disables it (no extra computation).
        attn_kl_schedule: ``"constant"`` keeps ``attn_kl_weight`` for the whole run; ``"linear_decay"`` decays it
            linearly from ``attn_kl_weight`` at step 0 to zero at ``attn_kl_warmup_steps`` (a warm-up that pulls the
            adapter towards the original attention first, then leaves the LM loss alone).
        attn_kl_warmup_steps: Length of the linear decay, in optimizer steps (required > 0 for ``"linear_decay"``).
        attn_kl_layer_reduction: How the per-layer KLs combine: ``"mean"`` (default, independent of how many
            layers share) or ``"sum"`` (the naive variant, for comparison).
        output_kl_weight: Weight of the output KL to the adapter-disabled model. ``0`` disables it (no teacher
            forward).
        temperature: Temperature of the output KL (the term is multiplied by ``temperature**2``).
        lm_weight: Weight of the causal-LM loss (1 by default; 0 with ``output_kl_weight > 0`` trains on the output
            KL to the base model alone, which keeps the base model's behaviour instead of fitting the text).
    """

    attn_kl_weight: float = 0.0
    attn_kl_schedule: AttnKLSchedule = "constant"
    attn_kl_warmup_steps: int = 0
    attn_kl_layer_reduction: LayerReduction = "mean"
    output_kl_weight: float = 0.0
    temperature: float = 1.0
    lm_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.attn_kl_weight < 0 or self.output_kl_weight < 0 or self.lm_weight < 0:
            raise ValueError("Distillation weights must be >= 0.")
        if self.lm_weight == 0 and self.attn_kl_weight == 0 and self.output_kl_weight == 0:
            raise ValueError("lm_weight=0 needs a distillation term: set output_kl_weight or attn_kl_weight > 0.")
        if self.attn_kl_schedule not in ("constant", "linear_decay"):
            raise ValueError(f"attn_kl_schedule must be 'constant' or 'linear_decay', got {self.attn_kl_schedule!r}.")
        if self.attn_kl_schedule == "linear_decay" and self.attn_kl_warmup_steps <= 0:
            raise ValueError("attn_kl_schedule='linear_decay' needs attn_kl_warmup_steps > 0.")
        if self.attn_kl_layer_reduction not in ("mean", "sum"):
            raise ValueError(f"attn_kl_layer_reduction must be 'mean' or 'sum', got {self.attn_kl_layer_reduction!r}.")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}.")

    def attn_kl_weight_at(self, step: int) -> float:
        """The attention-KL weight at optimizer step ``step`` (0-based), following the schedule."""
        if self.attn_kl_schedule == "linear_decay":
            return self.attn_kl_weight * max(0.0, 1.0 - step / self.attn_kl_warmup_steps)
        return self.attn_kl_weight

    @property
    def enabled(self) -> bool:
        return self.attn_kl_weight > 0 or self.output_kl_weight > 0 or self.lm_weight != 1.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------------------------
# Attention distillation
# --------------------------------------------------------------------------------------------------------------


def attention_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    query_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Mean ``KL(softmax(teacher + M) || softmax(student + M))`` over heads and valid query rows.

    ``student_logits`` / ``teacher_logits``: pre-softmax, pre-mask logits B x H x T_q x T_k. ``attention_mask`` is
    what the attention layer receives (additive float, boolean, or None for plain causal). A query row counts when
    it has at least one allowed key and, if ``query_mask`` (B x T_q, True for real tokens) is given, is a real token.
    Masked keys contribute nothing. Returns a scalar (0 when no row is valid).
    """
    q_len, k_len = student_logits.shape[-2:]
    mask = additive_mask(attention_mask, q_len, k_len, student_logits.device)
    allowed = mask > torch.finfo(torch.float32).min / 2  # broadcastable to B x H x T_q x T_k
    student_log_probs = torch.log_softmax(student_logits.float() + mask, dim=-1)
    teacher_log_probs = torch.log_softmax(teacher_logits.float() + mask, dim=-1)
    terms = teacher_log_probs.exp() * (teacher_log_probs - student_log_probs)
    row_kl = terms.masked_fill(~allowed, 0.0).sum(-1)  # B x H x T_q
    valid = allowed.any(-1).expand_as(row_kl)
    if query_mask is not None:
        valid = valid & query_mask.to(valid.device, torch.bool)[:, None, -q_len:]
    count = valid.sum()
    return (row_kl * valid).sum() / count.clamp(min=1)


def teacher_attention_logits(wrapper: LiSALayer, call: SharedLayerCall) -> torch.Tensor:
    """The original (pre-softmax, pre-mask) attention logits of a shared layer, from its own ``q_proj``/``k_proj``.

    Computed without gradient from the layer's inputs recorded in ``call``: B x H x T_q x T_k, float32.
    """
    with torch.no_grad():
        return layer_logits(wrapper.base_layer, call.hidden_states, call.position_embeddings)


class AttentionDistiller:
    """Collects the layer-local attention KL of every shared LiSA layer during a forward pass.

    It registers itself as an observer of the model's logits carrier(s) (see
    :class:`peft_lisa.tuner.layer.LogitsCarrier`). Calls are recorded only inside :meth:`collect`, so generation,
    evaluation outside it, and the recomputation of gradient checkpointing during backward are ignored. The KL itself
    is computed after the forward pass, by :meth:`loss` (computing it inside a checkpointed layer would save tensors
    for backward that the recomputation does not save again, which non-reentrant checkpointing refuses).

    Example::

        distiller = AttentionDistiller(peft_model)
        with distiller.collect(query_mask=batch["attention_mask"]):
            out = peft_model(**batch)
        loss = out.loss + 0.1 * distiller.loss()
    """

    def __init__(self, model: nn.Module, layer_reduction: LayerReduction = "mean") -> None:
        self.wrappers: dict[int, LiSALayer] = {m.layer_idx: m for m in model.modules() if isinstance(m, LiSALayer)}
        if not self.wrappers:
            raise ValueError("AttentionDistiller needs a model with LiSA layers (get_peft_model with a LiSAConfig).")
        if layer_reduction not in ("mean", "sum"):
            raise ValueError(f"layer_reduction must be 'mean' or 'sum', got {layer_reduction!r}.")
        self.layer_reduction = layer_reduction
        self.carriers = list({id(w.carrier): w.carrier for w in self.wrappers.values()}.values())
        self.calls: dict[int, SharedLayerCall] = {}
        self.last_layer_kls: dict[int, float] = {}  # per-layer values of the last loss(), for logging
        self._active = False
        self._query_mask: Optional[torch.Tensor] = None
        for carrier in self.carriers:
            carrier.observers.append(self)

    def __call__(self, call: SharedLayerCall) -> None:
        if self._active:
            self.calls[call.layer_idx] = call

    @contextlib.contextmanager
    def collect(self, query_mask: Optional[torch.Tensor] = None) -> Iterator[AttentionDistiller]:
        """Record every shared layer that runs inside the block (earlier records are dropped).

        ``query_mask`` (B x T, nonzero for real tokens), typically the batch's 2-D ``attention_mask``, keeps padding
        query rows out of the KL.
        """
        self.calls = {}
        self._query_mask = query_mask
        self._active = True
        try:
            yield self
        finally:
            self._active = False

    def layer_losses(self) -> dict[int, torch.Tensor]:
        """The KL of every recorded shared layer (see :func:`attention_kl`), by layer index."""
        return {
            layer_idx: attention_kl(
                call.logits,
                teacher_attention_logits(self.wrappers[layer_idx], call),
                call.attention_mask,
                self._query_mask,
            )
            for layer_idx, call in sorted(self.calls.items())
        }

    def loss(self) -> torch.Tensor:
        """Mean (or sum, see ``layer_reduction``) over the recorded layers of their KL; 0 if none was recorded.

        Releases the recorded calls (and the activations they hold).
        """
        losses = self.layer_losses()
        self.calls = {}
        self.last_layer_kls = {layer_idx: value.item() for layer_idx, value in losses.items()}
        if not losses:
            return torch.zeros(())
        stacked = torch.stack(list(losses.values()))
        return stacked.mean() if self.layer_reduction == "mean" else stacked.sum()

    def remove(self) -> None:
        """Detach from the model's carriers."""
        for carrier in self.carriers:
            carrier.observers[:] = [observer for observer in carrier.observers if observer is not self]


# --------------------------------------------------------------------------------------------------------------
# Output distillation
# --------------------------------------------------------------------------------------------------------------


def output_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``T^2 * mean_tokens KL(softmax(teacher / T) || softmax(student / T))`` over the rows of N x V logits."""
    if student_logits.shape[0] == 0:
        return student_logits.sum() * 0.0
    student_log_probs = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher_log_probs = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = F.kl_div(student_log_probs, teacher_log_probs, log_target=True, reduction="sum")
    return kl * temperature**2 / student_logits.shape[0]


def _backbone(causal_lm: nn.Module) -> nn.Module:
    """The decoder stack (``model.model``) of a transformers causal LM."""
    inner = getattr(causal_lm, "base_model", None)
    if inner is None or inner is causal_lm:
        inner = getattr(causal_lm, "model", None)
    if inner is None:
        raise ValueError(f"Could not find the decoder stack of {type(causal_lm).__name__}.")
    return inner


@contextlib.contextmanager
def _capture_last_hidden_state(backbone: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Record ``last_hidden_state`` of every forward of ``backbone`` inside the block."""
    captured: list[torch.Tensor] = []

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state
        captured.append(hidden)

    handle = backbone.register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


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
      training dataset's texts) before the first training step, unless ``calibrate=False`` or the run resumes from a
      checkpoint (whose adapter replaces it); the report is ``calibration_report``. Under DDP / FSDP every process
      calibrates, on the same texts with the same seed, before the model is wrapped; the wrapper then broadcasts the
      main process's parameters, so all processes start training from one state;
    * adds ``attn_kl_weight_at(step) * attn_kl + output_kl_weight * output_kl`` to the loss and logs ``lm_loss``,
      ``attn_kl``, ``attn_kl_weight`` and ``output_kl`` (unweighted values) next to ``loss``.

    With both distillation weights zero, ``compute_loss`` is ``SFTTrainer.compute_loss`` unchanged.
    """

    def __init__(
        self,
        *args: Any,
        distillation: Optional[LiSADistillationConfig] = None,
        keep_adapter_fp32: bool = True,
        calibrate: bool = True,
        calibration: Optional[LiSACalibrationConfig] = None,
        calibration_texts: Optional[Iterable[str]] = None,
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
        """``SFTTrainer``'s loss plus the weighted distillation terms (when any weight is non-zero)."""
        config = self.distillation
        attn_weight = config.attn_kl_weight_at(self.state.global_step) if self.attention_distiller else 0.0
        use_output_kl = config.output_kl_weight > 0
        if attn_weight == 0.0 and not use_output_kl and config.lm_weight == 1.0:
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )

        mode = "train" if self.model.training else "eval"
        unwrapped = self.accelerator.unwrap_model(model)
        base_causal_lm = unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped
        backbone = _backbone(base_causal_lm)
        query_mask = inputs.get("attention_mask")
        distiller_ctx = (
            self.attention_distiller.collect(query_mask=query_mask) if attn_weight > 0 else contextlib.nullcontext()
        )
        capture_ctx = _capture_last_hidden_state(backbone) if use_output_kl else contextlib.nullcontext([])
        with distiller_ctx, capture_ctx as captured:
            result = super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        loss, outputs = result if return_outputs else (result, None)
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
            out_term = self._output_kl(unwrapped, base_causal_lm, backbone, inputs, captured[0])
            loss = loss + config.output_kl_weight * out_term.to(loss.device) / steps
            self._metrics[mode]["output_kl"].append(out_term.item())
        self._metrics[mode]["lm_loss"].append(lm_loss.item())
        return (loss, outputs) if return_outputs else loss

    def _output_kl(
        self,
        peft_model: nn.Module,
        causal_lm: nn.Module,
        backbone: nn.Module,
        inputs: Mapping[str, Any],
        student_hidden: torch.Tensor,
    ) -> torch.Tensor:
        """Output KL at the scored positions (next-token label != -100) against the adapter-disabled model."""
        backbone_inputs = {
            key: value
            for key, value in inputs.items()
            if key not in ("labels", "shift_labels", "num_items_in_batch", "use_cache")
        }
        if not hasattr(peft_model, "disable_adapter"):
            raise ValueError("Output distillation needs a PeftModel (its teacher is the adapter-disabled model).")
        with torch.no_grad(), peft_model.disable_adapter():
            teacher_hidden = backbone(**backbone_inputs, use_cache=False).last_hidden_state
        labels = inputs.get("labels")
        if labels is None:
            labels = inputs["input_ids"]
        mask = labels[:, 1:] != -100
        lm_head = causal_lm.get_output_embeddings()
        student_logits = lm_head(student_hidden[:, :-1][mask])
        with torch.no_grad():
            teacher_logits = lm_head(teacher_hidden[:, :-1][mask])
        return output_kl(student_logits, teacher_logits, self.distillation.temperature)

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
