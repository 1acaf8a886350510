"""Layer-wise, teacher-forced calibration of a LiSA adapter (``docs/method.md``, "Calibration").

Each shared layer's LiSA modules are fitted, in layer order, to the attention of its own base layer, with no
backpropagation through the language model:

* one forward pass of the base model (adapter disabled) per calibration batch records, for every wrapped layer, the
  attention input (the hidden states after the input norm), the rotary position embeddings and the mask;
* the teacher of shared layer ``l`` is the base layer's own attention, ``softmax(scale Q_l K_l^T + M)`` from its
  ``q_proj``/``k_proj`` (and ``q_norm``/``k_norm``) applied to the recorded input;
* the student is the LiSA attention ``softmax(align(S_{l-1}) + Q_r K_r^T / sqrt(r) + M)`` of the same input, where
  ``S_{l-1}`` is the base logits of layer ``l-1`` if it is full, or the logits layer ``l-1`` reconstructs with its
  already calibrated LiSA modules if it is shared;
* the loss is the mean over heads and query rows of ``KL(teacher || student)``, the mask re-applied;
* step 1 fits ``P`` alone by L-BFGS (under the linear alignment the loss is convex in ``P``), step 2 fits ``P`` with
  the low-rank ``Q_r``/``K_r`` (and the alignment FFN, if any) by Adam.

Memory: only hidden states are stored (``num_sequences x seq_len x hidden`` per wrapped layer, in the base model's
dtype); every ``T x T`` tensor is computed per batch and freed. The report states the bytes stored.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Union

import torch
from torch import nn

from .calibration_blocks import given_blocks, token_blocks, with_copy_blocks
from .tuner.attention import LiSASubstitute
from .tuner.functional import additive_mask, layer_logits
from .tuner.layer import ROLE_SHARED, LiSALayer

logger = logging.getLogger("peft_lisa")


@dataclass
class LayerCalibration:
    """One shared layer's calibration: mean attention KL (teacher || LiSA) per query row before, after step 1 (``P``
    by L-BFGS) and after step 2 (``P`` + low-rank Q/K by Adam), on the calibration data; wall seconds."""

    layer: int
    source: int
    kl_before: float
    kl_after_p: float
    kl_after: float
    seconds: float


@dataclass
class CalibrationReport:
    """What :func:`calibrate` did: one :class:`LayerCalibration` per shared layer, in layer order, and totals."""

    layers: list[LayerCalibration] = field(default_factory=list)
    num_sequences: int = 0
    seq_len: int = 0
    batch_size: int = 0
    lbfgs_steps: int = 0
    adam_steps: int = 0
    lr: float = 0.0
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    stored_bytes: int = 0
    cached_bytes: int = 0
    copy_blocks: int = 0

    @property
    def mean_kl_before(self) -> float:
        return sum(row.kl_before for row in self.layers) / max(len(self.layers), 1)

    @property
    def mean_kl_after(self) -> float:
        return sum(row.kl_after for row in self.layers) / max(len(self.layers), 1)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["mean_kl_before"], data["mean_kl_after"] = self.mean_kl_before, self.mean_kl_after
        return data

    def to_markdown(self) -> str:
        lines = [
            "| layer | source | KL before | KL after P | KL after | seconds |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for row in self.layers:
            lines.append(
                f"| {row.layer} | {row.source} | {row.kl_before:.4f} | {row.kl_after_p:.4f} | {row.kl_after:.4f} "
                f"| {row.seconds:.1f} |"
            )
        lines.append(
            f"| mean | | {self.mean_kl_before:.4f} | | {self.mean_kl_after:.4f} | {self.seconds:.1f} (total) |"
        )
        lines.append("")
        lines.append(
            f"{self.num_sequences} x {self.seq_len} tokens, batch {self.batch_size}, L-BFGS {self.lbfgs_steps} "
            f"iterations, Adam {self.adam_steps} steps at lr {self.lr:g}; {self.cpu_seconds / 60:.2f} CPU-minutes; "
            f"{self.stored_bytes / 2**20:.1f} MiB of hidden states stored, at most "
            f"{self.cached_bytes / 2**20:.1f} MiB of one layer's source/teacher logits cached."
        )
        return "\n".join(lines)


@dataclass
class _Batch:
    """The base model's attention inputs of one calibration batch, per wrapped layer."""

    hidden: dict[int, torch.Tensor]
    # Per layer: families such as Gemma 3 give sliding and full layers their own rotary and mask.
    position_embeddings: dict[int, tuple[torch.Tensor, torch.Tensor]]
    attention_mask: dict[int, Optional[torch.Tensor]]

    @property
    def size(self) -> int:
        return next(iter(self.hidden.values())).shape[0]


class _StopForward(Exception):
    """Raised by the recording hook once the last wrapped layer's input is recorded: the rest is not needed."""


@dataclass
class TeacherRows:
    """A fixed teacher's attention rows, prepared once for many KLs against them (every Adam step of a layer's fit).

    ``KL(p || q) = sum p log p - sum p log q`` per row: the first term and ``p`` are computed here once, so a step
    pays one ``log_softmax`` of the student and one product, instead of two ``log_softmax`` and an ``exp``.
    """

    probs: torch.Tensor  # B x H x T_q x T_k, teacher probabilities, 0 where masked
    neg_entropy: torch.Tensor  # B x H x T_q, sum_k p log p
    valid: torch.Tensor  # B x H x T_q, rows with at least one allowed key
    mask: torch.Tensor  # additive, broadcastable to B x H x T_q x T_k

    @classmethod
    def of(cls, teacher_logits: torch.Tensor, mask: torch.Tensor) -> TeacherRows:
        """``teacher_logits``: B x H x T_q x T_k pre-softmax, pre-mask; ``mask``: additive, broadcastable."""
        allowed = mask > torch.finfo(torch.float32).min / 2
        log_probs = torch.log_softmax(teacher_logits.float() + mask, dim=-1)
        probs = log_probs.exp().masked_fill(~allowed, 0.0)
        neg_entropy = (probs * log_probs).sum(-1)
        valid = allowed.any(-1).expand_as(neg_entropy)
        return cls(probs, neg_entropy, valid, mask)

    def kl(self, student_logits: torch.Tensor) -> torch.Tensor:
        """Mean over heads and valid query rows of ``KL(teacher || softmax(student_logits + mask))``."""
        student = torch.log_softmax(student_logits.float() + self.mask, dim=-1)  # B x H x T_q x T_k
        row_kl = self.neg_entropy - (self.probs * student).sum(-1)  # B x H x T_q
        return (row_kl * self.valid).sum() / self.valid.sum().clamp(min=1)


def attention_kl_rows(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over heads and query rows (with at least one allowed key) of ``KL(softmax(T + M) || softmax(S + M))``.

    ``student_logits``/``teacher_logits``: B x H x T_q x T_k pre-softmax, pre-mask; ``mask``: additive, broadcastable.
    """
    return TeacherRows.of(teacher_logits, mask).kl(student_logits)


def _wrappers(peft_model: nn.Module) -> tuple[str, dict[int, LiSALayer]]:
    adapter = getattr(peft_model, "active_adapter", None)
    wrappers = {m.layer_idx: m for m in peft_model.modules() if isinstance(m, LiSALayer)}
    if not wrappers or adapter not in next(iter(wrappers.values())).lisa_role:
        raise ValueError(
            "calibrate() needs a PeftModel with an active LiSA adapter: get_peft_model(model, LiSAConfig(...))."
        )
    return adapter, {idx: w for idx, w in sorted(wrappers.items()) if adapter in w.lisa_role}


def _record_batches(
    peft_model: nn.Module, wrappers: dict[int, LiSALayer], ids: torch.LongTensor, batch_size: int
) -> Iterator[_Batch]:
    """Run the base model (adapter disabled) on ``ids`` batch by batch, yielding the recorded attention inputs."""
    last = max(wrappers)
    device = next(wrappers[last].base_layer.parameters()).device
    current: dict[str, Any] = {}

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        current["hidden"][module.layer_idx] = hidden.detach()
        current["position_embeddings"][module.layer_idx] = tuple(t.detach() for t in kwargs["position_embeddings"])
        mask = kwargs.get("attention_mask")
        current["attention_mask"][module.layer_idx] = mask.detach() if isinstance(mask, torch.Tensor) else None
        if module.layer_idx == last:
            raise _StopForward

    handles = [w.base_layer.register_forward_pre_hook(hook, with_kwargs=True) for w in wrappers.values()]
    try:
        with torch.no_grad(), peft_model.disable_adapter():
            for start in range(0, ids.shape[0], batch_size):
                current.clear()
                current["hidden"], current["position_embeddings"], current["attention_mask"] = {}, {}, {}
                try:
                    peft_model(input_ids=ids[start : start + batch_size].to(device), use_cache=False)
                except _StopForward:
                    pass
                yield _Batch(current["hidden"], current["position_embeddings"], current["attention_mask"])
    finally:
        for handle in handles:
            handle.remove()


def _full_logits(wrapper: LiSALayer, batch: _Batch) -> torch.Tensor:
    """The base layer's own logits ``softcap(scale Q K^T)`` (B x H x T x T, float32) on the recorded input."""
    layer = wrapper.layer_idx
    return layer_logits(wrapper.base_layer, batch.hidden[layer], batch.position_embeddings[layer])


def _lisa_logits(substitute: LiSASubstitute, source: torch.Tensor, batch: _Batch) -> torch.Tensor:
    layer = substitute.layer_idx
    q_small, k_small = substitute.lowrank_query_key(batch.hidden[layer], batch.position_embeddings[layer])
    return substitute.logits(source, q_small, k_small)


class _Layerwise:
    """The per-batch logits of the calibration: the teacher of a layer and the source a shared layer reads."""

    def __init__(self, wrappers: dict[int, LiSALayer], adapter: str, batches: list[_Batch]) -> None:
        self.wrappers, self.adapter, self.batches = wrappers, adapter, batches

    def is_shared(self, layer: int) -> bool:
        return self.wrappers[layer].lisa_role.get(self.adapter) == ROLE_SHARED

    def substitute(self, layer: int) -> LiSASubstitute:
        return self.wrappers[layer].lisa_substitute[self.adapter]

    @torch.no_grad()
    def source(self, layer: int, batch: _Batch) -> torch.Tensor:
        """``S_{layer-1}``: base logits of the full layer that starts the run, realigned by the shared layers between
        (with their current, already calibrated, modules)."""
        start = layer - 1
        while self.is_shared(start):
            start -= 1
        logits = _full_logits(self.wrappers[start], batch)
        for shared in range(start + 1, layer):
            logits = _lisa_logits(self.substitute(shared), logits, batch)
        return logits

    def mask(self, layer: int, batch: _Batch, length: int) -> torch.Tensor:
        """The mask of ``layer`` itself (a sliding-window layer re-applies its own window)."""
        return additive_mask(batch.attention_mask[layer], length, length, batch.hidden[layer].device)

    def teacher(self, layer: int, batch: _Batch) -> TeacherRows:
        """The attention rows of ``layer``'s own base attention, which its LiSA modules are fitted to."""
        teacher_logits = _full_logits(self.wrappers[layer], batch)
        return TeacherRows.of(teacher_logits, self.mask(layer, batch, teacher_logits.shape[-1]))

    def loss(self, layer: int, batch: _Batch, source: torch.Tensor, teacher: TeacherRows) -> torch.Tensor:
        return teacher.kl(_lisa_logits(self.substitute(layer), source, batch))


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _fit_layer(
    work: _Layerwise,
    layer: int,
    *,
    lbfgs_steps: int,
    adam_steps: int,
    lr: float,
    cache_targets: bool,
    generator: torch.Generator,
) -> tuple[float, float, float, int]:
    substitute = work.substitute(layer)
    total = sum(batch.size for batch in work.batches)

    def compute_targets(batch: _Batch) -> tuple[torch.Tensor, TeacherRows]:
        with torch.no_grad():
            return work.source(layer, batch), work.teacher(layer, batch)

    # The source logits and the teacher's rows stay fixed while this layer is fitted: with cache_targets they are
    # computed once per batch (2 x num_sequences x H x T x T float32, freed when the layer is done), else at every use.
    cached = {id(batch): compute_targets(batch) for batch in work.batches} if cache_targets else {}

    def targets(batch: _Batch) -> tuple[torch.Tensor, TeacherRows]:
        return cached[id(batch)] if cache_targets else compute_targets(batch)

    @torch.no_grad()
    def mean_kl() -> float:
        return sum(work.loss(layer, b, *targets(b)).item() * b.size for b in work.batches) / total

    kl_before = mean_kl()
    snapshot = {name: p.detach().clone() for name, p in substitute.named_parameters()}

    def keep_if_better(previous: float, now: float) -> float:
        """Keep a step's result if it lowered the full-data KL; else (a noisy Adam run, a failed line search) go
        back to the parameters before it, so that calibration never makes a layer worse."""
        if math.isfinite(now) and now <= previous:
            snapshot.update({name: p.detach().clone() for name, p in substitute.named_parameters()})
            return now
        logger.warning("calibrate: layer %d: a step raised the KL %.4f -> %.4f; reverted", layer, previous, now)
        with torch.no_grad():
            for name, p in substitute.named_parameters():
                p.copy_(snapshot[name])
        return previous

    permute = substitute.align.permute
    if lbfgs_steps > 0:
        optimizer = torch.optim.LBFGS(
            [permute], lr=1.0, max_iter=lbfgs_steps, history_size=10, line_search_fn="strong_wolfe"
        )

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            value = 0.0
            for batch in work.batches:
                loss = work.loss(layer, batch, *targets(batch)) * (batch.size / total)
                loss.backward()
                value += loss.item()
            return torch.tensor(value)

        optimizer.step(closure)
    kl_after_p = keep_if_better(kl_before, mean_kl()) if lbfgs_steps > 0 else kl_before

    if adam_steps > 0:
        params = [p for p in substitute.parameters()]
        optimizer = torch.optim.Adam(params, lr=lr)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * step / adam_steps))
        )
        order: list[int] = []
        for _ in range(adam_steps):
            if not order:
                order = torch.randperm(len(work.batches), generator=generator).tolist()
            batch = work.batches[order.pop()]
            optimizer.zero_grad()
            work.loss(layer, batch, *targets(batch)).backward()
            optimizer.step()
            schedule.step()
    kl_after = keep_if_better(kl_after_p, mean_kl()) if adam_steps > 0 else kl_after_p
    cached_bytes = sum(_nbytes(source) + _nbytes(teacher.probs) for source, teacher in cached.values())
    return kl_before, kl_after_p, kl_after, cached_bytes


# The default budget, measured on SmolLM2-135M at 50% shared (docs/calibration/objective.md): more sequences help more
# than more Adam steps (32 x 100 beats 16 x 200 on both held-out texts, at less CPU time).
DEFAULT_NUM_SEQUENCES = 32
DEFAULT_ADAM_STEPS = 100
DEFAULT_LR = 1e-2


def calibrate(
    peft_model: nn.Module,
    tokenizer: Any,
    texts: Union[Iterable[str], torch.LongTensor],
    *,
    num_sequences: int = DEFAULT_NUM_SEQUENCES,
    seq_len: int = 256,
    batch_size: int = 4,
    lbfgs_steps: int = 10,
    adam_steps: int = DEFAULT_ADAM_STEPS,
    lr: float = DEFAULT_LR,
    cache_targets: bool = True,
    copy_blocks: int = 0,
    seed: int = 0,
    progress: bool = True,
    log: bool = True,
) -> CalibrationReport:
    """Fit each shared layer's LiSA modules, in layer order, to its own base layer's attention (teacher-forced).

    No gradient flows through the language model: the base model (adapter disabled) runs once per calibration
    batch, recording every wrapped layer's attention input, and each shared layer is then fitted on those inputs
    alone, minimising the mean per-query-row ``KL(base attention || LiSA attention)``. Its source logits are those
    of the previous layer: the base logits if it is full, the reconstructed LiSA logits (already calibrated) if it
    is shared. Step 1 fits ``P`` by L-BFGS (``lbfgs_steps`` iterations), step 2 ``P`` with the low-rank Q/K (and
    the alignment FFN, if any) by Adam (``adam_steps`` mini-batch steps, cosine-decayed from ``lr``); a step that
    raises the layer's KL on the calibration data is undone. See
    ``docs/method.md``, "Calibration".

    Works on 4-bit (bitsandbytes) bases: the base layers only run forward, the adapter stays float32. The adapter's
    ``requires_grad`` flags and the model's train/eval mode are as before afterwards, so it can be trained next.

    Args:
        peft_model: a ``PeftModel`` whose active adapter is a LiSA adapter.
        tokenizer: its tokenizer.
        texts: calibration documents; read lazily, joined by EOS and cut into ``num_sequences`` blocks of
            ``seq_len`` tokens. Or token ids already cut into blocks (a ``num_blocks x block_len`` integer tensor),
            used as they are: ``num_sequences`` and ``seq_len`` then do not apply.
        batch_size: sequences per forward pass of the base model and per Adam step.
        cache_targets: keep the current layer's source and teacher logits (``2 x num_sequences x H x T x T``
            float32) while it is fitted instead of recomputing them at every step: about 40% faster; ``False``
            keeps only hidden states.
        copy_blocks: add this many blocks of repeated random-token runs (``calibration_blocks.copy_run_blocks``) to
            the calibration blocks: the calibrated (and trained) adapter keeps more of the base model's in-context
            copying, at a small cost in perplexity (``docs/calibration/copying.md``); 0 (default): text only.
        seed: seed of the Adam mini-batch order (and of the copy blocks).
        progress: show a progress bar over the shared layers.
        log: log what was recorded and each layer's KL at INFO level on the ``peft_lisa`` logger; ``False`` logs
            them at DEBUG (for callers that calibrate many times and report themselves).

    Returns:
        A :class:`CalibrationReport` with the per-layer KL before/after and time, and the totals.
    """
    from tqdm.auto import tqdm

    if num_sequences < 1 or seq_len < 2 or batch_size < 1 or copy_blocks < 0:
        raise ValueError(
            f"calibrate() needs num_sequences >= 1, seq_len >= 2, batch_size >= 1 and copy_blocks >= 0; got "
            f"{num_sequences}, {seq_len}, {batch_size}, {copy_blocks}."
        )
    adapter, wrappers = _wrappers(peft_model)
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    if isinstance(texts, torch.Tensor):
        ids = given_blocks(texts)
    else:
        ids = token_blocks(tokenizer, texts, seq_len, num_sequences)
        if len(ids) < num_sequences:
            logger.warning("calibrate: the texts give only %d of the %d sequences asked for", len(ids), num_sequences)
    if copy_blocks:
        ids = with_copy_blocks(ids, copy_blocks, peft_model.get_base_model().config.vocab_size, seed)
    info = logger.info if log else logger.debug
    batches = list(_record_batches(peft_model, wrappers, ids, batch_size))
    stored = sum(t.numel() * t.element_size() for batch in batches for t in batch.hidden.values())
    info(
        "calibrate: recorded %d sequences x %d tokens at %d wrapped layers (%.1f MiB of hidden states)",
        ids.shape[0],
        ids.shape[1],
        len(wrappers),
        stored / 2**20,
    )
    work = _Layerwise(wrappers, adapter, batches)
    shared = [layer for layer in wrappers if work.is_shared(layer)]
    report = CalibrationReport(
        num_sequences=ids.shape[0],
        seq_len=ids.shape[1],
        batch_size=batch_size,
        lbfgs_steps=lbfgs_steps,
        adam_steps=adam_steps,
        lr=lr,
        stored_bytes=stored,
        copy_blocks=copy_blocks,
    )
    params = [p for layer in shared for p in work.substitute(layer).parameters()]
    requires_grad = [p.requires_grad for p in params]
    generator = torch.Generator().manual_seed(seed)
    try:
        for p in params:
            p.requires_grad_(False)
        for layer in tqdm(shared, desc="calibrating LiSA layers", disable=not progress):
            layer_start = time.perf_counter()
            for p in work.substitute(layer).parameters():
                p.requires_grad_(True)
            with torch.enable_grad():
                before, after_p, after, cached_bytes = _fit_layer(
                    work,
                    layer,
                    lbfgs_steps=lbfgs_steps,
                    adam_steps=adam_steps,
                    lr=lr,
                    cache_targets=cache_targets,
                    generator=generator,
                )
            report.cached_bytes = max(report.cached_bytes, cached_bytes)
            for p in work.substitute(layer).parameters():
                p.requires_grad_(False)
            seconds = time.perf_counter() - layer_start
            source = layer - 1
            report.layers.append(LayerCalibration(layer, source, before, after_p, after, seconds))
            info(
                "calibrate: layer %d: KL %.4f -> %.4f (P) -> %.4f (P + low-rank) in %.1f s",
                layer,
                before,
                after_p,
                after,
                seconds,
            )
    finally:
        for p, flag in zip(params, requires_grad, strict=True):
            p.requires_grad_(flag)
    report.seconds = time.perf_counter() - start_wall
    report.cpu_seconds = time.process_time() - start_cpu
    info(
        "calibrate: mean KL %.4f -> %.4f over %d layers in %.1f s",
        report.mean_kl_before,
        report.mean_kl_after,
        len(shared),
        report.seconds,
    )
    return report


__all__: Sequence[str] = (
    "CalibrationReport",
    "LayerCalibration",
    "TeacherRows",
    "attention_kl_rows",
    "calibrate",
)
