"""From names to written results: :func:`benchmark_model` loads the models, runs the benchmark and writes its outputs.

This is ``peft-lisa bench`` as a library call. It loads the base model (a local directory, a hub id or the built-in
SmolLM2-135M-Instruct), takes a saved merged LiSA model of the same base or makes one from an untrained adapter
(speed does not depend on the weights), calls :func:`~.run.run_benchmark` and writes ``results.json``,
``results.md`` and ``benchmark.png``. :func:`default_share_layers` is its choice of shared layers when neither
``share_layers`` nor an analysis is given.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
from peft import get_peft_model
from torch import nn
from transformers import AutoModelForCausalLM

from ..analysis import AttentionAnalysis, choose_share_layers
from ..resources import DEFAULT_MODEL, resolve_model_path
from ..tuner.config import LiSAConfig, validate_share_layers
from .controls import base_on_decode_rows, decode_rows_in_use
from .report import BenchmarkResult
from .results import PathLike
from .run import run_benchmark

logger = logging.getLogger("peft_lisa")


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


@dataclass
class BenchmarkOutputs:
    """What :func:`benchmark_model` measured and wrote."""

    result: BenchmarkResult
    markdown: str  # result.to_markdown()
    files: list[Path]  # results.json, results.md and, with matplotlib installed, benchmark.png


def benchmark_model(
    model: Optional[str] = None,
    *,
    merged: Optional[PathLike] = None,
    share_layers: Optional[Sequence[int]] = None,
    share_fraction: Optional[float] = None,
    analysis: Optional[AttentionAnalysis] = None,
    rank: int = 8,
    align_hidden: Optional[int] = 0,
    head_mixing: str = "full",
    dtype: Optional[torch.dtype] = None,
    device: Union[str, torch.device, None] = None,
    output_dir: PathLike = "lisa-bench",
    command: Optional[str] = None,
    max_chain: Optional[int] = None,
    layer_score: Optional[str] = None,
    base_on_rows: bool = False,
    **options: Any,
) -> BenchmarkOutputs:
    """Benchmark a base model against a merged LiSA model of it and write the results to ``output_dir``.

    Args:
        model: the base model, a local directory or a hub id; None: the built-in SmolLM2-135M-Instruct.
        merged: a saved merged LiSA model directory of the same base (``peft-lisa merge``). Without it, an untrained
            adapter with ``share_layers``, ``rank`` and ``align_hidden`` is merged into a copy of the base.
        share_layers: the layers to share (without ``merged``).
        share_fraction: without ``share_layers``, share this fraction of the layers (default 0.5): the best ones of
            ``analysis`` when given, else :func:`default_share_layers`.
        analysis: an :class:`~peft_lisa.AttentionAnalysis` of the base model to choose the shared layers from.
        max_chain, layer_score: with ``analysis``, the longest run of adjacent shared layers it may choose and the
            score it ranks the layers by (:func:`~peft_lisa.choose_share_layers`).
        rank, align_hidden, head_mixing: the LiSA rank, alignment FFN width (0: linear alignment) and head mixing
            (``LiSAConfig.head_mixing``) of the untrained adapter.
        dtype: the models' dtype; default bfloat16 on CUDA, float32 elsewhere.
        device: where to run; default CUDA when available, else CPU.
        output_dir: where ``results.json``, ``results.md`` and ``benchmark.png`` go (created if missing).
        command: the command line to record in the results' settings (and the markdown report).
        base_on_rows: time the control instead of the base as loaded: the base with every layer on the CPU kernel's
            decode rows, as the merged model's layers decode (:func:`~.controls.base_on_decode_rows`), so that the
            decode ratios are LiSA's share alone. CPU only, with the kernel built.
        **options: passed to :func:`~.run.run_benchmark` (``batch_sizes``, ``contexts``, ``decode_tokens``,
            ``repeats``, ``warmup``, ``memory_budget_bytes``, ``budget_context``, ``max_throughput``,
            ``memory_limit_bytes``, ``max_prefill_tokens``, ``cache``, ``seed``, ``progress``).

    Raises:
        OSError: a model could not be loaded.
        ValueError: ``merged`` is not a merged model of ``model``, the shared layers are out of range or cannot
            be chosen from ``analysis``, or ``base_on_rows`` where the decode rows do not run.
    """
    base, merged_model, path = load_benchmark_models(
        model, merged, share_layers, share_fraction, analysis, rank, align_hidden, head_mixing, dtype, device,
        max_chain=max_chain, layer_score=layer_score, base_on_rows=base_on_rows,
    )  # fmt: skip
    device = next(base.parameters()).device
    result = run_benchmark(base, merged_model, device=device, **options)
    if command is not None:
        result.settings["command"] = command
    result.settings["model_path"] = str(path)
    if merged is not None:
        result.settings["merged_model_path"] = str(merged)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    result.to_json(out / "results.json")
    markdown = result.to_markdown()
    (out / "results.md").write_text(markdown, encoding="utf-8")
    files = [out / "results.json", out / "results.md"]
    try:
        files.append(result.plot(out / "benchmark.png"))
    except ImportError as error:
        logger.warning(f"no plot: {error} (pip install matplotlib)")
    return BenchmarkOutputs(result=result, markdown=markdown, files=files)


def untrained_merged(
    base: nn.Module,
    share_layers: Optional[Sequence[int]],
    share_fraction: Optional[float],
    analysis: Optional[AttentionAnalysis],
    rank: int,
    align_hidden: Optional[int],
    head_mixing: str = "full",
    max_chain: Optional[int] = None,
    layer_score: Optional[str] = None,
    in_place: bool = False,
) -> nn.Module:
    """A copy of ``base`` with an untrained LiSA adapter merged in (speed does not depend on the weights); with
    ``in_place``, ``base`` itself becomes the merged model. :func:`load_benchmark_models` passes a second load of the
    base in place: a deep copy's weights lie elsewhere in memory, and on the Intel Xeon of ``docs/benchmark`` the
    merged model made from one prefilled 1 x 128 tokens 3% slower than the same merged model made from a second
    load (``docs/benchmark/control``)."""
    num_layers = base.config.num_hidden_layers
    fraction = 0.5 if share_fraction is None else share_fraction
    if (max_chain is not None or layer_score is not None) and (analysis is None or share_layers is not None):
        raise ValueError(
            "max_chain and layer_score apply to the layers chosen from an analysis: give the analysis, not "
            "share_layers"
        )
    if share_layers is not None:
        layers, how = list(share_layers), "given"
    elif analysis is not None:
        try:
            score = {} if layer_score is None else {"score": layer_score}
            layers = choose_share_layers(analysis, fraction=fraction, max_chain=max_chain, **score)
        except ValueError as error:
            raise ValueError(f"share_fraction {share_fraction}: {error}") from None
        how = (
            "chosen from the analysis"
            + ("" if layer_score is None else f" by {layer_score}")
            + ("" if max_chain is None else f", chains of at most {max_chain}")
        )
    else:
        layers = default_share_layers(num_layers, fraction)
        how = "spread over the deeper layers (peft_lisa.benchmark.default_share_layers)"
    layers = validate_share_layers(layers, num_layers)
    logger.info(f"untrained LiSA model (speed does not depend on the weights), shared layers {layers} ({how})")
    config = LiSAConfig(share_layers=layers, rank=rank, align_hidden=align_hidden, head_mixing=head_mixing)
    return get_peft_model(base if in_place else copy.deepcopy(base), config).merge_and_unload()


def load_benchmark_models(
    model: Optional[str] = None,
    merged: Optional[PathLike] = None,
    share_layers: Optional[Sequence[int]] = None,
    share_fraction: Optional[float] = None,
    analysis: Optional[AttentionAnalysis] = None,
    rank: int = 8,
    align_hidden: Optional[int] = 0,
    head_mixing: str = "full",
    dtype: Optional[torch.dtype] = None,
    device: Union[str, torch.device, None] = None,
    max_chain: Optional[int] = None,
    layer_score: Optional[str] = None,
    base_on_rows: bool = False,
) -> tuple[nn.Module, nn.Module, Path]:
    """The base model and the merged LiSA model of it that :func:`benchmark_model` compares (same arguments), in
    eval mode on ``device``, with the base model's resolved path."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if base_on_rows and not decode_rows_in_use(device):
        raise ValueError(
            f"base_on_rows: the control decodes through the CPU kernel's decode rows, which {device} does not run "
            "(they need the CPU, --device cpu, and the kernel built: PEFT_LISA_CPU_KERNEL not 'off', a C++ "
            "compiler); benchmark the base as loaded instead (leave out --base-on-rows)"
        )
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if base_on_rows and dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(
            f"base_on_rows: the CPU kernel's decode rows take float32 or bfloat16 values, not {dtype}; choose "
            "--dtype float32 or bfloat16"
        )
    label = model or f"{DEFAULT_MODEL} (built-in)"
    path = resolve_model_path(model)
    logger.info(f"loading {label}")
    try:
        base = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    except OSError as error:
        raise OSError(f"could not load the model {label}: {error}") from error
    if base_on_rows:
        base_on_decode_rows(base)
        logger.info("the base decodes through the CPU kernel's decode rows (the control: --base-on-rows)")
    if merged is not None:
        logger.info(f"loading the merged model {merged}")
        merged_model = AutoModelForCausalLM.from_pretrained(merged, dtype=dtype).to(device).eval()
        same = (merged_model.config.num_hidden_layers, merged_model.config.hidden_size) == (
            base.config.num_hidden_layers,
            base.config.hidden_size,
        )
        if not same:
            raise ValueError(
                f"{merged} is not a merged model of {label} (their layers or hidden sizes differ): pass the base "
                "model it was merged from as model (--model on the command line)"
            )
    else:  # merged into a second load of the base, placed in memory as the base is (untrained_merged)
        second = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        merged_model = untrained_merged(
            second,
            share_layers,
            share_fraction,
            analysis,
            rank,
            align_hidden,
            head_mixing,
            max_chain,
            layer_score,
            in_place=True,
        )
        merged_model = merged_model.to(device=device, dtype=dtype).eval()
    return base, merged_model, path
