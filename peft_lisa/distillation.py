"""Distillation terms of LiSA training: what :class:`~peft_lisa.training.LiSATrainer` adds to the causal-LM loss.

Both terms are optional and off by default (``docs/method.md``, "Training objective"):

* **Layer-local attention distillation**: for every shared layer ``l``, ``KL(A_l^orig || A_l^LiSA)`` between the
  attention the layer would have computed with its own (still present) ``q_proj``/``k_proj`` and the LiSA attention,
  averaged over valid query rows and heads, then *averaged over the shared layers* (not summed: a prototype showed
  that the sum over 15 layers at weight 1 swamps the LM loss, 46.6 vs 24.3 perplexity), weighted, and optionally
  decayed linearly to zero over the first steps.
* **Output distillation**: ``T^2 KL(p_teacher || p_student)`` of the next-token distributions at temperature ``T``,
  the teacher being the same model with the adapter disabled (i.e. the original base model). With it on, the LM loss
  and the KL come from one set of student logits (:func:`lm_and_output_kl`): the LM head runs once per step, where
  ``SFTTrainer``'s own loss would run it again in its chunked kernel.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .calibration import TeacherRows
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
    teacher = TeacherRows.of(teacher_logits, additive_mask(attention_mask, q_len, k_len, student_logits.device))
    if query_mask is not None:
        valid = teacher.valid & query_mask.to(teacher.valid.device, torch.bool)[:, None, -q_len:]
        teacher = replace(teacher, valid=valid)
    return teacher.kl(student_logits)


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

    @contextmanager
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
    return _kl_to_teacher(student_log_probs, teacher_logits, temperature)


def _kl_to_teacher(student_log_probs: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """:func:`output_kl` from the student's log-probabilities at temperature ``T`` (N x V, N > 0)."""
    teacher_log_probs = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = F.kl_div(student_log_probs, teacher_log_probs, log_target=True, reduction="sum")
    return kl * temperature**2 / student_log_probs.shape[0]


@dataclass
class TokenLosses:
    """What :func:`lm_and_output_kl` computes from one batch.

    Attributes:
        lm_loss: Summed next-token NLL over the scored positions, divided by their number (or by
            ``num_items_in_batch``), like ``SFTTrainer``'s loss; with grad. Each token's NLL is weighted by its
            detached probability for ``loss_type="dft"``.
        output_kl: :func:`output_kl` over the scored positions; with grad.
        num_scored: Number of scored positions (next-token label not ``-100``).
        entropy_sum: Summed entropy of the student's next-token distributions there (detached).
        num_correct: Positions where the student's most likely token is the label.
    """

    lm_loss: torch.Tensor
    output_kl: torch.Tensor
    num_scored: torch.Tensor
    entropy_sum: torch.Tensor
    num_correct: torch.Tensor


def lm_and_output_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_items_in_batch: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    loss_type: str = "nll",
) -> TokenLosses:
    """The causal-LM loss and the output KL from one set of student logits.

    ``student_logits`` (B x T x V, with grad) and ``teacher_logits`` (B x T x V) are the model's outputs; position
    ``t`` predicts ``labels[:, t + 1]`` (the model's own shift), positions whose next label is ``-100`` are not
    scored. One ``log_softmax`` of the scored rows gives the NLL, the KL (at ``temperature`` 1) and the metrics.
    """
    if loss_type not in ("nll", "dft"):
        raise ValueError(f"Output distillation supports loss_type 'nll' or 'dft', got {loss_type!r}.")
    next_labels = labels[:, 1:]  # B x (T-1)
    mask = next_labels != -100
    scored = student_logits[:, :-1][mask].float()  # N x V
    targets = next_labels[mask]  # N
    log_probs = torch.log_softmax(scored, dim=-1)  # N x V
    token_log_probs = log_probs.gather(1, targets[:, None]).squeeze(1)  # N
    if loss_type == "dft":  # each token weighted by its (detached) probability
        token_log_probs = token_log_probs * token_log_probs.detach().exp()
    denominator = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    lm_loss = -token_log_probs.sum() / denominator
    if scored.shape[0] == 0:
        kl = scored.sum() * 0.0
    else:
        student_log_probs = log_probs if temperature == 1.0 else torch.log_softmax(scored / temperature, dim=-1)
        kl = _kl_to_teacher(student_log_probs, teacher_logits[:, :-1][mask], temperature)
    with torch.no_grad():
        entropy_sum = -(log_probs.exp() * log_probs).sum()
        num_correct = (scored.argmax(dim=-1) == targets).sum()
    return TokenLosses(lm_loss, kl, mask.sum(), entropy_sum, num_correct)
