"""What one benchmark run measured, as plain data: the records and their JSON form.

:class:`BenchmarkData` holds every field of a result and writes it as JSON; :class:`~.report.BenchmarkResult`, what
:func:`~.run.run_benchmark` returns, adds the markdown table and the plot to it.
"""

from __future__ import annotations

import json
import os
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

MODEL_KEYS = ("base", "merged")
# The end of a control base's attention implementation (benchmark_model(base_on_rows=True)): its decode steps on the
# CPU kernel's rows, as the merged model's; reports name that base "base on rows".
ON_ROWS = ", decode steps on the CPU kernel's rows"
# The KV caches decode steps are timed on: transformers' default dynamic cache (grown by torch.cat at every step), a
# StaticCache (slots allocated up front and written in place) and that static cache with the decode steps compiled
# by torch.compile (measure.COMPILED_DECODING); the per-layer clocks (forward hooks on every layer, which a compiled
# graph does not run one by one) take the first two.
CACHE_KINDS = ("dynamic", "static", "compiled")
HOOKED_CACHE_KINDS = ("dynamic", "static")
CACHE_LABELS = {  # how reports name them: "16 decode steps on a {label}"
    "dynamic": "dynamic cache",
    "static": "static cache",
    "compiled": "static cache, compiled (torch.compile)",
}


def check_cache_kind(cache: str, kinds: tuple[str, ...] = CACHE_KINDS) -> None:
    """Refuse a KV-cache kind other than ``kinds`` (of :data:`CACHE_KINDS`)."""
    if cache not in kinds:
        raise ValueError(f"cache must be one of {', '.join(map(repr, kinds))}, got {cache!r}")


PathLike = Union[str, os.PathLike]


@dataclass
class Run:
    """One model at one (batch, context): timings of every repetition, cache size and peak memory."""

    model: str
    batch: int
    context: int
    decode_tokens: int
    prefill_seconds: list[float] = field(default_factory=list)
    decode_seconds: list[float] = field(default_factory=list)
    kv_cache_bytes: int = 0  # after the prefill: B * T tokens cached
    peak_memory_bytes: int = 0  # own weights + peak working memory (max over the repetitions)
    peak_working_bytes: int = 0  # peak memory above the level before the run
    peak_tensor_bytes: Optional[int] = None  # peak bytes of live tensors above that level (one untimed pass)
    estimated_working_bytes: int = 0  # what the skip logic predicted, for comparison
    decode_cache: str = "prefill"  # "prefill": decode continues the measured prefill; "synthetic": see notes
    kernel_seconds: list[float] = field(default_factory=list)  # the process's system (kernel) CPU time per run
    ceilings: dict[str, float] = field(default_factory=dict)  # arithmetic speedup bounds (cost_model.ceilings)

    @property
    def kernel_seconds_median(self) -> Optional[float]:
        return statistics.median(self.kernel_seconds) if self.kernel_seconds else None

    @property
    def kv_cache_bytes_per_token(self) -> float:
        return self.kv_cache_bytes / (self.batch * self.context)

    @property
    def prefill_tokens_per_s(self) -> Optional[float]:
        if not self.prefill_seconds:
            return None
        return self.batch * self.context / statistics.median(self.prefill_seconds)

    @property
    def decode_tokens_per_s(self) -> Optional[float]:
        if not self.decode_seconds or self.decode_tokens == 0:
            return None
        return self.batch * self.decode_tokens / statistics.median(self.decode_seconds)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(
            kv_cache_bytes_per_token=self.kv_cache_bytes_per_token,
            prefill_tokens_per_s=self.prefill_tokens_per_s,
            decode_tokens_per_s=self.decode_tokens_per_s,
            kernel_seconds_median=self.kernel_seconds_median,
        )
        return out


def paired_speedups(base_seconds: list[float], merged_seconds: list[float]) -> Optional[tuple[float, float, float]]:
    """The speedups repetition by repetition, base time / merged time of the same repetition (the two models ran
    side by side in it): their median, lowest and highest; None unless both models have the same number of timed
    repetitions. The ratio of the medians (the main table) can differ from the median of these ratios; their range
    shows how far one run of a point can stray."""
    if not base_seconds or len(base_seconds) != len(merged_seconds):
        return None
    ratios = [base / merged for base, merged in zip(base_seconds, merged_seconds, strict=True)]
    return statistics.median(ratios), min(ratios), max(ratios)


@dataclass
class Skipped:
    """A configuration (or one phase of it) that was not run, and why."""

    model: str  # "base", "merged" or "both"
    batch: int
    context: int
    phase: str  # "prefill", "prefill+decode" or "max-throughput decode"
    reason: str
    estimated_bytes: int = 0
    limit_bytes: int = 0


@dataclass
class ModelInfo:
    """What was benchmarked: sizes, attention implementation, LiSA layout."""

    name: str
    num_parameters: int
    weight_bytes: int
    dtype: str
    attn_implementation: str
    num_layers: int
    share_layers: list[int]
    source_layers: list[int]
    rank: Optional[int]
    align_hidden: Optional[int]
    kv_cache_bytes_per_token_analytic: int


@dataclass
class ThroughputPoint:
    """One model at the largest batch whose weights + KV cache fit the memory budget."""

    model: str
    max_batch: int
    weight_bytes: int
    kv_cache_bytes: int  # at max_batch, context + decode tokens
    decode_tokens_per_s: Optional[float]  # = throughput (tokens/s over the whole batch)
    method: str  # "measured (...)", "extrapolated (...)" or "not available (...)"
    decode_seconds: list[float] = field(default_factory=list)
    step_bytes: int = 0  # bytes a decode step reads at max_batch: weights + KV cache


@dataclass
class MaxThroughput:
    """Maximum decode throughput under a fixed memory budget (weights + KV cache; activations not counted)."""

    budget_bytes: int
    budget_source: str
    context: int
    decode_tokens: int
    points: dict[str, ThroughputPoint] = field(default_factory=dict)

    @property
    def ratio(self) -> Optional[float]:
        base, merged = self.points.get("base"), self.points.get("merged")
        if base is None or merged is None or not base.decode_tokens_per_s or merged.decode_tokens_per_s is None:
            return None
        return merged.decode_tokens_per_s / base.decode_tokens_per_s

    @property
    def ceiling(self) -> Optional[float]:
        """The ratio's bytes bound: each model's max batch over the bytes its decode step reads (weights + KV
        cache), merged / base; decoding long contexts is bound by the cache it reads."""
        base, merged = self.points.get("base"), self.points.get("merged")
        if base is None or merged is None or not base.max_batch or not merged.step_bytes or not base.step_bytes:
            return None
        return (merged.max_batch / merged.step_bytes) / (base.max_batch / base.step_bytes)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["ratio"], out["ceiling"] = self.ratio, self.ceiling
        return out


@dataclass
class BenchmarkData:
    """Everything one benchmark run measured, with the machine and settings it ran on."""

    machine: dict[str, Any]
    settings: dict[str, Any]
    models: dict[str, ModelInfo]
    runs: list[Run]
    skipped: list[Skipped]
    compression: dict[str, Any]
    max_throughput: Optional[MaxThroughput]
    analytic: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    def run(self, model: str, batch: int, context: int) -> Optional[Run]:
        """The run of ``model`` ("base" or "merged") at ``(batch, context)``, or None if it was skipped."""
        return next(
            (r for r in self.runs if (r.model, r.batch, r.context) == (model, batch, context)),
            None,
        )

    def label(self, model: str) -> str:
        """How tables and plots name ``model``: "base on rows" for a control base (:data:`ON_ROWS`), else the key."""
        info = self.models.get(model)
        return "base on rows" if info is not None and info.attn_implementation.endswith(ON_ROWS) else model

    def to_dict(self) -> dict[str, Any]:
        """The result as JSON-ready data; runs carry their derived rates (tokens/s, cache bytes per token)."""
        return {
            "machine": self.machine,
            "settings": self.settings,
            "models": {key: asdict(info) for key, info in self.models.items()},
            "runs": [run.to_dict() for run in self.runs],
            "skipped": [asdict(s) for s in self.skipped],
            "compression": self.compression,
            "max_throughput": self.max_throughput.to_dict() if self.max_throughput else None,
            "analytic": self.analytic,
            "notes": self.notes,
        }

    def to_json(self, path: PathLike) -> Path:
        """Write :meth:`to_dict` to ``path`` (parent directories created); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path
