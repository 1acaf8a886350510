"""Per-layer decode cost of large geometries, measured on depth-truncated random-weight models.

Speed does not depend on trained weights, so a model with the layer geometry of LLaMA-2-7B, Llama-3-8B or Mistral-7B,
truncated to a few layers and given random weights, is an honest subject on a machine that cannot hold or prefill the
real one. :func:`layer_decode_times` builds the truncated base model and its merged LiSA model (every other layer
shared), times decode steps on a synthetic KV cache of the right size with the models alternating, and reads the
time of every decoder layer off forward hooks. Where the kernel's decode rows run (CPU, the kernel built) a third
model, the base with every layer on those rows (:func:`~peft_lisa.benchmark.controls.base_on_decode_rows`),
separates what sharing buys from what the rows buy.
:func:`full_depth_estimate` turns those per-layer times into the decode step and the throughput under a memory
budget that the full-depth models imply.
"""

from __future__ import annotations

import gc
import logging
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Union

import torch
from peft import get_peft_model
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from ..tuner.architectures import decoder_layers
from ..tuner.config import LiSAConfig
from .controls import base_on_decode_rows, decode_rows_in_use
from .cost_model import ModelShape
from .layer_clock import LayerClock
from .measure import (
    alternating,
    cache_slots,
    random_ids,
    synthetic_cache,
    timed_decode,
)
from .results import HOOKED_CACHE_KINDS, check_cache_kind

logger = logging.getLogger("peft_lisa")

# Layer geometries of public checkpoints (their config.json), full depth in "num_hidden_layers".
GEOMETRIES: dict[str, dict[str, Any]] = {
    "llama-2-7b": dict(
        model_type="llama", hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32000, num_hidden_layers=32, rope_theta=10000.0,
    ),
    "llama-3-8b": dict(
        model_type="llama", hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, num_hidden_layers=32, rope_theta=500000.0,
    ),
    "mistral-7b": dict(
        model_type="mistral", hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=32000, num_hidden_layers=32, rope_theta=10000.0, sliding_window=None,
    ),
}  # fmt: skip
LAYER_KINDS = ("full", "source", "shared", "rows")  # "rows": a full layer of the base on the decode rows


@dataclass
class LayerTimes:
    """Decode-step times of one geometry at one (batch, context), per layer kind, medians over the timed steps."""

    geometry: str
    batch: int
    context: int
    dtype: str
    cache: str = "dynamic"  # the KV cache decoded on: "dynamic" (transformers' default) or "static"
    seconds: dict[str, float] = field(default_factory=dict)  # layer kind -> seconds per decode step
    # model -> embeddings, norm, LM head: "base" and "merged", and "base rows" where the control ran
    outside_layers: dict[str, float] = field(default_factory=dict)
    cache_bytes_per_token: dict[str, int] = field(default_factory=dict)  # layer kind -> bytes
    weight_bytes: dict[str, int] = field(default_factory=dict)  # layer kind -> bytes of one layer
    outside_weight_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def truncated_model(geometry: str, num_layers: int, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """A random-weight causal LM with the layer geometry of ``geometry`` and ``num_layers`` layers (sdpa)."""
    if geometry not in GEOMETRIES:
        raise ValueError(f"unknown geometry {geometry!r}: choose one of {sorted(GEOMETRIES)}")
    spec = dict(GEOMETRIES[geometry], num_hidden_layers=num_layers)
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def geometry_models(
    geometry: str,
    num_layers: int,
    dtype: torch.dtype,
    rank: int = 8,
    head_mixing: str = "full",
    share_layers: Optional[list[int]] = None,
) -> tuple[nn.Module, nn.Module]:
    """The truncated base model of ``geometry`` (:func:`truncated_model`) and a merged model with an untrained
    adapter that shares ``share_layers``, made from a second one built the same way (not a deep copy, whose weights
    lie elsewhere in memory: ``pipeline.untrained_merged``); by default every odd layer, so that every shared layer
    has a source layer before it (chains of one link). Consecutive shared layers (e.g. ``[1, 2, 3]``) form a chain,
    whose later links cost more in a prefill ("The cost of a chain" in ``docs/method.md``)."""
    base = truncated_model(geometry, num_layers, dtype)
    layers = list(range(1, num_layers, 2)) if share_layers is None else list(share_layers)
    config = LiSAConfig(share_layers=layers, rank=rank, head_mixing=head_mixing)
    second = truncated_model(geometry, num_layers, dtype)  # the same weights (seeded), allocated as the base's are
    merged = get_peft_model(second, config).merge_and_unload().to(dtype).eval()
    return base, merged


def layer_decode_times(
    geometry: str,
    *,
    batch: int = 8,
    context: int = 4096,
    num_layers: int = 4,
    decode_tokens: int = 4,
    repeats: int = 3,
    rank: int = 8,
    head_mixing: str = "full",
    dtype: torch.dtype = torch.bfloat16,
    device: Union[str, torch.device] = "cpu",
    cache: str = "dynamic",
    rows_control: Optional[bool] = None,
) -> LayerTimes:
    """Per-layer decode-step time of a full, a source and a shared layer of ``geometry`` at ``batch`` x ``context``.

    The base model has ``num_layers`` full layers; the merged model shares every odd layer (so every shared layer
    has a source layer before it). The models decode ``decode_tokens`` steps on a synthetic cache of ``context``
    tokens, alternating (order reversed every other repetition), ``repeats`` times; a layer kind's time is the median
    per step, averaged over its layers. The models are built on CPU and then moved to ``device``.
    ``cache="static"`` decodes on a static cache of ``context + decode_tokens`` slots
    (:func:`~peft_lisa.benchmark.measure.synthetic_cache`), where a step writes its token in place; the default
    dynamic cache copies every layer's keys and values at every step (``torch.cat``).

    ``rows_control`` adds a third model, ``"base rows"``: the base with every layer on the kernel's decode rows
    (:func:`~peft_lisa.benchmark.controls.base_on_decode_rows`), as the merged model's layers are; its full layer's
    time is the kind ``"rows"``. By default it runs where the rows do (CPU, the kernel built); asked for elsewhere it
    raises ``ValueError``, since it would time the base twice.
    """
    check_cache_kind(cache, HOOKED_CACHE_KINDS)
    slots = cache_slots(cache, context, decode_tokens)
    device = torch.device(device)
    if rows_control is None:
        rows_control = decode_rows_in_use(device)
    elif rows_control and not decode_rows_in_use(device):
        raise ValueError(
            f"rows_control=True: the base on rows decodes through the CPU kernel's decode rows, which {device} does "
            "not run (they need the CPU and the kernel built: PEFT_LISA_CPU_KERNEL not 'off', a C++ compiler); the "
            "control would time the base twice. Leave rows_control unset (--no-rows-control)."
        )
    base, merged = geometry_models(geometry, num_layers, dtype, rank, head_mixing)
    models = {"base": base, "merged": merged}
    if rows_control:
        models["base rows"] = base_on_decode_rows(truncated_model(geometry, num_layers, dtype))
    models = {key: model.to(device) for key, model in models.items()}
    base, merged = models["base"], models["merged"]
    clocks = {key: LayerClock(model, device) for key, model in models.items()}
    per_kind: dict[str, list[float]] = {kind: [] for kind in LAYER_KINDS}
    outside: dict[str, list[float]] = {key: [] for key in models}
    with torch.inference_mode():
        for repetition in range(repeats + 1):  # the first is a warm-up
            for key in alternating(models, repetition):
                model, clock = models[key], clocks[key]
                kv_cache = synthetic_cache(model, batch, context, device, seed=repetition, static_slots=slots)
                next_ids = random_ids(batch, 1, model.config.vocab_size, device, repetition)
                clock.reset()
                total = timed_decode(model, kv_cache, next_ids, decode_tokens, device) / decode_tokens
                del kv_cache
                gc.collect()
                if repetition == 0:
                    continue
                steps = [spent / decode_tokens for spent in clock.spent]
                outside[key].append(total - sum(steps))
                for kind in set(clock.kinds):
                    if key == "merged" and kind == "full":
                        continue
                    per_kind["rows" if key == "base rows" else kind].append(
                        statistics.fmean(s for s, k in zip(steps, clock.kinds, strict=True) if k == kind)
                    )
        logger.info(f"{geometry} B={batch} T={context}: per-layer decode times measured")
    shape = ModelShape.of(merged)
    layers = decoder_layers(merged)
    result = LayerTimes(geometry, batch, context, str(dtype).replace("torch.", ""), cache)
    result.seconds = {kind: statistics.median(values) for kind, values in per_kind.items() if values}
    result.outside_layers = {key: statistics.median(values) for key, values in outside.items()}
    result.cache_bytes_per_token = {
        "full": shape.full_layer_cache_bytes,
        "source": shape.full_layer_cache_bytes,
        "shared": shape.shared_layer_cache_bytes,
    }
    base_layers = decoder_layers(base)
    result.weight_bytes = {
        "full": _bytes(base_layers[0]),
        "source": _bytes(layers[0]),
        "shared": _bytes(layers[1]),
    }
    if rows_control:  # the base's full layer, on the rows
        result.cache_bytes_per_token["rows"] = result.cache_bytes_per_token["full"]
        result.weight_bytes["rows"] = result.weight_bytes["full"]
    result.outside_weight_bytes = _bytes(base) - sum(_bytes(layer) for layer in base_layers)
    for clock in clocks.values():
        clock.remove()
    return result


def _bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def full_depth_estimate(
    times: LayerTimes, share_fraction: float = 0.5, budget_bytes: Optional[int] = None
) -> dict[str, Any]:
    """What the per-layer times imply at the geometry's full depth, ``share_fraction`` of its layers shared (each
    shared layer after a source layer, as measured).

    Decode step = outside-layer time + the layers' times. Throughput under a memory budget: the largest batch whose
    weights + KV cache (``context`` tokens) fit ``budget_bytes`` (default: what the base needs at ``times.batch``),
    with the step time scaled from the measured batch by the share of the bytes a step reads that grow with the
    batch (the KV cache): ``step(b) = step * (weights + b * cache) / (weights + B * cache)``.
    """
    depth = GEOMETRIES[times.geometry]["num_hidden_layers"]
    shared = int(round(depth * share_fraction))
    counts = {
        "base": {"full": depth},
        "merged": {"full": depth - 2 * shared if shared * 2 <= depth else 0, "source": min(shared, depth - shared),
                   "shared": shared},
    }  # fmt: skip
    if sum(counts["merged"].values()) != depth:  # more than half shared: chains (a shared layer's source is shared)
        counts["merged"] = {"source": depth - shared, "shared": shared}
    if "rows" in times.seconds:  # the control: the base with every layer on the decode rows
        counts["base rows"] = {"rows": depth}
    out: dict[str, Any] = {"depth": depth, "shared_layers": shared, "models": {}}
    for key, count in counts.items():
        step = times.outside_layers[key] + sum(n * times.seconds[kind] for kind, n in count.items())
        weights = times.outside_weight_bytes + sum(n * times.weight_bytes[kind] for kind, n in count.items())
        cache_per_sequence = times.context * sum(n * times.cache_bytes_per_token[kind] for kind, n in count.items())
        out["models"][key] = {
            "layers": count,
            "decode_step_seconds": step,
            "decode_tokens_per_s": times.batch / step,
            "weight_bytes": weights,
            "kv_cache_bytes_per_sequence": cache_per_sequence,
        }
    base, merged = out["models"]["base"], out["models"]["merged"]
    out["decode_speedup"] = base["decode_step_seconds"] / merged["decode_step_seconds"]
    read = {
        key: m["weight_bytes"] + times.batch * m["kv_cache_bytes_per_sequence"] for key, m in out["models"].items()
    }
    out["decode_ceiling"] = read["base"] / read["merged"]
    budget = budget_bytes or base["weight_bytes"] + times.batch * base["kv_cache_bytes_per_sequence"]
    out["budget_bytes"] = budget
    for key, m in out["models"].items():
        batch = int((budget - m["weight_bytes"]) // m["kv_cache_bytes_per_sequence"])
        step = m["decode_step_seconds"] * (m["weight_bytes"] + batch * m["kv_cache_bytes_per_sequence"]) / read[key]
        m["budget_max_batch"] = batch
        m["budget_tokens_per_s"] = batch / step if batch > 0 else 0.0
    out["budget_throughput_ratio"] = merged["budget_tokens_per_s"] / base["budget_tokens_per_s"]
    if "base rows" in out["models"]:  # what sharing alone buys: the merged model over the base on the same rows
        rows = out["models"]["base rows"]
        out["decode_speedup_over_rows"] = rows["decode_step_seconds"] / merged["decode_step_seconds"]
        out["budget_throughput_ratio_over_rows"] = merged["budget_tokens_per_s"] / rows["budget_tokens_per_s"]
    return out


def geometry_markdown(rows: list[tuple[LayerTimes, dict[str, Any]]]) -> str:
    """A markdown table of per-layer times and their full-depth implications."""
    lines = [
        "| geometry | batch x context, cache | full layer ms | source ms | shared ms | shared / full "
        "| cache B/token full | shared | full-depth decode speedup | ceiling (bytes) | max batch base -> LiSA "
        "| budgeted throughput |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    controls = []
    for times, est in rows:
        s = times.seconds
        b, m = est["models"]["base"], est["models"]["merged"]
        lines.append(
            f"| {times.geometry} | {times.batch} x {times.context}, {times.cache} cache | {s['full'] * 1e3:.1f} "
            f"| {s['source'] * 1e3:.1f} "
            f"| {s['shared'] * 1e3:.1f} | {s['shared'] / s['full']:.2f} | {times.cache_bytes_per_token['full']:,} "
            f"| {times.cache_bytes_per_token['shared']:,} | {est['decode_speedup']:.2f}x "
            f"| {est['decode_ceiling']:.2f}x "
            f"| {b['budget_max_batch']} -> {m['budget_max_batch']} | {est['budget_throughput_ratio']:.2f}x |"
        )
        if "rows" in s:
            controls.append(
                f"| {times.geometry} | {times.batch} x {times.context}, {times.cache} cache | {s['full'] * 1e3:.1f} "
                f"| {s['rows'] * 1e3:.1f} | {s['full'] / s['rows']:.2f}x "
                f"| {est['decode_speedup_over_rows']:.2f}x | {est['decode_ceiling']:.2f}x "
                f"| {est['budget_throughput_ratio_over_rows']:.2f}x |"
            )
    if controls:
        lines += [
            "",
            "Control, the base with every layer on the decode rows (`base rows`), as the merged model's layers are:",
            "",
            "| geometry | batch x context, cache | full layer ms | full layer on rows ms | full layer / on rows "
            "| full-depth decode over base rows | ceiling (bytes) | budgeted throughput over base rows |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
            *controls,
        ]
    return "\n".join(lines) + "\n"
