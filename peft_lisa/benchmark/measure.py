"""Measurement: the machine, peak memory, KV-cache bytes and the timed prefill / decode calls.

* :func:`machine_info` names the machine (CPU, GPU, library versions, threads);
* :class:`PeakMemory` measures the peak working memory of a block of code (CUDA allocator stats on GPU, the peak
  resident set size on CPU), :class:`TensorPeak` the peak bytes of tensors alive at once (what the CUDA figure is,
  on CPU too), and :func:`default_memory_limit` is what a run may use;
* :func:`cache_bytes` reads the size of a transformers cache off its tensors;
* :func:`prefill_then_decode` times a prefill and greedy decode steps after it; :func:`synthetic_cache` and
  :func:`synthetic_decode` time decoding on a random cache of a size whose prefill does not fit; both decode on
  transformers' default dynamic cache or, with ``cache="static"``, on a ``StaticCache``, or with ``cache="compiled"``
  on one with the decode steps compiled as ``generate`` compiles them (``CACHE_KINDS``, :func:`decode_call`).
"""

from __future__ import annotations

import ctypes
import gc
import os
import platform
import sys
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any, Optional

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile
from transformers import CompileConfig, StaticCache

from ..tuner.cpu_kernel import cpu_kernel_status
from .results import check_cache_kind

# --------------------------------------------------------------------------------------------------------------
# Machine
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
    if device.type == "cpu":
        info["lisa_cpu_kernel"] = cpu_kernel_status()  # "used", "off" or "unavailable"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_bytes=props.total_memory, cuda=torch.version.cuda)
    return info


def _cpu_name() -> str:
    """The CPU's model name; with its family and model numbers where /proc/cpuinfo has them (cloud CPUs are often
    named only "AMD EPYC", which spans generations of very different speed), and the instruction set torch's kernels
    use (e.g. AVX512)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if not key:  # the end of the first processor's block
                    break
                fields.setdefault(key, value.strip())
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine()
    details = [f"family {fields['cpu family']}, model {fields['model']}"] if "cpu family" in fields else []
    details.append(f"torch kernels {torch.backends.cpu.get_cpu_capability()}")
    return f"{name} ({'; '.join(details)})"


# --------------------------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------------------------


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


class TensorPeak:
    """Peak bytes of the tensors alive at once during a block of code, above the level at its start.

    This is what ``torch.cuda.max_memory_allocated`` measures on GPU, and on CUDA it is that. On CPU, torch's
    allocator reports every tensor allocation and free to the profiler (``profile_memory=True``); the peak is the
    largest running total of those reports. Unlike :class:`PeakMemory`'s resident set size it leaves out the C
    allocator's slack (freed memory it keeps mapped), Python objects and the buffers math libraries allocate
    themselves, so it compares the two models' tensors alone. The profiler slows the block down: measure it in a
    pass of its own, never in a timed one.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0
        self._cuda = PeakMemory(device) if device.type == "cuda" else None  # its CUDA figure is this one
        self._profiler: Any = None

    def __enter__(self) -> TensorPeak:
        if self._cuda is not None:
            self._cuda.__enter__()
            return self
        gc.collect()
        # kineto logs two "USDT" lines per profiler session below this level; read when it first starts.
        os.environ.setdefault("KINETO_LOG_LEVEL", "6")
        self._profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._profiler.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._cuda is not None:
            self._cuda.__exit__(*exc)
            self.peak = self._cuda.peak
            return
        self._profiler.__exit__(*exc)
        events = self._profiler.profiler.kineto_results.events()
        # nbytes > 0: an allocation, < 0: a free; frees of tensors allocated before the block are not reported.
        changes = sorted((event.start_ns(), event.nbytes()) for event in events if event.name() == "[memory]")
        live = 0
        for _, change in changes:
            live += change
            self.peak = max(self.peak, live)


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


def cache_bytes(cache: Any, tokens: Optional[int] = None) -> int:
    """Bytes of a transformers cache: keys and values of every layer (``numel * element_size``).

    With ``tokens``, each layer counts at most that many positions: a static cache allocates its slots up front, and
    this is the part of them the first ``tokens`` tokens fill (a dynamic cache holds exactly its tokens already).
    """
    total = 0
    for layer in cache.layers:
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                positions = tensor.shape[-2] if tensor.dim() >= 2 else 1
                held = positions if tokens is None else min(positions, tokens)
                total += tensor.numel() // max(positions, 1) * held * tensor.element_size()
    return total


# --------------------------------------------------------------------------------------------------------------
# Timed calls
# --------------------------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (a no-op on CPU), before reading a clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def alternating(keys: Sequence[str], repetition: int) -> list[str]:
    """The models ``keys`` in the order of one repetition: as given on even repetitions, reversed on odd ones, so
    that each model runs first as often as it runs last."""
    return list(keys) if repetition % 2 == 0 else list(keys)[::-1]


def random_ids(batch: int, length: int, vocab: int, device: torch.device, seed: int) -> torch.Tensor:
    """``[batch, length]`` token ids drawn uniformly from ``[0, vocab)`` by a generator seeded with ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=generator).to(device)


# The decode steps of the "compiled" kind: what generate() compiles for them on a static cache on CPU (its
# get_compiled_call; its default mode, reduce-overhead, adds CUDA graphs on a GPU), one whole graph (a graph break
# raises), static shapes. A grid compiles a graph per model and shape, and every model's graphs count against one
# limit (they compile the same nn.Module.__call__): the decode steps may recompile up to COMPILED_MAX_SHAPES times,
# beyond which torch raises FailOnRecompileLimitHit rather than decode uncompiled.
COMPILED_DECODING = CompileConfig(fullgraph=True, dynamic=False, mode="default")
COMPILED_MAX_SHAPES = 64


def cache_slots(cache: str, context: int, decode_tokens: int) -> Optional[int]:
    """The slots of the static cache a ``context``-token prompt and ``decode_tokens`` steps decode on, None for a
    dynamic cache."""
    check_cache_kind(cache)
    return None if cache == "dynamic" else context + decode_tokens


def empty_cache(model: nn.Module, cache: str, slots: Optional[int]) -> Optional[StaticCache]:
    """The cache a prefill starts from: ``None`` for ``"dynamic"`` (the model builds its own), or a ``StaticCache``
    of ``slots`` positions (its layers take their key shape from their first write, so a merged model's shared layers
    get rank-r key slots)."""
    check_cache_kind(cache)
    return None if cache == "dynamic" else StaticCache(config=model.config, max_cache_len=slots)


def decode_call(model: nn.Module, cache: str) -> Callable[..., Any]:
    """What a decode step calls: the model itself, or for ``"compiled"`` transformers' compiled call of it
    (:data:`COMPILED_DECODING`), compiled at its first call for each shape."""
    check_cache_kind(cache)
    return model.get_compiled_call(COMPILED_DECODING) if cache == "compiled" else model


def timed_decode(
    model: nn.Module, cache: Any, next_ids: torch.Tensor, steps: int, device: torch.device, kind: str = "dynamic"
) -> float:
    """Seconds of ``steps`` greedy single-token steps feeding ``cache``, starting from ``next_ids``; ``kind`` the
    cache's kind (``"compiled"``: the steps run compiled, :func:`decode_call`)."""
    forward = decode_call(model, kind)
    limits = torch._dynamo.config.patch(recompile_limit=COMPILED_MAX_SHAPES) if kind == "compiled" else nullcontext()
    with limits:
        synchronize(device)
        started = time.perf_counter()
        for _ in range(steps):
            out = forward(input_ids=next_ids, cache=cache, use_cache=True)
            next_ids = out.logits[:, -1].argmax(-1, keepdim=True)
            cache = out.cache
        synchronize(device)
    return time.perf_counter() - started


def prefill_then_decode(
    model: nn.Module,
    ids: torch.Tensor,
    decode_tokens: int,
    device: torch.device,
    cache: str = "dynamic",
    slots: Optional[int] = None,
) -> tuple[float, float, int]:
    """Time the prefill of ``ids`` and ``decode_tokens`` greedy steps after it; return (prefill s, decode s, cache
    bytes the prompt's tokens take after the prefill).

    ``cache="static"`` prefills into a ``StaticCache`` of ``T + decode_tokens`` slots and decodes in place; its layers
    allocate their slots on their first write, within the timed prefill, as under
    ``generate(cache_implementation="static")``. ``slots``: that many instead, from :func:`cache_slots` (a pass of
    fewer steps on the cache shape of the timed ones, which a compiled graph was compiled for).
    """
    context = ids.shape[-1]
    kv_cache = empty_cache(model, cache, slots or cache_slots(cache, context, decode_tokens))
    synchronize(device)
    started = time.perf_counter()
    out = model(input_ids=ids, cache=kv_cache, use_cache=True, logits_to_keep=1)
    synchronize(device)
    prefill = time.perf_counter() - started
    kv_cache = out.cache
    kv_bytes = cache_bytes(kv_cache, context)
    next_ids = out.logits[:, -1].argmax(-1, keepdim=True)
    del out
    decode = timed_decode(model, kv_cache, next_ids, decode_tokens, device, cache) if decode_tokens else 0.0
    return prefill, decode, kv_bytes


def synthetic_cache(
    model: nn.Module,
    batch: int,
    context: int,
    device: torch.device,
    seed: int = 0,
    static_slots: Optional[int] = None,
) -> Any:
    """A cache of ``context`` random tokens shaped exactly like the one a prefill of ``[batch, context]`` leaves.

    The model builds its own cache for one token (so every layer gets its own key shape: rank-r keys in shared
    layers), then every layer's keys and values are replaced by random tensors of the full length. The cost of a
    decode step does not depend on the cached values, so this measures decoding at sizes whose prefill does not fit.

    With ``static_slots``, a ``StaticCache`` of that many slots (what ``generate(cache_implementation="static")``
    and compiled decoding use): the first ``context`` slots get the same random keys and values (a sliding-window
    layer has ``min(window, static_slots)`` slots, all filled when ``context`` reaches them), the rest stay empty, and
    a decode step writes its token in place instead of growing every layer's tensors (the dynamic cache's
    ``torch.cat``, which copies the whole cache at every step and layer).
    """
    vocab = model.config.vocab_size
    first = random_ids(batch, 1, vocab, device, seed)
    if static_slots is not None and static_slots <= context:
        raise ValueError(f"static_slots={static_slots} leaves no slot to decode into after {context} tokens.")
    cache = None if static_slots is None else StaticCache(config=model.config, max_cache_len=static_slots)
    cache = model(input_ids=first, cache=cache, use_cache=True, logits_to_keep=1).cache
    generator = torch.Generator(device=device).manual_seed(seed)
    for layer in cache.layers:
        sliding = getattr(layer, "is_sliding", False)
        if static_slots is not None:
            length = min(context, layer.keys.shape[-2])  # a sliding-window layer has min(window, static_slots) slots
        else:  # a dynamic sliding-window layer keeps only its last ``sliding_window - 1`` tokens
            length = min(context, layer.sliding_window - 1) if sliding else context
        for name in ("keys", "values"):
            tensor = getattr(layer, name)
            shape = (*tensor.shape[:-2], length, tensor.shape[-1])
            filled = torch.randn(shape, dtype=tensor.dtype, device=device, generator=generator)
            if static_slots is None:
                setattr(layer, name, filled)
            else:
                tensor[:, :, :length].copy_(filled)  # in place: a static cache keeps its tensors
        if static_slots is None:
            if sliding:
                layer.cumulative_length = context  # the tokens it has seen
        else:
            layer.cumulative_length.fill_(length)  # where the next token goes while the slots are not full
            if sliding:
                layer.cumulative_length_int = context
    return cache


def synthetic_decode(
    model: nn.Module,
    batch: int,
    context: int,
    decode_tokens: int,
    device: torch.device,
    seed: int,
    cache: str = "dynamic",
    slots: Optional[int] = None,
) -> tuple[float, int]:
    """Time ``decode_tokens`` greedy steps on a :func:`synthetic_cache` (a static one: of ``slots``, by default
    :func:`cache_slots`); return (decode s, cache bytes of the ``context`` tokens)."""
    slots = slots or cache_slots(cache, context, decode_tokens)
    kv_cache = synthetic_cache(model, batch, context, device, seed, static_slots=slots)
    kv_bytes = cache_bytes(kv_cache, context)
    next_ids = random_ids(batch, 1, model.config.vocab_size, device, seed + 1)
    return timed_decode(model, kv_cache, next_ids, decode_tokens, device, cache), kv_bytes
