"""The benchmark's human-readable output: the markdown report, the plot and a plain-text summary.

:class:`BenchmarkResult` (what :func:`~.run.run_benchmark` returns) is the measured data of
:class:`~.results.BenchmarkData` with ``to_markdown()`` and ``plot()``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from .results import CACHE_LABELS, MODEL_KEYS, BenchmarkData, PathLike, Run, paired_speedups


@dataclass
class BenchmarkResult(BenchmarkData):
    """Everything one benchmark run measured, with the machine and settings it ran on.

    ``to_dict()`` / ``to_json()`` give the data (:class:`~.results.BenchmarkData`), ``to_markdown()`` the report
    and ``plot()`` a 2 x 2 figure of throughput, KV cache per token and maximum throughput.
    """

    def to_markdown(self) -> str:
        """The full report: throughput and memory per configuration, KV cache, Q/K, max throughput, analytic cost."""
        return render_markdown(self)

    def plot(self, path: PathLike) -> Path:
        """Save the figure to ``path`` (needs matplotlib); returns the path."""
        return render_plot(self, Path(path))


def machine_label(machine: dict[str, Any]) -> str:
    """One line naming the machine, for tables and plots."""
    device = machine.get("gpu") or f"CPU {machine.get('cpu')}"
    kernel = f", LiSA CPU kernel {machine['lisa_cpu_kernel']}" if "lisa_cpu_kernel" in machine else ""
    return (
        f"{device} ({machine.get('device')}), {machine.get('cpu_count')} CPUs, "
        f"{machine.get('torch_threads')} torch threads, torch {machine.get('torch')}, "
        f"transformers {machine.get('transformers')}{kernel}"
    )


def fmt_bytes(value: Optional[float]) -> str:
    """``1536`` -> ``"1.5 KiB"`` (whole bytes below 1 KiB); ``None`` -> ``"-"``."""
    if value is None:
        return "-"
    value = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"  # pragma: no cover


def fmt_rate(value: Optional[float]) -> str:
    """A tokens/s rate: no decimals from 100 on (with thousands separators), one below; ``None`` -> ``"-"``."""
    if value is None:
        return "-"
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def _fmt_ratio(num: Optional[float], den: Optional[float]) -> str:
    if num is None or den is None or den == 0:
        return "-"
    return f"{num / den:.2f}x"


def _fmt_bound(run: Optional[Run], phase: str) -> str:
    """The ceiling of ``phase``; for the prefill, with the bound without chains in brackets where it differs."""
    bound = run.ceilings.get(phase) if run is not None else None
    if not bound:
        return "-"
    no_chain = run.ceilings.get(f"{phase}_no_chain")
    return f"{bound:.2f}x ({no_chain:.2f}x)" if no_chain and f"{no_chain:.2f}" != f"{bound:.2f}" else f"{bound:.2f}x"


def _fmt_seconds(value: Optional[float]) -> str:
    return f"{value:.2f}" if value is not None else "-"


def _fmt_flops(value: float) -> str:
    return f"{value / 1e6:,.2f} M"


def _fmt_paired(base: Optional[Run], merged: Optional[Run], attr: str) -> str:
    """``median (lowest-highest)`` of the per-repetition speedups of ``attr`` (``prefill_seconds`` or
    ``decode_seconds``), ``-`` without a pair; a decode that ran on a synthetic cache is marked, as in the main
    table."""
    paired = None if base is None or merged is None else paired_speedups(getattr(base, attr), getattr(merged, attr))
    if paired is None:
        return "-"
    synthetic = attr == "decode_seconds" and "synthetic" in (base.decode_cache, merged.decode_cache)
    return f"{paired[0]:.2f}x ({paired[1]:.2f}-{paired[2]:.2f}x)" + (" (synthetic cache)" if synthetic else "")


def _paired_markdown(result: BenchmarkData, configs: list[tuple[int, int]]) -> list[str]:
    """The section of speedups repetition by repetition (:func:`~.results.paired_speedups`)."""
    lines = [
        "",
        "### Speedup repetition by repetition",
        "",
        "Base time / merged time within each repetition (the two models alternate within it): median (lowest-highest) "
        "over the repetitions. The table above gives the ratio of the median times; the range shows the spread of "
        "one point between repetitions on this machine.",
        "",
        "| batch | context | prefill speedup | decode speedup |",
        "|---:|---:|---:|---:|",
    ]
    for context, batch in configs:
        base, merged = result.run("base", batch, context), result.run("merged", batch, context)
        lines.append(
            f"| {batch} | {context} | {_fmt_paired(base, merged, 'prefill_seconds')} "
            f"| {_fmt_paired(base, merged, 'decode_seconds')} |"
        )
    return lines


def render_markdown(result: BenchmarkData) -> str:
    """The markdown report of ``result`` (:meth:`BenchmarkResult.to_markdown`)."""
    settings, base_info, merged_info = result.settings, result.models["base"], result.models["merged"]
    base = result.label("base")  # "base on rows" for the control
    lines = [
        f"# LiSA benchmark: {base} vs merged",
        "",
        f"**Machine:** {machine_label(result.machine)}  ",
        *([f"**Command:** `{settings['command']}`  "] if settings.get("command") else []),
        f"**Models:** base {base_info.name} ({base_info.num_parameters:,} params, {base_info.dtype}, attention "
        f"{base_info.attn_implementation}) vs merged LiSA ({merged_info.num_parameters:,} params; "
        f"{len(merged_info.share_layers)} shared layers {merged_info.share_layers}, rank {merged_info.rank}, "
        f"align hidden {merged_info.align_hidden}; source layers {merged_info.source_layers})  ",
        f"**Settings:** {settings['repeats']} repetition(s) (median), {settings['warmup']} warm-up, models "
        f"alternating; {settings['decode_tokens']} decode steps on a "
        f"{CACHE_LABELS[settings.get('cache', 'dynamic')]}; "
        f"peak memory via {settings['peak_memory_method']}; "
        f"working-memory limit {fmt_bytes(settings['memory_limit_bytes'])}",
        "",
        "## Throughput and memory",
        "",
        f"| batch | context | prefill tok/s {base} | prefill tok/s merged | speedup | ceiling | decode tok/s {base} "
        f"| decode tok/s merged | speedup | ceiling | KV cache {base} | KV cache merged | peak mem {base} "
        f"| peak mem merged | peak tensors {base} | peak tensors merged | kernel s {base} | kernel s merged |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    configs = sorted({(r.context, r.batch) for r in result.runs})
    for context, batch in configs:
        base, merged = result.run("base", batch, context), result.run("merged", batch, context)

        def get(run: Optional[Run], attr: str) -> Optional[float]:
            return getattr(run, attr) if run is not None else None

        def decode_cell(run: Optional[Run]) -> str:
            text = fmt_rate(get(run, "decode_tokens_per_s"))
            return text + " (synthetic cache)" if run is not None and run.decode_cache == "synthetic" else text

        lines.append(
            f"| {batch} | {context} | {fmt_rate(get(base, 'prefill_tokens_per_s'))} "
            f"| {fmt_rate(get(merged, 'prefill_tokens_per_s'))} "
            f"| {_fmt_ratio(get(merged, 'prefill_tokens_per_s'), get(base, 'prefill_tokens_per_s'))} "
            f"| {_fmt_bound(merged, 'prefill')} | {decode_cell(base)} | {decode_cell(merged)} "
            f"| {_fmt_ratio(get(merged, 'decode_tokens_per_s'), get(base, 'decode_tokens_per_s'))} "
            f"| {_fmt_bound(merged, 'decode')} "
            f"| {fmt_bytes(get(base, 'kv_cache_bytes'))} | {fmt_bytes(get(merged, 'kv_cache_bytes'))} "
            f"| {fmt_bytes(get(base, 'peak_memory_bytes'))} | {fmt_bytes(get(merged, 'peak_memory_bytes'))} "
            f"| {fmt_bytes(get(base, 'peak_tensor_bytes'))} | {fmt_bytes(get(merged, 'peak_tensor_bytes'))} "
            f"| {_fmt_seconds(get(base, 'kernel_seconds_median'))} "
            f"| {_fmt_seconds(get(merged, 'kernel_seconds_median'))} |"
        )
    steps = settings.get("tensor_peak_decode_steps", settings["decode_tokens"])
    lines += [
        "",
        "Peak memory = the model's weights + the peak working memory of the run (prefill + decode). Peak tensors = "
        "the peak bytes of tensors alive at once above the level before the run (weights not included), counted by "
        f"torch's allocator in one more, untimed run (prefill + {steps} decode steps): on CPU the peak memory also "
        "holds the C allocator's slack, which depends on the order of allocations. Kernel s = the process's system "
        "CPU time during the run (page faults, memory mapping), median. Ceiling = the arithmetic bound of the "
        "speedup (see the notes); in brackets, the prefill's bound if no shared layer followed another (chains "
        "recompute their earlier links' terms).",
    ]
    lines += _paired_markdown(result, configs)
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
            f"| {result.label(key)} | {measured:,.0f} | {info.kv_cache_bytes_per_token_analytic:,} |"
            if measured is not None
            else f"| {result.label(key)} | - | {info.kv_cache_bytes_per_token_analytic:,} |"
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
            f"Budget {fmt_bytes(mt.budget_bytes)} ({mt.budget_source}) for weights + KV cache at context "
            f"{mt.context} + {mt.decode_tokens} decoded tokens; activations are not counted.",
            "",
            "| model | max batch | weights | KV cache | decode tok/s (throughput) | how |",
            "|---|---:|---:|---:|---:|---|",
        ]
        for key, point in mt.points.items():
            lines.append(
                f"| {result.label(key)} | {point.max_batch} | {fmt_bytes(point.weight_bytes)} "
                f"| {fmt_bytes(point.kv_cache_bytes)} | {fmt_rate(point.decode_tokens_per_s)} | {point.method} |"
            )
        if mt.ratio:
            bound = f" (ceiling {mt.ceiling:.3f}x: max batch / bytes read per decode step)" if mt.ceiling else ""
            lines += ["", f"Max-throughput ratio merged / base: **{mt.ratio:.3f}x**{bound}."]
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
            f"| {fmt_bytes(row['base_kv_bytes_read_per_decode_token'])} "
            f"| {fmt_bytes(row['merged_kv_bytes_read_per_decode_token'])} "
            f"| {row['kv_read_ratio_base_over_merged']:.3f}x "
            f"| {fmt_bytes(row['merged_materialised_fp32_bytes_per_decode_token'])} |"
        )
    lines += [""] + [f"- {note}" for note in analytic["notes"]]
    return "\n".join(lines)


def render_plot(result: BenchmarkData, path: Path) -> Path:
    """Save the figure of ``result`` to ``path`` (:meth:`BenchmarkResult.plot`); needs matplotlib."""
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
                    ax.plot(xs, ys, line, marker=marker, color=colors[batch], label=f"{result.label(key)} B={batch}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    ax = axes[1][0]
    per_token = [result.models[k].kv_cache_bytes_per_token_analytic / 1024 for k in MODEL_KEYS]
    labels = [result.label(key) for key in MODEL_KEYS]
    ax.bar(labels, per_token, color=["C0", "C1"])
    for i, value in enumerate(per_token):
        ax.text(i, value, f"{value:.1f} KiB", ha="center", va="bottom")
    ax.set_title("KV cache per token (KiB)")
    ax = axes[1][1]
    mt = result.max_throughput
    if mt is not None and all(p.decode_tokens_per_s for p in mt.points.values()):
        values = [mt.points[k].decode_tokens_per_s for k in MODEL_KEYS]
        ax.bar(labels, values, color=["C0", "C1"])
        for i, key in enumerate(MODEL_KEYS):
            point = mt.points[key]
            label = f"B={point.max_batch}\n{values[i]:.1f} tok/s"
            if point.method.startswith("EXTRAPOLATED"):
                label += "\n(extrapolated)"
            ax.text(i, values[i], label, ha="center", va="bottom", fontsize=8)
        ax.set_title(
            f"Max decode throughput, budget {fmt_bytes(mt.budget_bytes)} at context {mt.context}"
            + (f" (x{mt.ratio:.2f})" if mt.ratio else "")
        )
        ax.set_ylim(0, max(values) * 1.3)
    else:
        ax.set_axis_off()
        ax.set_title("Max throughput: not measured")
    fig.suptitle(f"LiSA merged vs {result.label('base')} - {machine_label(result.machine)}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def result_summary(result: BenchmarkData) -> str:
    """A short plain-text summary (one line per configuration)."""
    out = []
    for run in result.runs:
        out.append(
            f"{run.model:6s} B={run.batch:<3d} T={run.context:<5d} prefill {fmt_rate(run.prefill_tokens_per_s)} "
            f"decode {fmt_rate(run.decode_tokens_per_s)} tok/s, KV {fmt_bytes(run.kv_cache_bytes)}, "
            f"peak {fmt_bytes(run.peak_memory_bytes)}"
        )
    return "\n".join(out)
