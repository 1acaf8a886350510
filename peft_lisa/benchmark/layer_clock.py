"""Time spent in each decoder layer, read off forward hooks; and where a prefill's or a decode step's time goes,
layer by layer.

:class:`LayerClock` adds up each decoder layer's time over the forwards it watches. :func:`prefill_layer_times` times
real prefills of a base model and its merged LiSA model, alternating, and :func:`decode_layer_times` greedy decode
steps after such a prefill; both report every layer's median time next to its kind (full, source, shared) and, for a
shared layer, its depth in a chain of shared layers: a shared layer after a full one is depth 1, each shared layer
after a shared one one deeper. A deeper link recomputes its earlier links' terms of its source logits block by block
on a long prefill (``docs/method.md``, "The cost of a chain"), which the per-depth table shows as time.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..tuner.architectures import decoder_layers
from ..tuner.merged import LiSASharedAttention, LiSASourceAttention
from .cost_model import chain_depths
from .measure import (
    alternating,
    empty_cache,
    machine_info,
    random_ids,
    synchronize,
    timed_decode,
)
from .report import machine_label
from .results import HOOKED_CACHE_KINDS, check_cache_kind


def layer_kind(attn: nn.Module) -> str:
    """``"shared"``, ``"source"`` (a full layer that hands its logits on) or ``"full"``."""
    if isinstance(attn, LiSASharedAttention):
        return "shared"
    return "source" if isinstance(attn, LiSASourceAttention) else "full"


class LayerClock:
    """Forward hooks that add up the time spent in each decoder layer of ``model`` (waiting for an accelerator's
    queue at each layer's start and end, so that a layer's time is its own). :meth:`remove` takes the hooks off."""

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.device = device
        self.layers = decoder_layers(model)
        self.kinds = [layer_kind(layer.self_attn) for layer in self.layers]
        self.spent = [0.0] * len(self.layers)
        self._started = [0.0] * len(self.layers)
        self._handles = []
        for idx, layer in enumerate(self.layers):
            self._handles.append(layer.register_forward_pre_hook(self._start(idx)))
            self._handles.append(layer.register_forward_hook(self._stop(idx)))

    def _start(self, idx: int):
        def hook(module: nn.Module, args: Any) -> None:
            synchronize(self.device)
            self._started[idx] = time.perf_counter()

        return hook

    def _stop(self, idx: int):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            synchronize(self.device)
            self.spent[idx] += time.perf_counter() - self._started[idx]

        return hook

    def reset(self) -> None:
        self.spent = [0.0] * len(self.layers)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


@dataclass
class LayerTimes:
    """Median seconds of each decoder layer, base and merged: in a prefill of ``batch`` x ``context`` tokens
    (``phase="prefill"``), or per decode step after it (``phase="decode"``, ``decode_steps`` steps a repetition)."""

    batch: int
    context: int
    threads: int
    repeats: int
    kinds: list[str] = field(default_factory=list)  # the merged model's layer kinds
    depths: list[int] = field(default_factory=list)  # chain depth of each shared layer, 0 for the others
    base_seconds: list[float] = field(default_factory=list)
    merged_seconds: list[float] = field(default_factory=list)
    base_total: float = 0.0  # median seconds of the whole forward
    merged_total: float = 0.0
    base_outside: float = 0.0  # median over the repetitions of the seconds outside the layers (embeddings, norm, head)
    merged_outside: float = 0.0
    machine: dict[str, Any] = field(default_factory=dict)  # measure.machine_info
    phase: str = "prefill"
    decode_steps: int = 0
    cache: str = "dynamic"  # the KV cache the decode steps ran on: "dynamic" or "static"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def by_depth(self) -> list[dict[str, Any]]:
        """One row per layer group: the full and source layers, then shared layers by chain depth; mean
        milliseconds per layer of the group in each model and the merged - base difference summed over it."""
        groups: dict[str, list[int]] = {}
        for idx, (kind, depth) in enumerate(zip(self.kinds, self.depths, strict=True)):
            groups.setdefault(f"shared, depth {depth}" if kind == "shared" else kind, []).append(idx)
        order = sorted(groups, key=lambda name: (name.startswith("shared"), len(name), name))
        rows = []
        for name in order:
            idx = groups[name]
            base = [self.base_seconds[i] * 1e3 for i in idx]
            merged = [self.merged_seconds[i] * 1e3 for i in idx]
            rows.append(
                {
                    "layers": name,
                    "indices": idx,
                    "base_ms": statistics.fmean(base),
                    "merged_ms": statistics.fmean(merged),
                    "difference_ms": sum(merged) - sum(base),
                }
            )
        return rows

    def to_markdown(self) -> str:
        """The machine, the whole prefill (or decode step) of each model and the per-group table of
        :meth:`by_depth`."""
        what = f"Prefill of {self.batch} x {self.context} tokens"
        if self.phase == "decode":
            what = (
                f"A decode step on a {self.cache} cache after a prefill of {self.batch} x {self.context} tokens "
                f"({self.decode_steps} steps)"
            )
        lines = [
            f"Machine: {machine_label(self.machine)}",
            "",
            f"{what}, {self.threads} thread(s), medians of {self.repeats} alternating repetitions: base "
            f"{self.base_total * 1e3:,.1f} ms, merged {self.merged_total * 1e3:,.1f} ms (speedup "
            f"{self.base_total / self.merged_total:.3f}x).",
            "",
            "| layers | count | base ms / layer | merged ms / layer | merged - base, all of them |",
            "|---|---:|---:|---:|---:|",
        ]
        digits = 3 if self.phase == "decode" else 1  # a decode step's layer takes about a millisecond
        for row in self.by_depth():
            lines.append(
                f"| {row['layers']} ({', '.join(map(str, row['indices']))}) | {len(row['indices'])} "
                f"| {row['base_ms']:.{digits}f} | {row['merged_ms']:.{digits}f} "
                f"| {row['difference_ms']:+.{digits}f} ms |"
            )
        outside = self.merged_outside - self.base_outside
        lines.append(f"| outside the layers (embeddings, norm, LM head) | | | | {outside * 1e3:+.{digits}f} ms |")
        return "\n".join(lines) + "\n"


def prefill_layer_times(
    base: nn.Module,
    merged: nn.Module,
    *,
    batch: int = 1,
    context: int = 2048,
    repeats: int = 5,
    seed: int = 0,
) -> LayerTimes:
    """Per-layer prefill times of ``base`` and ``merged`` (its merged LiSA model, on the same device): one forward
    over ``batch`` x ``context`` random ids with the cache built and only the last token's logits, as
    ``peft-lisa bench`` times it; the two models alternating, one warm-up each, medians of ``repeats``."""
    device = next(base.parameters()).device
    ids = random_ids(batch, context, base.config.vocab_size, device, seed)

    def prefill(model: nn.Module, clock: LayerClock) -> float:
        clock.reset()
        synchronize(device)
        start = time.perf_counter()
        model(ids, use_cache=True, logits_to_keep=1)
        synchronize(device)
        return time.perf_counter() - start

    return _alternating_layer_times(base, merged, prefill, repeats, batch=batch, context=context)


def decode_layer_times(
    base: nn.Module,
    merged: nn.Module,
    *,
    batch: int = 1,
    context: int = 128,
    steps: int = 16,
    repeats: int = 5,
    seed: int = 0,
    cache: str = "dynamic",
) -> LayerTimes:
    """Per-layer times of a decode step of ``base`` and ``merged``: in each repetition an untimed prefill of
    ``batch`` x ``context`` random ids, then ``steps`` timed greedy steps on the cache it built, as ``peft-lisa
    bench`` times them (``cache="static"``: a ``StaticCache`` of ``context + steps`` slots); each layer's time and
    the step's are per step. The two models alternating, one warm-up each, medians of ``repeats``."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    check_cache_kind(cache, HOOKED_CACHE_KINDS)
    device = next(base.parameters()).device
    ids = random_ids(batch, context, base.config.vocab_size, device, seed)

    def decode(model: nn.Module, clock: LayerClock) -> float:
        out = model(ids, cache=empty_cache(model, cache, context + steps), use_cache=True, logits_to_keep=1)
        next_ids = out.logits[:, -1].argmax(-1, keepdim=True)
        clock.reset()
        seconds = timed_decode(model, out.cache, next_ids, steps, device)
        clock.spent = [spent / steps for spent in clock.spent]
        return seconds / steps

    return _alternating_layer_times(
        base, merged, decode, repeats, batch=batch, context=context, phase="decode", decode_steps=steps, cache=cache
    )


def _alternating_layer_times(
    base: nn.Module,
    merged: nn.Module,
    timed: Callable[[nn.Module, LayerClock], float],
    repeats: int,
    **what: Any,
) -> LayerTimes:
    """Run ``timed(model, clock)`` (which resets the clock before what it times and returns its seconds) for the two
    models alternating, one warm-up and ``repeats`` repetitions, with a :class:`LayerClock` on each; medians of each
    layer's time and of the totals, the merged model's layer kinds and chain depths, and ``what`` was timed (the
    :class:`LayerTimes` fields ``batch``, ``context``, ``phase``, ``decode_steps``)."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    device = next(base.parameters()).device
    models = {"base": base, "merged": merged}
    clocks = {key: LayerClock(model, device) for key, model in models.items()}
    per_layer: dict[str, list[list[float]]] = {key: [] for key in models}
    totals: dict[str, list[float]] = {key: [] for key in models}
    try:
        with torch.inference_mode():
            for repetition in range(repeats + 1):  # the first is a warm-up
                for key in alternating(models, repetition):
                    seconds = timed(models[key], clocks[key])
                    if repetition:
                        totals[key].append(seconds)
                        per_layer[key].append(list(clocks[key].spent))
    finally:
        for clock in clocks.values():
            clock.remove()
    kinds = clocks["merged"].kinds
    depths = chain_depths(tuple(i for i, kind in enumerate(kinds) if kind == "shared"))
    return LayerTimes(
        **what,
        threads=torch.get_num_threads(),
        repeats=repeats,
        kinds=kinds,
        depths=[depths.get(i, 0) for i in range(len(kinds))],
        base_seconds=[statistics.median(times) for times in zip(*per_layer["base"], strict=True)],
        merged_seconds=[statistics.median(times) for times in zip(*per_layer["merged"], strict=True)],
        base_total=statistics.median(totals["base"]),
        merged_total=statistics.median(totals["merged"]),
        # per repetition, then the median: the medians of the layers and of the whole need not add up
        base_outside=statistics.median(t - sum(s) for t, s in zip(totals["base"], per_layer["base"], strict=True)),
        merged_outside=statistics.median(
            t - sum(s) for t, s in zip(totals["merged"], per_layer["merged"], strict=True)
        ),
        machine=machine_info(device),
    )
