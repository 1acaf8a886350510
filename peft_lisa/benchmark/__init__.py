"""Side-by-side speed and memory benchmark of a base model and its merged LiSA model.

:func:`run_benchmark` takes the base model and the merged model (``merge_and_unload()``) of the same base and
measures both in one run, alternating between them within every repetition: prefill and decode tokens/s, KV-cache
bytes, peak memory, Q/K compression, the maximum decode throughput under a memory budget (the measure the LiSA paper
reports) and an analytic FLOPs / bytes breakdown. Results come as a :class:`BenchmarkResult` with ``to_markdown()``,
``to_json()`` and ``plot()``. :func:`benchmark_model` is ``peft-lisa bench`` as a library call: it loads the models
by name, runs the benchmark and writes the outputs.

Modules, each importing only those above it:

* :mod:`.results`: the records of a result (:class:`Run`, :class:`Skipped`, :class:`ModelInfo`,
  :class:`MaxThroughput`, ...) and their JSON form;
* :mod:`.measure`: the machine, peak memory, KV-cache bytes and the timed prefill / decode calls;
* :mod:`.cost_model`: :class:`ModelShape`, the working-memory estimate that skips runs, the analytic breakdown;
* :mod:`.report`: :class:`BenchmarkResult` with its markdown report and plot;
* :mod:`.run`: :func:`run_benchmark`, the grid of alternating runs and the maximum-throughput measure;
* :mod:`.pipeline`: :func:`benchmark_model` and :func:`default_share_layers`;
* :mod:`.layer_clock`: each decoder layer's time off forward hooks, and a prefill's or a decode step's time layer
  by layer, by chain depth (:func:`prefill_layer_times`, :func:`decode_layer_times`);
* :mod:`.controls`: control subjects, such as the base with every layer on the kernel's decode rows
  (:func:`base_on_decode_rows`), that separate LiSA's share of a speedup from the implementation's;
* :mod:`.geometry`: per-layer decode cost of 7B-class geometries on depth-truncated random-weight models.
"""

from .controls import base_on_decode_rows
from .cost_model import ModelShape, analytic_breakdown, ceilings, estimate_working_bytes
from .layer_clock import LayerTimes, decode_layer_times, prefill_layer_times
from .measure import PeakMemory, TensorPeak, cache_bytes, default_memory_limit, machine_info, synthetic_cache
from .pipeline import BenchmarkOutputs, benchmark_model, default_share_layers, load_benchmark_models, untrained_merged
from .report import BenchmarkResult, analytic_markdown, machine_label, result_summary
from .results import BenchmarkData, MaxThroughput, ModelInfo, Run, Skipped, ThroughputPoint
from .run import run_benchmark

__all__ = [
    "BenchmarkData",
    "BenchmarkOutputs",
    "BenchmarkResult",
    "LayerTimes",
    "MaxThroughput",
    "ModelInfo",
    "ModelShape",
    "PeakMemory",
    "TensorPeak",
    "Run",
    "Skipped",
    "ThroughputPoint",
    "analytic_breakdown",
    "analytic_markdown",
    "base_on_decode_rows",
    "benchmark_model",
    "cache_bytes",
    "ceilings",
    "decode_layer_times",
    "default_memory_limit",
    "default_share_layers",
    "estimate_working_bytes",
    "load_benchmark_models",
    "machine_info",
    "machine_label",
    "prefill_layer_times",
    "result_summary",
    "run_benchmark",
    "synthetic_cache",
    "untrained_merged",
]
