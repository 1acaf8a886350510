"""Side-by-side speed and memory benchmark of a base model and its merged LiSA model.

:func:`run_benchmark` loads nothing itself: it takes the base model and the merged model (``merge_and_unload()``)
of the same base, and measures both in one run, alternating between them within every repetition:

* prefill tokens/s: one forward over ``[B, T]`` random token ids with ``use_cache=True`` (the time includes building
  the KV cache; only the last position's logits are computed, ``logits_to_keep=1``);
* decode tokens/s: after that prefill, ``N`` greedy single-token steps feeding the cache, ``B * N / time``;
* KV-cache bytes, in total and per token, read off the cache tensors themselves (keys and values of every layer);
* peak memory of a run (prefill + decode): the model's own weights plus the peak working memory above the level
  before the run (``torch.cuda.max_memory_allocated`` on CUDA; the process's peak resident set size ``VmHWM``, reset
  through ``/proc/self/clear_refs`` after ``malloc_trim``, on CPU);
* Q/K parameters and the compression ratio (:func:`peft_lisa.qk_compression_report`);
* maximum throughput under a fixed memory budget, the measure the LiSA paper reports: for each model the largest
  batch whose weights and KV cache (at a fixed context) fit the budget, times its decode rate at that batch;
* an analytic FLOPs / bytes breakdown per layer type, which bounds the speedup LiSA can give.

Medians over the repetitions are reported. Configurations whose estimated working memory exceeds the memory limit are
skipped and listed with the reason. Results come as a :class:`BenchmarkResult` with ``to_markdown()``, ``to_json()``
and ``plot()``. ``examples/benchmark.py`` is the command-line front end.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import platform
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from .tuner.architectures import attention_of, decoder_layers
from .tuner.compression import qk_compression_report
from .tuner.merged import LiSASharedAttention, LiSASourceAttention

MODEL_KEYS = ("base", "merged")
PathLike = Union[str, os.PathLike]


# --------------------------------------------------------------------------------------------------------------
# Result containers
# --------------------------------------------------------------------------------------------------------------


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
    estimated_working_bytes: int = 0  # what the skip logic predicted, for comparison
    decode_cache: str = "prefill"  # "prefill": decode continues the measured prefill; "synthetic": see notes

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
        )
        return out


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

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["ratio"] = self.ratio
        return out


@dataclass
class BenchmarkResult:
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

    # -- lookup ------------------------------------------------------------------------------------------------

    def run(self, model: str, batch: int, context: int) -> Optional[Run]:
        """The run of ``model`` ("base" or "merged") at ``(batch, context)``, or None if it was skipped."""
        return next(
            (r for r in self.runs if (r.model, r.batch, r.context) == (model, batch, context)),
            None,
        )

    # -- output ------------------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
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
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    def to_markdown(self) -> str:
        return _markdown(self)

    def plot(self, path: PathLike) -> Path:
        return _plot(self, Path(path))


# --------------------------------------------------------------------------------------------------------------
# Machine and model description
# --------------------------------------------------------------------------------------------------------------


def machine_info(device: torch.device) -> dict[str, Any]:
    """Name the machine: CPU model, GPU name, torch/transformers versions, threads."""
    import transformers

    info: dict[str, Any] = {
        "device": str(device),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    try:
        import peft

        info["peft"] = peft.__version__
    except ImportError:  # pragma: no cover - peft is a dependency
        pass
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_bytes=props.total_memory, cuda=torch.version.cuda)
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_label(machine: dict[str, Any]) -> str:
    """One line naming the machine, for tables and plots."""
    device = machine.get("gpu") or f"CPU {machine.get('cpu')}"
    return (
        f"{device} ({machine.get('device')}), {machine.get('cpu_count')} CPUs, "
        f"{machine.get('torch_threads')} torch threads, torch {machine.get('torch')}, "
        f"transformers {machine.get('transformers')}"
    )


@dataclass(frozen=True)
class ModelShape:
    """The sizes the analytic estimates need, read off a (base or merged) model."""

    hidden: int
    intermediate: int
    vocab: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    share_layers: tuple[int, ...]
    source_layers: tuple[int, ...]
    rank: int
    align_hidden: int
    element_bytes: int
    weight_bytes: int
    lowrank_key_bytes: int = 0  # element size of a shared layer's rank-r keys (its k_lowrank weight dtype)

    @classmethod
    def of(cls, model: nn.Module) -> ModelShape:
        config = model.config
        layers = decoder_layers(model)
        shared = [i for i, layer in enumerate(layers) if isinstance(layer.self_attn, LiSASharedAttention)]
        sources = [i for i, layer in enumerate(layers) if isinstance(layer.self_attn, LiSASourceAttention)]
        param = next(model.parameters())
        rank, align_hidden, key_bytes = 0, 0, param.element_size()
        if shared:
            attn = layers[shared[0]].self_attn
            rank, align_hidden, key_bytes = attn.rank, attn.align.hidden, attn.k_lowrank.weight.element_size()
        head_dim = attention_of(layers[0]).head_dim  # layer 0 never shares
        num_heads = config.num_attention_heads
        return cls(
            hidden=config.hidden_size,
            intermediate=config.intermediate_size,
            vocab=config.vocab_size,
            num_layers=len(layers),
            num_heads=num_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            share_layers=tuple(shared),
            source_layers=tuple(sources),
            rank=rank,
            align_hidden=align_hidden,
            element_bytes=param.element_size(),
            weight_bytes=_weight_bytes(model),
            lowrank_key_bytes=key_bytes,
        )

    @property
    def mixed_dtype(self) -> bool:
        """True when the shared layers' low-rank modules are not in the model's dtype (their keys are cached in
        theirs: e.g. float32 keys in a bfloat16 model, when a merged model was not cast after merging)."""
        return bool(self.share_layers) and self.lowrank_key_bytes != self.element_bytes

    @property
    def full_layer_cache_bytes(self) -> int:
        """KV-cache bytes per token of a full layer: ``2 * H_kv * d_h * bytes``."""
        return 2 * self.num_kv_heads * self.head_dim * self.element_bytes

    @property
    def shared_layer_cache_bytes(self) -> int:
        """KV-cache bytes per token of a shared layer: ``H_kv * (r + d_h) * bytes`` (rank-r keys, full values)."""
        return self.num_kv_heads * (self.rank * self.lowrank_key_bytes + self.head_dim * self.element_bytes)

    @property
    def cache_bytes_per_token(self) -> int:
        shared = len(self.share_layers)
        return (self.num_layers - shared) * self.full_layer_cache_bytes + shared * self.shared_layer_cache_bytes


def _weight_bytes(model: nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.data_ptr() in seen:  # tied embeddings
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
    return total


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


def _model_info(name: str, model: nn.Module, shape: ModelShape) -> ModelInfo:
    return ModelInfo(
        name=name,
        num_parameters=_num_parameters(model),
        weight_bytes=shape.weight_bytes,
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
        attn_implementation=str(getattr(model.config, "_attn_implementation", None)),
        num_layers=shape.num_layers,
        share_layers=list(shape.share_layers),
        source_layers=list(shape.source_layers),
        rank=shape.rank or None,
        align_hidden=shape.align_hidden if shape.share_layers else None,
        kv_cache_bytes_per_token_analytic=shape.cache_bytes_per_token,
    )


def default_share_layers(num_layers: int, fraction: float = 0.5) -> list[int]:
    """A deterministic choice of ``round(fraction * num_layers)`` layers to share, for when no analysis is at hand.

    The layers are spread evenly over the deepest ``2n`` layers (never layer 0), so that shallow layers stay full and
    shared layers alternate with full ones as long as there is room: 0.25 of 30 layers gives every other layer of the
    deeper half, 0.5 every other layer from layer 1. It is a speed-benchmark default, not a quality choice; pass
    ``share_layers`` from ``peft_lisa.analyze`` (or measured elsewhere) for a model you will use.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    count = min(max(round(fraction * num_layers), 1), num_layers - 1)
    first = max(1, num_layers - 2 * count)
    span = num_layers - 1 - first
    if count == 1:
        return [num_layers - 1]
    chosen = sorted({round(first + i * span / (count - 1)) for i in range(count)})
    missing = [i for i in range(num_layers - 1, 0, -1) if i not in chosen][: count - len(chosen)]
    return sorted(chosen + missing)


# --------------------------------------------------------------------------------------------------------------
# Memory: estimates (for skipping) and measurement
# --------------------------------------------------------------------------------------------------------------


def estimate_working_bytes(shape: ModelShape, batch: int, context: int, decode_tokens: int, phase: str) -> int:
    """Working memory (above the resident weights) of one run, estimated from the shapes; used to skip runs.

    ``phase`` is "prefill" (the prefill forward of ``[batch, context]``) or "decode" (``decode_tokens`` steps on a
    cache of ``context`` tokens). Counted: the KV cache, one layer's transient activations, the last-position logits
    and, for LiSA layers, the ``B x H x T_q x T_k`` float32 logits and the ``B x m x T_q x T_k`` hidden tensor of the
    head-alignment FFN that the unfused implementation materialises (``m + 3H`` float32 values per (query, key)
    entry at the peak of a shared layer; about ``m + 1.5H`` was measured on SmolLM2-135M on CPU). sdpa layers,
    source layers included, are taken as fused (no ``T_q x T_k`` tensor).
    """
    heads, kv_heads, head_dim, e = shape.num_heads, shape.num_kv_heads, shape.head_dim, shape.element_bytes
    q_len = context if phase == "prefill" else 1
    k_len = context if phase == "prefill" else context + decode_tokens
    cache = shape.cache_bytes_per_token * batch * k_len
    per_token = 4 * shape.hidden + 3 * shape.intermediate + (heads + 2 * kv_heads) * head_dim
    activations = 3 * batch * q_len * per_token * e  # x3: temporaries and allocator slack, measured on SmolLM2
    logits = batch * shape.vocab * 4 * 2
    entry_floats = shape.align_hidden + 3 * heads if shape.share_layers else 0
    explicit = batch * q_len * k_len * 4 * entry_floats
    return cache + activations + logits + explicit


def default_memory_limit(device: torch.device) -> int:
    """Working memory a run may use: 90% of free GPU memory, or 75% of the available system memory on CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.9)
    try:
        import psutil

        return int(psutil.virtual_memory().available * 0.75)
    except ImportError:  # pragma: no cover
        pages, page_size = os.sysconf("SC_AVPHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        return int(pages * page_size * 0.75)


class PeakMemory:
    """Peak working memory of a block of code, above the level at its start.

    CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (tensor memory only). CPU: the
    process's peak resident set size (``VmHWM`` in ``/proc/self/status``), reset by writing ``5`` to
    ``/proc/self/clear_refs`` after ``gc.collect()`` and glibc ``malloc_trim(0)`` hand freed memory back to the OS;
    this counts every allocation the process touches (tensors, allocator slack, Python objects). Where that is not
    possible (not Linux), it falls back to sampling the RSS with psutil every millisecond, which can miss short peaks.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.method = self._choose_method()
        self._start = 0
        self._sampler: Optional[threading.Thread] = None
        self._sampled_peak = 0
        self._stop = threading.Event()

    def _choose_method(self) -> str:
        if self.device.type == "cuda":
            return "torch.cuda.max_memory_allocated"
        if _reset_hwm():
            return "VmHWM (peak RSS, reset via /proc/self/clear_refs)"
        return "psutil RSS sampled every 1 ms"

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        elif self.method.startswith("VmHWM"):
            _malloc_trim()
            _reset_hwm()
            self._start = _proc_status_bytes("VmRSS")
        else:
            import psutil

            process = psutil.Process()
            self._start = self._sampled_peak = process.memory_info().rss
            self._stop.clear()

            def sample() -> None:
                while not self._stop.is_set():
                    self._sampled_peak = max(self._sampled_peak, process.memory_info().rss)
                    time.sleep(0.001)

            self._sampler = threading.Thread(target=sample, daemon=True)
            self._sampler.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._start
        elif self.method.startswith("VmHWM"):
            self.peak = _proc_status_bytes("VmHWM") - self._start
        else:
            self._stop.set()
            if self._sampler is not None:
                self._sampler.join()
            self.peak = self._sampled_peak - self._start
        self.peak = max(int(self.peak), 0)


def _proc_status_bytes(key: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        _proc_status_bytes("VmHWM")
        return True
    except (OSError, KeyError):
        return False


def _malloc_trim() -> None:
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


def cache_bytes(cache: Any) -> int:
    """Bytes of a transformers cache: keys and values of every layer (``numel * element_size``)."""
    total = 0
    for layer in cache.layers:
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


# --------------------------------------------------------------------------------------------------------------
# Timed runs
# --------------------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _random_ids(batch: int, length: int, vocab: int, device: torch.device, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=generator).to(device)


def _decode(model: nn.Module, cache: Any, next_ids: torch.Tensor, steps: int, device: torch.device) -> float:
    _sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        out = model(input_ids=next_ids, cache=cache, use_cache=True)
        next_ids = out.logits[:, -1].argmax(-1, keepdim=True)
        cache = out.cache
    _sync(device)
    return time.perf_counter() - started


def _prefill_then_decode(
    model: nn.Module, ids: torch.Tensor, decode_tokens: int, device: torch.device
) -> tuple[float, float, int]:
    """Time the prefill of ``ids`` and ``decode_tokens`` greedy steps after it; return (prefill s, decode s, cache
    bytes after the prefill)."""
    _sync(device)
    started = time.perf_counter()
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    _sync(device)
    prefill = time.perf_counter() - started
    cache = out.cache
    kv_bytes = cache_bytes(cache)
    next_ids = out.logits[:, -1].argmax(-1, keepdim=True)
    del out
    decode = _decode(model, cache, next_ids, decode_tokens, device) if decode_tokens else 0.0
    return prefill, decode, kv_bytes


def synthetic_cache(model: nn.Module, batch: int, context: int, device: torch.device, seed: int = 0) -> Any:
    """A cache of ``context`` random tokens shaped exactly like the one a prefill of ``[batch, context]`` leaves.

    The model builds its own cache for one token (so every layer gets its own key shape: rank-r keys in shared
    layers), then every layer's keys and values are replaced by random tensors of the full length. The cost of a
    decode step does not depend on the cached values, so this measures decoding at sizes whose prefill does not fit.
    """
    vocab = model.config.vocab_size
    out = model(input_ids=_random_ids(batch, 1, vocab, device, seed), use_cache=True, logits_to_keep=1)
    cache = out.cache
    generator = torch.Generator(device=device).manual_seed(seed)
    for layer in cache.layers:
        for name in ("keys", "values"):
            tensor = getattr(layer, name)
            shape = (*tensor.shape[:-2], context, tensor.shape[-1])
            setattr(layer, name, torch.randn(shape, dtype=tensor.dtype, device=device, generator=generator))
    return cache


def _synthetic_decode(
    model: nn.Module, batch: int, context: int, decode_tokens: int, device: torch.device, seed: int
) -> tuple[float, int]:
    cache = synthetic_cache(model, batch, context, device, seed)
    kv_bytes = cache_bytes(cache)
    next_ids = _random_ids(batch, 1, model.config.vocab_size, device, seed + 1)
    return _decode(model, cache, next_ids, decode_tokens, device), kv_bytes


class _Log:
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.started = time.perf_counter()

    def __call__(self, message: str) -> None:
        if self.enabled:
            print(f"[benchmark {time.perf_counter() - self.started:7.1f}s] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------------------------


def run_benchmark(
    base_model: nn.Module,
    merged_model: nn.Module,
    *,
    batch_sizes: tuple[int, ...] = (1, 8, 32),
    contexts: tuple[int, ...] = (128, 512, 2048),
    decode_tokens: int = 32,
    repeats: int = 3,
    warmup: int = 1,
    memory_budget_bytes: Optional[int] = None,
    budget_context: Optional[int] = None,
    max_throughput: bool = True,
    memory_limit_bytes: Optional[int] = None,
    max_prefill_tokens: Optional[int] = None,
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
        device: where to run; the models are moved there. Default: the device of ``base_model``'s parameters.
        seed: seed of the random token ids.
        progress: print progress to stderr.
    """
    device = torch.device(device) if device is not None else next(base_model.parameters()).device
    log = _Log(progress)
    models = {"base": base_model.to(device).eval(), "merged": merged_model.to(device).eval()}
    shapes = {key: ModelShape.of(model) for key, model in models.items()}
    if not shapes["merged"].share_layers:
        raise ValueError("merged_model has no merged LiSA layers; pass peft_model.merge_and_unload().")
    if shapes["base"].share_layers:
        raise ValueError("base_model has merged LiSA layers; pass the original model as base_model.")
    limit = int(memory_limit_bytes) if memory_limit_bytes is not None else default_memory_limit(device)
    peak_method = PeakMemory(device).method
    machine = machine_info(device)
    log(f"machine: {machine_label(machine)}; working-memory limit {_fmt_bytes(limit)}; peak memory: {peak_method}")

    runs: list[Run] = []
    skipped: list[Skipped] = []
    notes: list[str] = []
    vocab = shapes["base"].vocab

    # Objects alive now (modules, weights, imported libraries) are never garbage; freezing them keeps the
    # gc.collect() between runs fast (it otherwise walks every object of torch and transformers each time).
    gc.collect()
    gc.freeze()
    try:
        with torch.inference_mode():
            _warm_start(models, device, vocab, seed)
            for context in contexts:
                for batch in batch_sizes:
                    prefill_allowed = max_prefill_tokens is None or batch * context <= max_prefill_tokens
                    if not prefill_allowed:
                        # Decoding is still timed, on a synthetic cache of the same size (no prefill needed).
                        reason = f"B*T = {batch * context} tokens above max_prefill_tokens={max_prefill_tokens}"
                        skipped.append(Skipped("both", batch, context, "prefill", reason + " (run-time cap)"))
                        log(f"B={batch} T={context}: prefill skipped ({reason}); decode on a synthetic cache")
                        if not decode_tokens:
                            continue
                    _run_config(
                        models, shapes, batch, context, decode_tokens, repeats, warmup, limit, device, seed, runs,
                        skipped, log, prefill_allowed,
                    )  # fmt: skip
            throughput = None
            if max_throughput:
                throughput = _max_throughput(
                    models, shapes, runs, skipped, batch_sizes, contexts, decode_tokens, repeats, warmup,
                    memory_budget_bytes, budget_context, limit, device, seed, log,
                )  # fmt: skip
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
    notes.append(
        "The merged model's shared layers compute explicit float32 attention logits (the head alignment acts on "
        f"them). The full layers feeding them run {implementation} on prefill and hand their Q/K on, and compute "
        "their one row of logits explicitly on decode steps; its other layers, and every layer of the base model, "
        f"use {implementation}."
    )
    settings = {
        "batch_sizes": list(batch_sizes),
        "contexts": list(contexts),
        "decode_tokens": decode_tokens,
        "repeats": repeats,
        "warmup": warmup,
        "memory_limit_bytes": limit,
        "max_prefill_tokens": max_prefill_tokens,
        "peak_memory_method": peak_method,
        "seed": seed,
        "statistic": "median over repetitions",
        "prefill": "one forward over [B, T] random ids, use_cache=True, logits_to_keep=1 (includes cache build)",
        "decode": "greedy single-token steps feeding the cache; tokens/s = B * N / time",
    }
    return BenchmarkResult(
        machine=machine,
        settings=settings,
        models={key: _model_info(_model_name(models["base"], key), models[key], shapes[key]) for key in MODEL_KEYS},
        runs=runs,
        skipped=skipped,
        compression=qk_compression_report(models["merged"]).to_dict(),
        max_throughput=throughput,
        analytic=analytic_breakdown(shapes["merged"], contexts),
        notes=notes,
    )


def _warm_start(models: dict[str, nn.Module], device: torch.device, vocab: int, seed: int) -> None:
    """One small untimed run per model (first-call allocations, kernel selection)."""
    ids = _random_ids(1, 16, vocab, device, seed)
    for model in models.values():
        _prefill_then_decode(model, ids, 2, device)


def _order(repetition: int) -> tuple[str, ...]:
    return MODEL_KEYS if repetition % 2 == 0 else MODEL_KEYS[::-1]


def _run_config(
    models: dict[str, nn.Module],
    shapes: dict[str, ModelShape],
    batch: int,
    context: int,
    decode_tokens: int,
    repeats: int,
    warmup: int,
    limit: int,
    device: torch.device,
    seed: int,
    runs: list[Run],
    skipped: list[Skipped],
    log: _Log,
    prefill_allowed: bool = True,
) -> None:
    """Measure both models at one (batch, context), alternating; skip what is estimated not to fit.

    Without ``prefill_allowed`` (the run-time cap), or when the prefill would not fit, decoding is timed on a
    synthetic cache of the same size.
    """
    mode: dict[str, str] = {}
    estimates: dict[str, int] = {}
    for key, shape in shapes.items():
        prefill_estimate = estimate_working_bytes(shape, batch, context, decode_tokens, "prefill")
        decode_estimate = estimate_working_bytes(shape, batch, context, decode_tokens, "decode")
        if prefill_allowed and prefill_estimate <= limit:
            mode[key], estimates[key] = "prefill", max(prefill_estimate, decode_estimate)
            continue
        if prefill_allowed:
            skipped.append(
                Skipped(
                    key, batch, context, "prefill", _too_big("prefill", prefill_estimate, limit), prefill_estimate,
                    limit,
                )
            )  # fmt: skip
        if decode_tokens and decode_estimate <= limit:
            mode[key], estimates[key] = "synthetic", decode_estimate
        else:
            skipped.append(
                Skipped(
                    key, batch, context, "decode", _too_big("decode", decode_estimate, limit), decode_estimate, limit
                )
            )
    if not mode:
        log(f"B={batch} T={context}: skipped (estimated memory above the limit)")
        return
    ids = _random_ids(batch, context, shapes["base"].vocab, device, seed)
    results = {
        key: Run(key, batch, context, decode_tokens, estimated_working_bytes=estimates[key], decode_cache=mode[key])
        for key in mode
    }
    for repetition in range(warmup + repeats):
        timed = repetition >= warmup
        for key in _order(repetition):
            if key not in mode:
                continue
            run, model = results[key], models[key]
            with PeakMemory(device) as peak:
                if mode[key] == "prefill":
                    prefill, decode, kv_bytes = _prefill_then_decode(model, ids, decode_tokens, device)
                else:
                    decode, _ = _synthetic_decode(model, batch, context, decode_tokens, device, seed)
                    prefill, kv_bytes = None, shapes[key].cache_bytes_per_token * batch * context
            if not timed:
                continue
            if prefill is not None:
                run.prefill_seconds.append(prefill)
            if decode_tokens:
                run.decode_seconds.append(decode)
            run.kv_cache_bytes = kv_bytes
            run.peak_working_bytes = max(run.peak_working_bytes, peak.peak)
            run.peak_memory_bytes = shapes[key].weight_bytes + run.peak_working_bytes
        gc.collect()
    for key in MODEL_KEYS:
        if key in results:
            runs.append(results[key])
    log(
        f"B={batch} T={context}: "
        + "; ".join(
            f"{key} prefill {_fmt_rate(r.prefill_tokens_per_s)} decode {_fmt_rate(r.decode_tokens_per_s)} tok/s"
            for key, r in results.items()
        )
    )


def _too_big(phase: str, estimate: int, limit: int) -> str:
    return f"{phase}: estimated working memory {_fmt_bytes(estimate)} exceeds the limit {_fmt_bytes(limit)}"


def _max_throughput(
    models: dict[str, nn.Module],
    shapes: dict[str, ModelShape],
    runs: list[Run],
    skipped: list[Skipped],
    batch_sizes: tuple[int, ...],
    contexts: tuple[int, ...],
    decode_tokens: int,
    repeats: int,
    warmup: int,
    budget: Optional[int],
    context: Optional[int],
    limit: int,
    device: torch.device,
    seed: int,
    log: _Log,
) -> Optional[MaxThroughput]:
    """Largest batch whose weights + KV cache fit the budget, for each model, and its measured decode throughput."""
    if decode_tokens <= 0:
        return None
    context = context or max(contexts)
    steps = context + decode_tokens
    if budget is None:
        batch = max(batch_sizes)
        budget = shapes["base"].weight_bytes + _per_token(shapes["base"], runs, context) * batch * steps
        source = f"base model's weights + KV cache at batch {batch}, context {context} + {decode_tokens} decoded"
    else:
        source = "given"
    result = MaxThroughput(
        budget_bytes=int(budget), budget_source=source, context=context, decode_tokens=decode_tokens
    )
    batches: dict[str, int] = {}
    for key, shape in shapes.items():
        per_sequence = _per_token(shape, runs, context) * steps
        batches[key] = max(int((budget - shape.weight_bytes) // per_sequence), 0)
        result.points[key] = ThroughputPoint(
            model=key,
            max_batch=batches[key],
            weight_bytes=shape.weight_bytes,
            kv_cache_bytes=int(per_sequence * batches[key]),
            decode_tokens_per_s=None,
            method="not available (the weights alone exceed the budget)",
        )
    runnable = []
    for key, shape in shapes.items():
        if batches[key] == 0:
            continue
        estimate = estimate_working_bytes(shape, batches[key], context, decode_tokens, "decode")
        if estimate <= limit:
            runnable.append(key)
            continue
        reason = _too_big("max-throughput decode", estimate, limit)
        skipped.append(Skipped(key, batches[key], context, "max-throughput decode", reason, estimate, limit))
        rate, how = _extrapolate(runs, key, context, batches[key])
        result.points[key].decode_tokens_per_s = rate
        result.points[key].method = how
    log(f"max throughput: budget {_fmt_bytes(budget)} at context {context}: max batch {batches}")
    for repetition in range(warmup + repeats):
        for key in _order(repetition):
            if key not in runnable:
                continue
            seconds, _ = _synthetic_decode(models[key], batches[key], context, decode_tokens, device, seed)
            if repetition >= warmup:
                result.points[key].decode_seconds.append(seconds)
            gc.collect()
    for key in runnable:
        point = result.points[key]
        point.decode_tokens_per_s = point.max_batch * decode_tokens / statistics.median(point.decode_seconds)
        point.method = f"measured (decode at batch {point.max_batch} on a synthetic {context}-token cache)"
    log(
        "max throughput: "
        + "; ".join(f"{k} {_fmt_rate(p.decode_tokens_per_s)} tok/s ({p.method})" for k, p in result.points.items())
    )
    return result


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


# --------------------------------------------------------------------------------------------------------------
# Analytic FLOPs / bytes per token
# --------------------------------------------------------------------------------------------------------------


def analytic_breakdown(shape: ModelShape, contexts: tuple[int, ...] = (128, 512, 2048)) -> dict[str, Any]:
    """FLOPs and bytes per query token, per layer type, of the base model and of the merged LiSA model.

    A multiply-add counts 2 FLOPs. Per query token against ``T_k`` keys (``d`` hidden size, ``H``/``H_kv`` query/KV
    heads, ``d_h`` head size, ``r`` LiSA rank, ``m`` alignment FFN hidden size, ``I`` MLP size):

    * full layer: projections ``2d(H d_h) + 2 * 2d(H_kv d_h) + 2(H d_h)d``; per key ``QK^T`` ``2 H d_h`` and ``AV``
      ``2 H d_h``.
    * source layer (a full layer feeding a shared one): as a full layer. On a decode step it computes its logits
      row explicitly and hands it on; on prefill it runs sdpa and hands Q/K on, and the shared layer after it
      recomputes ``QK^T`` (``2 H d_h`` more per key, block by block) instead of reading a ``T x T`` tensor.
    * shared layer: projections ``2d(H r) + 2d(H_kv r) + 2d(H_kv d_h) + 2(H d_h)d``; per key the alignment, which
      runs on every (query, key) entry of all H heads: ``P`` ``2H^2``, FFN ``W1`` and ``W2`` ``4Hm`` (plus ``m``
      activations and biases); low-rank ``QK^T`` ``2 H r``; ``AV`` ``2 H d_h``.
    * every layer also runs its MLP, ``6 d I``; the LM head adds ``2 d V`` per token.

    The table is per decode token. ``materialised_fp32_per_entry`` counts the float32 tensors of size
    ``T_q x T_k`` per head-like channel the current (unfused) implementation writes per (query, key) entry on a
    decode step: fused sdpa writes none, a source layer about ``4H`` (logits, masked logits, probabilities, cast),
    a shared layer about ``3m + 8H``.
    """
    d, inter, vocab = shape.hidden, shape.intermediate, shape.vocab
    heads, kv_heads, dh, r, m = shape.num_heads, shape.num_kv_heads, shape.head_dim, shape.rank, shape.align_hidden
    e = shape.element_bytes
    mlp = 6 * d * inter
    full_proj = 2 * d * heads * dh + 2 * 2 * d * kv_heads * dh + 2 * heads * dh * d
    shared_proj = 2 * d * heads * r + 2 * d * kv_heads * r + 2 * d * kv_heads * dh + 2 * heads * dh * d
    full_key = {"QK^T": 2 * heads * dh, "AV": 2 * heads * dh}
    shared_key = {
        "align P": 2 * heads * heads,
        "align FFN": 4 * heads * m + 2 * m + heads,
        "low-rank QK^T": 2 * heads * r,
        "AV": 2 * heads * dh,
    }
    n_shared, n_source = len(shape.share_layers), len(shape.source_layers)
    layer_types = [
        {
            "layer_type": "full (sdpa)",
            "layers_base": shape.num_layers,
            "layers_merged": shape.num_layers - n_shared - n_source,
            "projection_flops": full_proj,
            "mlp_flops": mlp,
            "per_key_flops": full_key,
            "per_key_flops_total": sum(full_key.values()),
            "kv_cache_bytes_per_token": 2 * kv_heads * dh * e,
            "materialised_fp32_per_entry": 0,
        },
        {
            "layer_type": "source (full, hands its logits on)",
            "layers_base": 0,
            "layers_merged": n_source,
            "projection_flops": full_proj,
            "mlp_flops": mlp,
            "per_key_flops": full_key,
            "per_key_flops_total": sum(full_key.values()),
            "kv_cache_bytes_per_token": 2 * kv_heads * dh * e,
            "materialised_fp32_per_entry": 4 * heads,
        },
        {
            "layer_type": "shared (LiSA)",
            "layers_base": 0,
            "layers_merged": n_shared,
            "projection_flops": shared_proj,
            "mlp_flops": mlp,
            "per_key_flops": shared_key,
            "per_key_flops_total": sum(shared_key.values()),
            "kv_cache_bytes_per_token": shape.shared_layer_cache_bytes,
            "materialised_fp32_per_entry": 3 * m + 8 * heads,
        },
    ]

    def per_token(which: str, keys: int) -> dict[str, float]:
        flops = 2 * d * vocab
        cache = 0
        fp32 = 0
        for row in layer_types:
            count = row[f"layers_{which}"]
            flops += count * (row["projection_flops"] + row["mlp_flops"] + row["per_key_flops_total"] * keys)
            cache += count * row["kv_cache_bytes_per_token"] * keys
            fp32 += count * row["materialised_fp32_per_entry"] * keys * 4
        return {"flops": flops, "kv_cache_bytes_read": cache, "materialised_fp32_bytes": fp32}

    per_context = []
    for keys in contexts:
        base, merged = per_token("base", keys), per_token("merged", keys)
        per_context.append(
            {
                "context": keys,
                "base_flops_per_token": base["flops"],
                "merged_flops_per_token": merged["flops"],
                "flops_ratio_base_over_merged": base["flops"] / merged["flops"],
                "base_kv_bytes_read_per_decode_token": base["kv_cache_bytes_read"],
                "merged_kv_bytes_read_per_decode_token": merged["kv_cache_bytes_read"],
                "kv_read_ratio_base_over_merged": base["kv_cache_bytes_read"] / merged["kv_cache_bytes_read"],
                "merged_materialised_fp32_bytes_per_decode_token": merged["materialised_fp32_bytes"],
            }
        )
    return {
        "dims": {
            "d": d,
            "I": inter,
            "V": vocab,
            "H": heads,
            "H_kv": kv_heads,
            "d_h": dh,
            "r": r,
            "m": m,
            "bytes_per_element": e,
            "layers": shape.num_layers,
            "shared": n_shared,
            "source": n_source,
        },
        "layer_types": layer_types,
        "per_context": per_context,
        "notes": [
            "FLOPs per query token against T_k keys; a multiply-add is 2 FLOPs; decode has T_k = context.",
            "Prefill: shared layers compute all T x T entries (masked ones included) in blocks of queries, and the "
            "first shared layer after a source layer recomputes that layer's QK^T from its handed Q/K (2 H d_h more "
            "per key); source layers themselves run sdpa.",
            "The alignment FFN runs on every (query, key) entry: ~4 H m FLOPs per entry, versus 2 H d_h for QK^T; "
            "it can cost more than the Q/K it replaces, so the compute saving is in the projections only.",
            "Decode at large batch is bound by reading the KV cache; the cache ratio bounds the decode speedup "
            "there, less whatever the materialised float32 logits/FFN tensors add.",
        ],
    }


# --------------------------------------------------------------------------------------------------------------
# Markdown and plot
# --------------------------------------------------------------------------------------------------------------


def _fmt_bytes(value: Optional[float]) -> str:
    if value is None:
        return "-"
    value = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"  # pragma: no cover


def _fmt_rate(value: Optional[float]) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def _fmt_ratio(num: Optional[float], den: Optional[float]) -> str:
    if num is None or den is None or den == 0:
        return "-"
    return f"{num / den:.2f}x"


def _fmt_flops(value: float) -> str:
    return f"{value / 1e6:,.2f} M"


def _markdown(result: BenchmarkResult) -> str:
    settings, base_info, merged_info = result.settings, result.models["base"], result.models["merged"]
    lines = [
        "# LiSA benchmark: base vs merged",
        "",
        f"**Machine:** {machine_label(result.machine)}  ",
        *([f"**Command:** `{settings['command']}`  "] if settings.get("command") else []),
        f"**Models:** base {base_info.name} ({base_info.num_parameters:,} params, {base_info.dtype}, attention "
        f"{base_info.attn_implementation}) vs merged LiSA ({merged_info.num_parameters:,} params; "
        f"{len(merged_info.share_layers)} shared layers {merged_info.share_layers}, rank {merged_info.rank}, "
        f"align hidden {merged_info.align_hidden}; source layers {merged_info.source_layers})  ",
        f"**Settings:** {settings['repeats']} repetition(s) (median), {settings['warmup']} warm-up, models "
        f"alternating; {settings['decode_tokens']} decode steps; peak memory via {settings['peak_memory_method']}; "
        f"working-memory limit {_fmt_bytes(settings['memory_limit_bytes'])}",
        "",
        "## Throughput and memory",
        "",
        "| batch | context | prefill tok/s base | prefill tok/s merged | speedup | decode tok/s base "
        "| decode tok/s merged | speedup | KV cache base | KV cache merged | peak mem base | peak mem merged |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    configs = sorted({(r.context, r.batch) for r in result.runs})
    for context, batch in configs:
        base, merged = result.run("base", batch, context), result.run("merged", batch, context)

        def get(run: Optional[Run], attr: str) -> Optional[float]:
            return getattr(run, attr) if run is not None else None

        def decode_cell(run: Optional[Run]) -> str:
            text = _fmt_rate(get(run, "decode_tokens_per_s"))
            return text + " (synthetic cache)" if run is not None and run.decode_cache == "synthetic" else text

        lines.append(
            f"| {batch} | {context} | {_fmt_rate(get(base, 'prefill_tokens_per_s'))} "
            f"| {_fmt_rate(get(merged, 'prefill_tokens_per_s'))} "
            f"| {_fmt_ratio(get(merged, 'prefill_tokens_per_s'), get(base, 'prefill_tokens_per_s'))} "
            f"| {decode_cell(base)} | {decode_cell(merged)} "
            f"| {_fmt_ratio(get(merged, 'decode_tokens_per_s'), get(base, 'decode_tokens_per_s'))} "
            f"| {_fmt_bytes(get(base, 'kv_cache_bytes'))} | {_fmt_bytes(get(merged, 'kv_cache_bytes'))} "
            f"| {_fmt_bytes(get(base, 'peak_memory_bytes'))} | {_fmt_bytes(get(merged, 'peak_memory_bytes'))} |"
        )
    lines += ["", "Peak memory = the model's weights + the peak working memory of the run (prefill + decode)."]
    if result.skipped:
        lines += ["", "### Skipped", "", "| model | batch | context | phase | reason |", "|---|---:|---:|---|---|"]
        for s in result.skipped:
            lines.append(f"| {s.model} | {s.batch} | {s.context} | {s.phase} | {s.reason} |")
    lines += [
        "",
        "## KV cache per token",
        "",
        "| model | measured bytes/token | analytic bytes/token |",
        "|---|---:|---:|",
    ]
    for key, info in result.models.items():
        measured = next((r.kv_cache_bytes_per_token for r in result.runs if r.model == key), None)
        lines.append(
            f"| {key} | {measured:,.0f} | {info.kv_cache_bytes_per_token_analytic:,} |"
            if measured is not None
            else f"| {key} | - | {info.kv_cache_bytes_per_token_analytic:,} |"
        )
    ratio = base_info.kv_cache_bytes_per_token_analytic / merged_info.kv_cache_bytes_per_token_analytic
    lines += ["", f"Cache ratio base / merged: **{ratio:.3f}x**."]
    comp = result.compression
    lines += [
        "",
        "## Q/K parameters",
        "",
        f"Shared layers: {comp['qk_params_original']:,} Q/K parameters in the base model, {comp['qk_params_lisa']:,} "
        f"in LiSA (alignment + low-rank Q/K): **{comp['ratio']:.2f}x** compression; whole-model Q/K "
        f"{comp['qk_params_original_model']:,} -> ratio {comp['model_qk_ratio']:.2f}x.",
    ]
    mt = result.max_throughput
    if mt is not None:
        lines += [
            "",
            "## Maximum throughput under a memory budget",
            "",
            f"Budget {_fmt_bytes(mt.budget_bytes)} ({mt.budget_source}) for weights + KV cache at context "
            f"{mt.context} + {mt.decode_tokens} decoded tokens; activations are not counted.",
            "",
            "| model | max batch | weights | KV cache | decode tok/s (throughput) | how |",
            "|---|---:|---:|---:|---:|---|",
        ]
        for key, point in mt.points.items():
            lines.append(
                f"| {key} | {point.max_batch} | {_fmt_bytes(point.weight_bytes)} | {_fmt_bytes(point.kv_cache_bytes)} "
                f"| {_fmt_rate(point.decode_tokens_per_s)} | {point.method} |"
            )
        lines += ["", f"Max-throughput ratio merged / base: **{mt.ratio:.3f}x**." if mt.ratio else ""]
        weight_share = mt.points["base"].weight_bytes / mt.budget_bytes if mt.budget_bytes else 0.0
        if weight_share > 0.5:
            lines += [
                "",
                f"Caution: the base model's weights take {weight_share:.0%} of this budget, so the merged model's "
                "smaller weights (its shared layers' Q/K are gone) weigh more than its smaller KV cache; the paper's "
                "setting (a large accelerator, KV cache dominating) is a budget where the cache takes most of it.",
            ]
    lines += ["", analytic_markdown(result.analytic)]
    if result.notes:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in result.notes]
    return "\n".join(lines).rstrip() + "\n"


def analytic_markdown(analytic: dict[str, Any]) -> str:
    """The analytic FLOPs/bytes breakdown as markdown tables."""
    dims = analytic["dims"]
    lines = [
        "## Analytic cost per query token",
        "",
        "Dimensions: " + ", ".join(f"{k}={v}" for k, v in dims.items()) + ".",
        "",
        "| layer type | layers base | layers merged | projections (FLOPs/token) | MLP (FLOPs/token) "
        "| per key (FLOPs per query-key pair) | KV cache bytes/token | fp32 values written per entry |",
        "|---|---:|---:|---:|---:|---|---:|---:|",
    ]
    for row in analytic["layer_types"]:
        per_key = " + ".join(f"{name} {value:,}" for name, value in row["per_key_flops"].items())
        lines.append(
            f"| {row['layer_type']} | {row['layers_base']} | {row['layers_merged']} "
            f"| {_fmt_flops(row['projection_flops'])} | {_fmt_flops(row['mlp_flops'])} "
            f"| {per_key} = **{row['per_key_flops_total']:,}** | {row['kv_cache_bytes_per_token']:,} "
            f"| {row['materialised_fp32_per_entry']} |"
        )
    lines += [
        "",
        "| context T_k | FLOPs/token base | FLOPs/token merged | base/merged | KV bytes read/decode token base "
        "| merged | base/merged | merged fp32 intermediates written/decode token |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in analytic["per_context"]:
        lines.append(
            f"| {row['context']} | {_fmt_flops(row['base_flops_per_token'])} "
            f"| {_fmt_flops(row['merged_flops_per_token'])} | {row['flops_ratio_base_over_merged']:.3f}x "
            f"| {_fmt_bytes(row['base_kv_bytes_read_per_decode_token'])} "
            f"| {_fmt_bytes(row['merged_kv_bytes_read_per_decode_token'])} "
            f"| {row['kv_read_ratio_base_over_merged']:.3f}x "
            f"| {_fmt_bytes(row['merged_materialised_fp32_bytes_per_decode_token'])} |"
        )
    lines += [""] + [f"- {note}" for note in analytic["notes"]]
    return "\n".join(lines)


def _plot(result: BenchmarkResult, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    batches = sorted({r.batch for r in result.runs})
    colors = {b: f"C{i}" for i, b in enumerate(batches)}
    styles = {"base": ("-", "o"), "merged": ("--", "s")}
    for ax, attr, title in (
        (axes[0][0], "prefill_tokens_per_s", "Prefill tokens/s"),
        (axes[0][1], "decode_tokens_per_s", "Decode tokens/s"),
    ):
        for key in MODEL_KEYS:
            for batch in batches:
                points = sorted(
                    (r.context, getattr(r, attr))
                    for r in result.runs
                    if r.model == key and r.batch == batch and getattr(r, attr) is not None
                )
                if points:
                    line, marker = styles[key]
                    xs, ys = zip(*points, strict=True)
                    ax.plot(xs, ys, line, marker=marker, color=colors[batch], label=f"{key} B={batch}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    ax = axes[1][0]
    per_token = [result.models[k].kv_cache_bytes_per_token_analytic / 1024 for k in MODEL_KEYS]
    ax.bar(list(MODEL_KEYS), per_token, color=["C0", "C1"])
    for i, value in enumerate(per_token):
        ax.text(i, value, f"{value:.1f} KiB", ha="center", va="bottom")
    ax.set_title("KV cache per token (KiB)")
    ax = axes[1][1]
    mt = result.max_throughput
    if mt is not None and all(p.decode_tokens_per_s for p in mt.points.values()):
        values = [mt.points[k].decode_tokens_per_s for k in MODEL_KEYS]
        ax.bar(list(MODEL_KEYS), values, color=["C0", "C1"])
        for i, key in enumerate(MODEL_KEYS):
            point = mt.points[key]
            label = f"B={point.max_batch}\n{values[i]:.1f} tok/s"
            if point.method.startswith("EXTRAPOLATED"):
                label += "\n(extrapolated)"
            ax.text(i, values[i], label, ha="center", va="bottom", fontsize=8)
        ax.set_title(
            f"Max decode throughput, budget {_fmt_bytes(mt.budget_bytes)} at context {mt.context}"
            + (f" (x{mt.ratio:.2f})" if mt.ratio else "")
        )
        ax.set_ylim(0, max(values) * 1.3)
    else:
        ax.set_axis_off()
        ax.set_title("Max throughput: not measured")
    fig.suptitle(f"LiSA merged vs base - {machine_label(result.machine)}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def result_summary(result: BenchmarkResult) -> str:
    """A short plain-text summary (one line per configuration)."""
    out = []
    for run in result.runs:
        out.append(
            f"{run.model:6s} B={run.batch:<3d} T={run.context:<5d} prefill {_fmt_rate(run.prefill_tokens_per_s)} "
            f"decode {_fmt_rate(run.decode_tokens_per_s)} tok/s, KV {_fmt_bytes(run.kv_cache_bytes)}, "
            f"peak {_fmt_bytes(run.peak_memory_bytes)}"
        )
    return "\n".join(out)


__all__ = [
    "BenchmarkResult",
    "MaxThroughput",
    "ModelInfo",
    "ModelShape",
    "PeakMemory",
    "Run",
    "Skipped",
    "ThroughputPoint",
    "analytic_breakdown",
    "analytic_markdown",
    "cache_bytes",
    "default_share_layers",
    "estimate_working_bytes",
    "machine_info",
    "run_benchmark",
    "synthetic_cache",
]
