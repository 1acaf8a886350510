"""The quality/speed trade-off of the head-alignment width ``m`` (``LiSAConfig.align_hidden``).

Reads what two other commands wrote and puts it side by side, as a markdown table and a plot:

* speed: one ``examples/benchmark.py`` output directory per width (base vs merged, measured side by side);
* quality: the cached runs of ``examples/experiment.py`` (held-out perplexity of trained LiSA at 50% shared).

    python examples/benchmark.py --share-layers 4,5,6,7,8,13,15,18,19,22,23,24,25,26,27 --align-hidden 0 \\
        --output-dir runs/bench/m0 ...                       # and --align-hidden 9, 36
    python examples/experiment.py --only 0.5:lisa_lm --align-hidden 0 --tag linear ...
    python examples/align_tradeoff.py --bench runs/bench/m0 runs/bench/m9 runs/bench/m36 \\
        --experiment runs/experiment --output-dir docs/benchmark

A width with no trained run is listed with its speed only.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Optional


def load_benchmark(directory: Path) -> dict[str, Any]:
    path = directory / "results.json"
    if not path.is_file():
        raise SystemExit(f"align_tradeoff: {path} not found; run examples/benchmark.py --output-dir {directory} first")
    return json.loads(path.read_text())


def speedups(bench: dict[str, Any]) -> dict[tuple[int, int], dict[str, Optional[float]]]:
    """(batch, context) -> merged/base prefill and decode speedups."""
    runs = {(r["model"], r["batch"], r["context"]): r for r in bench["runs"]}
    out = {}
    for (model, batch, context), base in runs.items():
        merged = runs.get(("merged", batch, context))
        if model != "base" or merged is None:
            continue
        ratio = {}
        for phase in ("prefill", "decode"):
            b, m = base[f"{phase}_tokens_per_s"], merged[f"{phase}_tokens_per_s"]
            ratio[phase] = m / b if b and m else None
        out[(batch, context)] = ratio
    return out


def trained_runs(experiment: Path, fraction: float = 0.5) -> list[dict[str, Any]]:
    runs = []
    for path in sorted(experiment.glob("run_*.json")):
        record = json.loads(path.read_text())
        if record.get("fraction") == fraction and "train_tokens" in record:
            runs.append(record)
    return runs


def align_width(value: Optional[int], num_heads: int) -> int:
    return 4 * num_heads if value is None else value


def _fmt(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}x"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bench", nargs="+", type=Path, required=True, help="benchmark output directories")
    parser.add_argument("--experiment", type=Path, default=Path("runs/experiment"), help="experiment cache")
    parser.add_argument("--output-dir", type=Path, default=Path("runs/align_tradeoff"))
    args = parser.parse_args()
    args.output_dir.mkdir(parents=True, exist_ok=True)

    benches = sorted((load_benchmark(d) for d in args.bench), key=lambda b: b["models"]["merged"]["align_hidden"])
    num_heads = json.loads((args.experiment / "analysis.json").read_text())["num_heads"]
    base_ppl = json.loads((args.experiment / "base.json").read_text())["eval"]["ppl"]
    runs = trained_runs(args.experiment)
    ratios_of = [speedups(bench) for bench in benches]  # per width: (batch, context) -> prefill/decode ratios
    grid = sorted({key for ratios in ratios_of for key in ratios})
    machine = benches[0]["machine"]

    lines = [
        f"Speed: merged / base, measured side by side in one run per width (`examples/benchmark.py`; "
        f"{machine.get('cpu', '')} {machine['device']}, {machine.get('torch_threads', '?')} torch thread(s), "
        f"{benches[0]['models']['merged']['dtype']}). Quality: held-out pydoc perplexity at 50% shared "
        f"(`examples/experiment.py`), base {base_ppl:.2f}.",
        "",
        "| m | LiSA params | Q/K compression | "
        + " | ".join(f"decode B{b} T{c}" for b, c in grid)
        + " | prefill B1 T2048 | max throughput (budget) |",
        "|---:|---:|---:|" + "---:|" * len(grid) + "---:|---:|",
    ]
    for bench, ratios in zip(benches, ratios_of, strict=True):
        m = bench["models"]["merged"]["align_hidden"]
        cells = [_fmt(ratios.get(key, {}).get("decode")) for key in grid]
        compression = bench["compression"]
        lines.append(
            f"| {m} | {compression['qk_params_lisa']:,} | {compression['ratio']:.2f}x | "
            + " | ".join(cells)
            + f" | {_fmt(ratios.get((1, 2048), {}).get('prefill'))} | {_fmt(bench['max_throughput']['ratio'])} |"
        )
    lines += [
        "",
        "| m | method | steps | train tokens | train wall-min | train CPU-min | perplexity | vs base |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for record in sorted(runs, key=lambda r: (align_width(r.get("align_hidden"), num_heads), r["train_tokens"])):
        ppl = record["eval"]["ppl"]
        cpu = f"{record['train_cpu_minutes']:.1f}" if "train_cpu_minutes" in record else "-"
        lines.append(
            f"| {align_width(record.get('align_hidden'), num_heads)} | {record['method']} | {record['steps']} | "
            f"{record['train_tokens']:,} | {record['train_minutes']:.1f} | {cpu} | {ppl:.2f} | "
            f"{(ppl / base_ppl - 1) * 100:+.1f}% |"
        )
    text = "\n".join(lines) + "\n"
    (args.output_dir / "align_tradeoff.md").write_text(text)
    print(text)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_speed, ax_quality) = plt.subplots(1, 2, figsize=(11, 4.2))
    widths = [bench["models"]["merged"]["align_hidden"] for bench in benches]
    for key in grid:
        values = [ratios.get(key, {}).get("decode") for ratios in ratios_of]
        ax_speed.plot(widths, values, marker="o", label=f"decode B{key[0]} T{key[1]}")
    ax_speed.plot(widths, [b["max_throughput"]["ratio"] for b in benches], marker="s", color="black",
                  label="max throughput (budget)")  # fmt: skip
    ax_speed.axhline(1.0, color="grey", linestyle=":")
    ax_speed.set_xlabel("alignment FFN width m")
    ax_speed.set_ylabel("merged / base")
    ax_speed.set_title("speed")
    ax_speed.legend(fontsize=7)
    for method_steps in sorted({(r["method"], r["steps"]) for r in runs}):
        points = sorted(
            (align_width(r.get("align_hidden"), num_heads), r["eval"]["ppl"])
            for r in runs
            if (r["method"], r["steps"]) == method_steps
        )
        ax_quality.plot(*zip(*points, strict=True), marker="o", label=f"{method_steps[0]}, {method_steps[1]} steps")
    ax_quality.axhline(base_ppl, color="black", linestyle="--", label="base")
    ax_quality.set_xlabel("alignment FFN width m")
    ax_quality.set_ylabel("held-out perplexity, 50% shared")
    ax_quality.set_title("quality")
    ax_quality.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.output_dir / "align_tradeoff.png", dpi=120)
    print(f"Wrote {args.output_dir / 'align_tradeoff.md'} and {args.output_dir / 'align_tradeoff.png'}")


if __name__ == "__main__":
    main()
