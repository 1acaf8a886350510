"""Orchestration: :func:`run_benchmark` measures a base model and its merged LiSA model side by side.

It loads nothing itself: it takes the base model and the merged model (``merge_and_unload()``) of the same base, and
measures both in one run, alternating between them within every repetition:

* prefill tokens/s: one forward over ``[B, T]`` random token ids with ``use_cache=True`` (the time includes building
  the KV cache; only the last position's logits are computed, ``logits_to_keep=1``);
* decode tokens/s: after that prefill, ``N`` greedy single-token steps feeding the cache, ``B * N / time``;
* KV-cache bytes, in total and per token, read off the cache tensors themselves (keys and values of every layer);
* peak memory of a run (prefill + decode): the model's own weights plus the peak working memory above the level
  before the run (:class:`~.measure.PeakMemory`), and the peak bytes of live tensors alone, in one more untimed
  pass (:class:`~.measure.TensorPeak`);
* Q/K parameters and the compression ratio (:func:`peft_lisa.qk_compression_report`);
* maximum throughput under a fixed memory budget, the measure the LiSA paper reports: for each model the largest
  batch whose weights and KV cache (at a fixed context) fit the budget, times its decode rate at that batch;
* an analytic FLOPs / bytes breakdown per layer type (:func:`~.cost_model.analytic_breakdown`).

Medians over the repetitions are reported. Configurations whose estimated working memory exceeds the memory limit are
skipped and listed with the reason. Progress goes to the ``peft_lisa`` logger (INFO) and a tqdm bar over the grid.
"""

from __future__ import annotations

import gc
import logging
import os
import resource
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from torch import nn
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from ..tuner import attention as lisa_attention
from ..tuner.compression import qk_compression_report
from .controls import on_decode_rows, plain_full_layers
from .cost_model import ModelShape, analytic_breakdown, ceilings, estimate_working_bytes
from .measure import (
    PeakMemory,
    TensorPeak,
    alternating,
    cache_slots,
    default_memory_limit,
    machine_info,
    prefill_then_decode,
    random_ids,
    synthetic_decode,
)
from .report import BenchmarkResult, fmt_bytes, fmt_rate, machine_label
from .results import (
    CACHE_LABELS,
    MODEL_KEYS,
    ON_ROWS,
    MaxThroughput,
    ModelInfo,
    Run,
    Skipped,
    ThroughputPoint,
    check_cache_kind,
)

logger = logging.getLogger("peft_lisa")


def _console_loggers() -> list[logging.Logger]:
    """The loggers among the root and ``peft_lisa`` ones that print to the console themselves.

    tqdm's ``logging_redirect_tqdm`` gives every logger it is handed a handler that writes through the progress bar:
    handed a logger without a console handler (the root logger, unless the user configured one), it would print the
    ``peft_lisa`` records that propagate to it a second time.
    """
    return [
        each
        for each in (logging.root, logger)
        if any(getattr(handler, "stream", None) in (sys.stdout, sys.stderr) for handler in each.handlers)
    ]


def _other_layers_note(
    implementation: str, kernel_used: bool, base_on_rows: bool = False, plain_layers: Sequence[int] = ()
) -> str:
    """How the merged model's other full layers and the base's layers attend, for the results' notes
    (``base_on_rows``: the base is the control of :func:`~.controls.base_on_decode_rows`; ``plain_layers``: the
    merged model's layers that keep the base's attention module, :func:`~.controls.plain_full_layers`)."""
    if not kernel_used:
        return f"Every other layer, and every layer of the base model, uses {implementation}."
    if plain_layers:
        merged = (
            f"The merged model's layers {list(plain_layers)} keep the base's attention module, {implementation} on "
            "decode steps too (a file merged before full layers' layouts were saved: merge the adapter again to give "
            "them the CPU kernel's decode rows); its other layers decode through those rows; "
        )
    else:
        merged = (
            f"Every other layer of the merged model runs {implementation} on prefill and, like the source and shared "
            "layers, the CPU kernel's decode rows on decode steps (LiSAFullAttention); "
        )
    if base_on_rows:
        return merged + (
            "every layer of the base model decodes through them here (the control "
            "peft_lisa.benchmark.base_on_decode_rows, peft-lisa bench --base-on-rows): the decode ratios are LiSA's "
            + ("share and those layers' sdpa." if plain_layers else "share alone.")
        )
    return merged + (
        f"every layer of the base model runs {implementation}. So part of a decode speedup is the rows', not "
        "LiSA's: peft-lisa bench --base-on-rows times a base whose every layer decodes by the rows."
    )


# The untimed tensor-counting pass decodes at most this many steps: on CPU torch's profiler holds on to memory while it
# runs (a base SmolLM2 prefill of 8 x 1024 tokens and 64 decode steps went from 1.4 GiB of peak RSS without it to
# more than 13 GiB with it; 8 x 2048 with 64 steps was killed for memory on a 24 GiB machine). The decode's tensor
# peak is its last step's (the largest cache), so a few more steps move it by the cache of those tokens alone.
TENSOR_PEAK_DECODE_STEPS = 16


def tensor_peak_decode_steps(decode_tokens: int) -> int:
    """The decode steps of the untimed tensor-counting pass (``TENSOR_PEAK_DECODE_STEPS``)."""
    return min(decode_tokens, TENSOR_PEAK_DECODE_STEPS)


def run_benchmark(
    base_model: nn.Module,
    merged_model: nn.Module,
    *,
    batch_sizes: tuple[int, ...] = (1, 8),
    contexts: tuple[int, ...] = (128, 512, 2048),
    decode_tokens: int = 32,
    repeats: int = 3,
    warmup: int = 1,
    memory_budget_bytes: Optional[int] = None,
    budget_context: Optional[int] = None,
    max_throughput: bool = True,
    memory_limit_bytes: Optional[int] = None,
    max_prefill_tokens: Optional[int] = None,
    cache: str = "dynamic",
    device: Union[str, torch.device, None] = None,
    seed: int = 0,
    progress: bool = True,
) -> BenchmarkResult:
    """Measure ``base_model`` and ``merged_model`` side by side, alternating within every repetition.

    Args:
        base_model: the original causal LM (run with its own attention implementation, normally sdpa).
        merged_model: the merged LiSA model of the same base (``peft_model.merge_and_unload()``).
        batch_sizes, contexts: the grid of (batch, prompt length) to measure.
        decode_tokens: greedy single-token steps timed after each prefill.
        repeats: timed repetitions per configuration (medians reported); the two models alternate within each, and
            the order flips every repetition.
        warmup: untimed repetitions per configuration before the timed ones.
        memory_budget_bytes: budget (weights + KV cache) of the maximum-throughput measure. Default: what the base
            model needs at the largest batch and context of the grid (weights + cache of ``context + decode_tokens``
            tokens).
        budget_context: context of the maximum-throughput measure; default the largest of ``contexts``.
        max_throughput: set False to skip the maximum-throughput measure.
        memory_limit_bytes: working memory (above the resident weights) a run may use; runs estimated to need more
            are skipped and listed. Default :func:`default_memory_limit`.
        max_prefill_tokens: skip (and list) configurations with ``batch * context`` above this, to bound the run
            time on slow devices. Default: no cap.
        cache: the KV cache decoded on: ``"dynamic"`` (transformers' default, which grows every layer's keys and
            values by ``torch.cat`` at every step) or ``"static"`` (a ``StaticCache`` of ``context + decode_tokens``
            slots, allocated by the prefill's first write and written in place, as under
            ``generate(cache_implementation="static")``), or ``"compiled"`` (that static cache, the decode steps
            compiled by ``torch.compile`` as ``generate`` compiles them, a graph per model and shape, compiled in the
            warm-up repetitions, at least one; ``measure.COMPILED_DECODING``). The maximum-throughput measure uses
            it too.
        device: where to run; the models are moved there. Default: the device of ``base_model``'s parameters.
        seed: seed of the random token ids.
        progress: log progress to the ``peft_lisa`` logger at INFO (else at DEBUG) and show a tqdm bar over the
            grid.
    """
    check_cache_kind(cache)
    device = torch.device(device) if device is not None else next(base_model.parameters()).device
    level = logging.INFO if progress else logging.DEBUG
    models = {"base": base_model.to(device).eval(), "merged": merged_model.to(device).eval()}
    shapes = {key: ModelShape.of(model) for key, model in models.items()}
    if not shapes["merged"].share_layers:
        raise ValueError("merged_model has no merged LiSA layers; pass peft_model.merge_and_unload().")
    if shapes["base"].share_layers:
        raise ValueError("base_model has merged LiSA layers; pass the original model as base_model.")
    limit = int(memory_limit_bytes) if memory_limit_bytes is not None else default_memory_limit(device)
    if cache == "compiled":  # the graphs compile in an untimed repetition of each point, never in a timed one
        warmup = max(warmup, 1)
    peak_method = PeakMemory(device).method
    machine = machine_info(device)
    logger.log(
        level,
        f"machine: {machine_label(machine)}; working-memory limit {fmt_bytes(limit)}; peak memory: {peak_method}",
    )

    session = _Session(models, shapes, device, decode_tokens, repeats, warmup, limit, cache, seed, level)
    runs, skipped = session.runs, session.skipped
    notes: list[str] = []

    # Objects alive now (modules, weights, imported libraries) are never garbage; freezing them keeps the
    # gc.collect() between runs fast (it otherwise walks every object of torch and transformers each time).
    gc.collect()
    gc.freeze()
    try:
        with torch.inference_mode():
            session.warm_start()
            grid = [(context, batch) for context in contexts for batch in batch_sizes]
            with logging_redirect_tqdm(loggers=_console_loggers()):
                for context, batch in tqdm(grid, desc="benchmark", unit="config", disable=not progress):
                    prefill_allowed = max_prefill_tokens is None or batch * context <= max_prefill_tokens
                    if not prefill_allowed:
                        # Decoding is still timed, on a synthetic cache of the same size (no prefill needed).
                        reason = f"B*T = {batch * context} tokens above max_prefill_tokens={max_prefill_tokens}"
                        skipped.append(Skipped("both", batch, context, "prefill", reason + " (run-time cap)"))
                        logger.log(
                            level, f"B={batch} T={context}: prefill skipped ({reason}); decode on a synthetic cache"
                        )
                        if not decode_tokens:
                            continue
                    session.measure_point(batch, context, prefill_allowed)
            throughput = None
            if max_throughput and decode_tokens > 0:
                throughput = session.max_throughput(
                    max(batch_sizes), budget_context or max(contexts), memory_budget_bytes
                )
    finally:
        gc.unfreeze()

    if shapes["merged"].mixed_dtype:
        notes.append(
            f"The merged model's LiSA modules are not in the model's dtype ({shapes['merged'].lowrank_key_bytes} vs "
            f"{shapes['merged'].element_bytes} bytes per element), so its shared layers cache their rank-r keys in "
            "that dtype. Cast the merged model (merged.to(dtype)) for a like-for-like comparison."
        )
    if any(r.decode_cache == "synthetic" for r in runs):
        notes.append(
            "decode_cache = synthetic: the prefill did not fit, so decoding was timed on a random KV cache of the "
            "same shape (the cost of a decode step does not depend on the cached values)."
        )
    implementation = getattr(models["base"].config, "_attn_implementation", None)
    kernel_used = machine.get("lisa_cpu_kernel") == "used"
    base_on_rows = kernel_used and on_decode_rows(models["base"])  # the control, decoding by the rows
    on_rows = {"base": base_on_rows, "merged": False}  # a merged model's layers are not all LiSAFullAttention
    notes.append(
        "The merged model's shared layers with a linear alignment keep their logits as queries and keys on "
        "prefill (docs/method.md, 'Fused attention of a shared layer') and attend by fused sdpa calls, or by "
        "explicit blocks of queries where those calls would be at least twice as wide as the values "
        "(head_mixing='full' on a GQA model; on CPU the compiled kernel where it is built); on CPU, a prompt of at "
        f"most {lisa_attention.handed_logits_max_keys()} tokens (handed_logits_max_keys: less with the kernel) has "
        "its logits computed whole and handed on ('Short inputs'); on decode steps they compute their one row of "
        "logits explicitly. "
        f"The full layers feeding them run {implementation} on prefill and compute their row of logits explicitly "
        "on decode steps. "
        + _other_layers_note(implementation, kernel_used, base_on_rows, plain_full_layers(models["merged"]))
    )
    notes.append(
        "Ceilings (cost_model.ceilings): prefill = base / merged FLOPs of the prefill forward, a shared layer "
        "counted at its arithmetic minimum per query-key pair: the source logits it needs (its chain root's QK^T "
        "2 H d_h, and at depth d of a chain of shared layers the d - 1 earlier links' terms, recomputed since no "
        "T x T tensor is held between layers: min(2 H^2 + 2 H r, 2 H H_kv r) each with the linear alignment), P "
        "mixing 2 H^2, the low-rank term 2 H r, AV 2 H d_h; in brackets the bound without the chains' terms. "
        "Decode = base / merged bytes read per step (weights + KV cache)."
    )
    settings = {
        "batch_sizes": list(batch_sizes),
        "contexts": list(contexts),
        "decode_tokens": decode_tokens,
        "repeats": repeats,
        "warmup": warmup,
        "memory_limit_bytes": limit,
        "max_prefill_tokens": max_prefill_tokens,
        "cache": cache,
        "peak_memory_method": peak_method,
        "tensor_peak_decode_steps": tensor_peak_decode_steps(decode_tokens),
        "seed": seed,
        "statistic": "median over repetitions",
        "prefill": "one forward over [B, T] random ids, use_cache=True, logits_to_keep=1 (includes cache build)",
        "decode": f"greedy single-token steps feeding the {cache} cache; tokens/s = B * N / time",
    }
    return BenchmarkResult(
        machine=machine,
        settings=settings,
        models={
            key: _model_info(_model_name(models["base"], key), models[key], shapes[key], on_rows[key])
            for key in MODEL_KEYS
        },
        runs=runs,
        skipped=skipped,
        compression=qk_compression_report(models["merged"]).to_dict(),
        max_throughput=throughput,
        analytic=analytic_breakdown(shapes["merged"], contexts),
        notes=notes,
    )


@dataclass
class _Session:
    """What every measurement of one :func:`run_benchmark` call shares: the two models and their shapes, the settings,
    and the runs and skips it collects."""

    models: dict[str, nn.Module]
    shapes: dict[str, ModelShape]
    device: torch.device
    decode_tokens: int
    repeats: int
    warmup: int
    limit: int  # working memory a run may use (bytes)
    cache: str  # results.CACHE_KINDS
    seed: int
    level: int  # the logging level of progress messages
    runs: list[Run] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)

    def warm_start(self) -> None:
        """One small untimed run per model (first-call allocations, kernel selection)."""
        ids = random_ids(1, 16, self.shapes["base"].vocab, self.device, self.seed)
        for model in self.models.values():
            prefill_then_decode(model, ids, 2, self.device, self.cache)

    def measure_point(self, batch: int, context: int, prefill_allowed: bool = True) -> None:
        """Measure both models at one (batch, context), alternating; skip what is estimated not to fit.

        Without ``prefill_allowed`` (the run-time cap), or when the prefill would not fit, decoding is timed on a
        synthetic cache of the same size.
        """
        mode = self._modes(batch, context, prefill_allowed)
        if not mode:
            logger.log(self.level, f"B={batch} T={context}: skipped (estimated memory above the limit)")
            return
        ids = random_ids(batch, context, self.shapes["base"].vocab, self.device, self.seed)
        results = {
            key: Run(key, batch, context, self.decode_tokens, estimated_working_bytes=estimate, decode_cache=how)
            for key, (how, estimate) in mode.items()
        }

        slots = cache_slots(self.cache, context, self.decode_tokens)  # every pass on the timed passes' cache shape

        def one_run(key: str, steps: int = self.decode_tokens) -> tuple[Optional[float], float, int]:
            if mode[key][0] == "prefill":
                return prefill_then_decode(self.models[key], ids, steps, self.device, self.cache, slots)
            decode, kv_bytes = synthetic_decode(
                self.models[key], batch, context, steps, self.device, self.seed, self.cache, slots
            )
            return None, decode, kv_bytes

        for repetition in range(self.warmup + self.repeats):
            timed = repetition >= self.warmup
            for key in alternating(MODEL_KEYS, repetition):
                if key not in mode:
                    continue
                run = results[key]
                kernel_before = _kernel_seconds()
                with PeakMemory(self.device) as peak:
                    prefill, decode, kv_bytes = one_run(key)
                kernel = _kernel_seconds() - kernel_before
                if not timed:
                    continue
                run.kernel_seconds.append(kernel)
                if prefill is not None:
                    run.prefill_seconds.append(prefill)
                if self.decode_tokens:
                    run.decode_seconds.append(decode)
                run.kv_cache_bytes = kv_bytes
                run.peak_working_bytes = max(run.peak_working_bytes, peak.peak)
                run.peak_memory_bytes = self.shapes[key].weight_bytes + run.peak_working_bytes
            gc.collect()
        for key in mode:  # one more, untimed pass: the profiler that counts the tensors slows the run down
            with TensorPeak(self.device) as tensors:
                one_run(key, tensor_peak_decode_steps(self.decode_tokens))
            results[key].peak_tensor_bytes = tensors.peak
            gc.collect()
        bounds = ceilings(self.shapes["base"], self.shapes["merged"], batch, context)
        for key in MODEL_KEYS:
            if key in results:
                results[key].ceilings = bounds
                self.runs.append(results[key])
        logger.log(
            self.level,
            f"B={batch} T={context}: "
            + "; ".join(
                f"{key} prefill {fmt_rate(r.prefill_tokens_per_s)} decode {fmt_rate(r.decode_tokens_per_s)} tok/s"
                for key, r in results.items()
            ),
        )

    def _modes(self, batch: int, context: int, prefill_allowed: bool) -> dict[str, tuple[str, int]]:
        """How each model runs at (batch, context): ``("prefill" | "synthetic", estimated working bytes)``; a model
        that fits neither way is left out, and every skip is listed."""
        mode: dict[str, tuple[str, int]] = {}
        for key, shape in self.shapes.items():
            prefill_estimate = estimate_working_bytes(shape, batch, context, self.decode_tokens, "prefill")
            decode_estimate = estimate_working_bytes(shape, batch, context, self.decode_tokens, "decode")
            if prefill_allowed and prefill_estimate <= self.limit:
                mode[key] = ("prefill", max(prefill_estimate, decode_estimate))
                continue
            if prefill_allowed:
                reason = _too_big("prefill", prefill_estimate, self.limit)
                self.skipped.append(Skipped(key, batch, context, "prefill", reason, prefill_estimate, self.limit))
            if self.decode_tokens and decode_estimate <= self.limit:
                mode[key] = ("synthetic", decode_estimate)
            else:
                reason = _too_big("decode", decode_estimate, self.limit)
                self.skipped.append(Skipped(key, batch, context, "decode", reason, decode_estimate, self.limit))
        return mode

    def max_throughput(self, batch: int, context: int, budget: Optional[int]) -> MaxThroughput:
        """Largest batch whose weights + KV cache fit the budget, for each model, and its measured decode throughput.

        The default budget is the base model's weights + KV cache at ``batch`` and ``context``.
        """
        decode_tokens, shapes = self.decode_tokens, self.shapes
        steps = context + decode_tokens
        if budget is None:
            budget = shapes["base"].weight_bytes + _per_token(shapes["base"], self.runs, context) * batch * steps
            source = f"base model's weights + KV cache at batch {batch}, context {context} + {decode_tokens} decoded"
        else:
            source = "given"
        result = MaxThroughput(
            budget_bytes=int(budget), budget_source=source, context=context, decode_tokens=decode_tokens
        )
        batches: dict[str, int] = {}
        for key, shape in shapes.items():
            per_sequence = _per_token(shape, self.runs, context) * steps
            batches[key] = max(int((budget - shape.weight_bytes) // per_sequence), 0)
            result.points[key] = ThroughputPoint(
                model=key,
                max_batch=batches[key],
                weight_bytes=shape.weight_bytes,
                kv_cache_bytes=int(per_sequence * batches[key]),
                step_bytes=int(shape.weight_bytes + per_sequence * batches[key]),
                decode_tokens_per_s=None,
                method="not available (the weights alone exceed the budget)",
            )
        runnable = []
        for key, shape in shapes.items():
            if batches[key] == 0:
                continue
            estimate = estimate_working_bytes(shape, batches[key], context, decode_tokens, "decode")
            if estimate <= self.limit:
                runnable.append(key)
                continue
            reason = _too_big("max-throughput decode", estimate, self.limit)
            self.skipped.append(
                Skipped(key, batches[key], context, "max-throughput decode", reason, estimate, self.limit)
            )
            rate, how = _extrapolate(self.runs, key, context, batches[key])
            result.points[key].decode_tokens_per_s = rate
            result.points[key].method = how
        logger.log(self.level, f"max throughput: budget {fmt_bytes(budget)} at context {context}: max batch {batches}")
        for repetition in range(self.warmup + self.repeats):
            for key in alternating(MODEL_KEYS, repetition):
                if key not in runnable:
                    continue
                seconds, _ = synthetic_decode(
                    self.models[key], batches[key], context, decode_tokens, self.device, self.seed, self.cache
                )
                if repetition >= self.warmup:
                    result.points[key].decode_seconds.append(seconds)
                gc.collect()
        for key in runnable:
            point = result.points[key]
            point.decode_tokens_per_s = point.max_batch * decode_tokens / statistics.median(point.decode_seconds)
            cache = CACHE_LABELS[self.cache]
            point.method = f"measured (decode at batch {point.max_batch} on a synthetic {context}-token {cache})"
        logger.log(
            self.level,
            "max throughput: "
            + "; ".join(f"{k} {fmt_rate(p.decode_tokens_per_s)} tok/s ({p.method})" for k, p in result.points.items()),
        )
        return result


def _kernel_seconds() -> float:
    """System (kernel) CPU time of this process so far: page faults and memory mapping show up here."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_stime


def _too_big(phase: str, estimate: int, limit: int) -> str:
    return f"{phase}: estimated working memory {fmt_bytes(estimate)} exceeds the limit {fmt_bytes(limit)}"


def _per_token(shape: ModelShape, runs: list[Run], context: int) -> float:
    """Measured KV-cache bytes per token of a model (any run at ``context``, else any run), else the analytic value."""
    model_key = "merged" if shape.share_layers else "base"
    measured = [r for r in runs if r.model == model_key and r.decode_cache == "prefill" and r.kv_cache_bytes]
    at_context = [r for r in measured if r.context == context] or measured
    return at_context[0].kv_cache_bytes_per_token if at_context else shape.cache_bytes_per_token


def _extrapolate(runs: list[Run], key: str, context: int, batch: int) -> tuple[Optional[float], str]:
    """Decode throughput at ``batch`` from the grid's measurements at ``context``: step time linear in the batch."""
    points = sorted(
        (r.batch, statistics.median(r.decode_seconds) / r.decode_tokens)
        for r in runs
        if r.model == key and r.context == context and r.decode_seconds
    )
    if not points:
        return None, f"not available (too big to run here and no decode measured at context {context})"
    if len(points) == 1:
        measured_batch, step = points[0]
        rate = batch / (step * batch / measured_batch)
        return rate, (
            f"EXTRAPOLATED, not measured: too big to run here; step time assumed proportional to the batch from the "
            f"one measurement at batch {measured_batch}"
        )
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / sum((x - mean_x) ** 2 for x in xs)
    slope = max(slope, 0.0)
    intercept = mean_y - slope * mean_x
    step = max(intercept + slope * batch, 1e-12)
    return batch / step, (
        f"EXTRAPOLATED, not measured: too big to run here; linear fit of decode step time vs batch over batches "
        f"{xs} at context {context}"
    )


def _num_parameters(model: nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for param in model.parameters():
        if param.data_ptr() not in seen:
            seen.add(param.data_ptr())
            total += param.numel()
    return total


def _model_name(base_model: nn.Module, key: str) -> str:
    name = getattr(base_model.config, "name_or_path", "") or type(base_model).__name__
    name = os.path.basename(os.path.normpath(name)) if os.path.isdir(name) else name
    return name if key == "base" else f"{name} + LiSA (merged)"


def _model_info(name: str, model: nn.Module, shape: ModelShape, on_rows: bool = False) -> ModelInfo:
    implementation = str(getattr(model.config, "_attn_implementation", None))
    return ModelInfo(
        name=name,
        num_parameters=_num_parameters(model),
        weight_bytes=shape.weight_bytes,
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
        attn_implementation=f"{implementation}{ON_ROWS}" if on_rows else implementation,
        num_layers=shape.num_layers,
        share_layers=list(shape.share_layers),
        source_layers=list(shape.source_layers),
        rank=shape.rank or None,
        align_hidden=shape.align_hidden if shape.share_layers else None,
        kv_cache_bytes_per_token_analytic=shape.cache_bytes_per_token,
    )
