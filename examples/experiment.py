"""The LiSA experiment: perplexity of base, direct sharing, permutation-only sharing, trained LiSA (LM loss, and LM
loss + attention distillation, from the untrained adapter), calibrated LiSA (layer-wise calibration alone) and
calibrated + trained LiSA (calibration, then LM loss) at about 30%, 50% and 70% of SmolLM2-135M-Instruct's layers
shared.

Every run is cached as a JSON file under ``--output-dir``: a re-run only computes what is missing, and ``--only``
runs a subset (e.g. ``--only 0.5:lisa_lm``). At the end it writes ``results.md`` (table), ``results.json`` and two
plots: perplexity against shared fraction, and perplexity against training tokens (the 50% LM run evaluates along
the way).

    python examples/experiment.py                      # everything (about 2 CPU-hours on 2 cores)
    python examples/experiment.py --only 0.5:lisa_lm   # one run
    python examples/experiment.py --only 0.5:lisa_lm --align-hidden 0 --tag linear   # a variant, reported apart

A ``--tag`` names a variant (other alignment width, rank, learning rate, budget): it is cached under its own name
and listed in a second table with its settings, so the main table always compares like with like.

Data: the built-in pydoc text; calibration and training use the train split, perplexity the held-out topics (never
trained on), sliding windows of 256 tokens with stride 128; runs computed since the calibration methods were added are
also scored on a license text shipped with an installed package (another domain, nothing trains on it).
Calibration uses :class:`peft_lisa.LiSACalibrationConfig` with 16 sequences (its default when these runs were
measured; 32 since) and its other defaults, as ``LiSATrainer`` does before training.
Layers and initial head permutations come from the calibration
analysis (``peft_lisa.analyze``) on training text.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from peft import get_peft_model
from transformers import TrainerCallback

import peft_lisa  # noqa: F401  (registers the tuner)
from peft_lisa import AttentionAnalysis, LiSAConfig, analyze, choose_share_layers
from peft_lisa.calibration_step import calibrate_before_training
from peft_lisa.data import license_text, load_texts
from peft_lisa.evaluation import perplexity
from peft_lisa.resources import load_model_and_tokenizer
from peft_lisa.training import (
    LiSACalibrationConfig,
    LiSADistillationConfig,
    LiSATrainer,
    lisa_sft_config,
    text_dataset,
)

FRACTIONS = (0.3, 0.5, 0.7)
METHODS = ("direct", "permutation", "lisa_lm", "lisa_lm_attn_kl", "calibrated", "calibrated_lm")
# The order runs are computed in: the headline comparison first, so a partial run is already useful.
PRIORITY = [(0.5, m) for m in METHODS] + [(f, m) for f in (0.3, 0.7) for m in METHODS]
logger = logging.getLogger("peft_lisa")


def evaluate(model, tokenizer, texts: list[str], args: argparse.Namespace, max_tokens=None) -> dict[str, Any]:
    result = perplexity(
        model,
        tokenizer,
        texts,
        window=args.window,
        stride=args.stride,
        max_tokens=max_tokens or args.eval_tokens,
        progress=False,
    )
    return result.to_dict()


class PerplexityCurve(TrainerCallback):
    """Evaluates held-out perplexity every ``every`` steps: the perplexity-against-training-tokens curve."""

    def __init__(self, model, tokenizer, texts, args, tokens_per_step: int, every: int) -> None:
        self.model, self.tokenizer, self.texts, self.args = model, tokenizer, texts, args
        self.tokens_per_step, self.every, self.points = tokens_per_step, every, []
        self.seconds = self.cpu_seconds = 0.0  # time spent evaluating, kept out of the training minutes

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0:
            start, cpu_start = time.perf_counter(), time.process_time()
            was_training = self.model.training
            self.model.eval()
            ppl = evaluate(self.model, self.tokenizer, self.texts, self.args, self.args.curve_tokens)["ppl"]
            self.model.train(was_training)
            self.points.append(
                {"step": state.global_step, "tokens": state.global_step * self.tokens_per_step, "ppl": ppl}
            )
            logger.info(f"  step {state.global_step}: held-out perplexity {ppl:.2f}")
            self.seconds += time.perf_counter() - start
            self.cpu_seconds += time.process_time() - cpu_start


def lisa_config(analysis: AttentionAnalysis, fraction: float, method: str, args: argparse.Namespace) -> LiSAConfig:
    if method == "direct":
        layers = choose_share_layers(analysis, fraction=fraction)
        return LiSAConfig(share_layers=layers, rank=args.rank, align_hidden=args.align_hidden)
    return LiSAConfig.from_analysis(analysis, fraction=fraction, rank=args.rank, align_hidden=args.align_hidden)


def run_name(fraction: float, method: str, tag: str) -> str:
    return f"{fraction}_{method}" + (f"_{tag}" if tag else "")


def run_one(fraction: float, method: str, analysis, args, test_texts, train_texts, other_texts) -> dict[str, Any]:
    model, tokenizer = load_model_and_tokenizer(args.model)
    config = lisa_config(analysis, fraction, method, args)
    record: dict[str, Any] = {
        "fraction": fraction,
        "method": method,
        "tag": args.tag,
        "share_layers": config.share_layers,
        "rank": config.rank,
        "align_hidden": config.align_hidden,
    }
    start, cpu_start = time.perf_counter(), time.process_time()
    if method in ("direct", "permutation"):
        peft_model = get_peft_model(model, config).eval()
        record["eval"] = evaluate(peft_model, tokenizer, test_texts, args)
        record["trainable_fraction"] = peft_model.get_nb_trainable_parameters()[0] / sum(
            p.numel() for p in peft_model.parameters()
        )
        return record
    calibration = LiSACalibrationConfig(num_sequences=16, adam_steps=100, lr=1e-2)  # the recorded runs' budget
    if method == "calibrated":
        peft_model = get_peft_model(model, config)
        # The calibration LiSATrainer runs before training, alone.
        report = calibrate_before_training(
            peft_model, tokenizer, train_texts, calibration, max_length=args.seq_len, progress=False
        )
        record["train_minutes"] = (time.perf_counter() - start) / 60
        record["train_cpu_minutes"] = (time.process_time() - cpu_start) / 60
        record["calibration"] = {**calibration.to_dict(), "mean_kl_after": report.mean_kl_after}
        peft_model.eval()
        record["eval"] = evaluate(peft_model, tokenizer, test_texts, args)
        record["eval_other"] = evaluate(peft_model, tokenizer, other_texts, args)
        return record
    distillation = LiSADistillationConfig()
    if method == "lisa_lm_attn_kl":
        distillation = LiSADistillationConfig(
            attn_kl_weight=args.attn_kl_weight, attn_kl_schedule="linear_decay", attn_kl_warmup_steps=args.steps // 2
        )
    out = Path(args.output_dir) / f"train_{run_name(fraction, method, args.tag)}"
    sft_args = lisa_sft_config(
        out, max_steps=args.steps, seq_len=args.seq_len, batch_size=args.batch_size, learning_rate=args.lr
    )
    trainer = LiSATrainer(
        model=model,
        args=sft_args,
        train_dataset=text_dataset(train_texts),
        processing_class=tokenizer,
        peft_config=config,
        distillation=distillation,
        calibrate=method == "calibrated_lm",  # the other trained methods start from the untrained adapter
        calibration=calibration,
    )
    tokens_per_step = args.seq_len * args.batch_size
    curve = None
    if args.curve_every or (fraction == 0.5 and method == "lisa_lm" and not args.tag):
        curve = PerplexityCurve(trainer.model, tokenizer, test_texts, args, tokens_per_step, args.curve_every or 20)
        trainer.add_callback(curve)
    trainer.train()
    # Wall minutes of set-up + training with one process per core; curve evaluations are not counted.
    record["train_minutes"] = (time.perf_counter() - start - (curve.seconds if curve else 0.0)) / 60
    record["train_cpu_minutes"] = (time.process_time() - cpu_start - (curve.cpu_seconds if curve else 0.0)) / 60
    record["train_tokens"] = args.steps * tokens_per_step
    record["steps"], record["lr"], record["seq_len"], record["batch_size"] = (
        args.steps,
        args.lr,
        args.seq_len,
        args.batch_size,
    )
    record["distillation"] = distillation.to_dict()
    if trainer.calibration_report is not None:
        record["calibration"] = {**calibration.to_dict(), "mean_kl_after": trainer.calibration_report.mean_kl_after}
    trainer.model.eval()
    record["eval"] = evaluate(trainer.model, tokenizer, test_texts, args)
    record["eval_other"] = evaluate(trainer.model, tokenizer, other_texts, args)
    trainable, total = trainer.model.get_nb_trainable_parameters()
    record["trainable_fraction"] = trainable / total
    if curve is not None:
        record["curve"] = curve.points
    trainer.model.save_pretrained(out / "adapter")
    return record


def cached(path: Path, compute) -> dict[str, Any]:
    if path.exists():
        return json.loads(path.read_text())
    result = compute()
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(path)
    return result


def _align_width(record: dict) -> str:
    width = record.get("align_hidden")
    return "4H" if width is None else str(width)


def _row(record: dict, base: dict) -> tuple[str, str]:
    ppl, base_ppl = record["eval"]["ppl"], base["eval"]["ppl"]
    other = "- | -"
    if "eval_other" in record:
        other_ppl = record["eval_other"]["ppl"]
        other = f"{other_ppl:.2f} | {(other_ppl / base['eval_other']['ppl'] - 1) * 100:+.1f}%"
    minutes = f"{record['train_minutes']:.1f}" if "train_minutes" in record else "-"
    if "train_cpu_minutes" in record:
        minutes += f" / {record['train_cpu_minutes']:.1f}"
    tokens = f"{record['train_tokens']:,}" if "train_tokens" in record else "-"
    shared = f"{len(record['share_layers'])} ({record['fraction']:.0%})"
    return shared, f"{ppl:.2f} | {(ppl / base_ppl - 1) * 100:+.1f}% | {other} | {tokens} | {minutes}"


def report(
    results: dict[tuple[float, str, str], dict], base: dict, base_curve: dict, out: Path, args: argparse.Namespace
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base_ppl = base["eval"]["ppl"]
    main_runs = {(f, m): r for (f, m, tag), r in results.items() if not tag}
    variants = {key: r for key, r in results.items() if key[2]}
    trained = next((r for (_, m), r in sorted(main_runs.items()) if "steps" in r), None)
    settings = (
        f"; training: {trained['steps']} steps x {trained['batch_size']} x {trained['seq_len']} tokens, "
        f"lr {trained['lr']}, rank {trained.get('rank', args.rank)}, align_hidden {_align_width(trained)}"
        if trained
        else ""
    )
    lines = [
        f"Held-out pydoc perplexity (first {args.eval_tokens} tokens of the held-out topics), window {args.window}, "
        f"stride {args.stride}{settings}. Train min: wall minutes / CPU minutes (process time, where recorded) of "
        "one process on one torch thread (2-core machine, two runs at a time), evaluations excluded; calibration "
        "counts as training. License: a license text from another domain (same windows, whole text), scored by the "
        "runs computed since the calibration methods were added.",
        "",
        "| shared | layers | method | perplexity | vs base | license ppl | vs base | train tokens | train min |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|",
        f"| 0 | - | base | {base_ppl:.2f} | - | {base['eval_other']['ppl']:.2f} | - | - | - |",
    ]
    for (_, method), record in sorted(main_runs.items()):
        shared, cells = _row(record, base)
        lines.append(f"| {shared} | {record['share_layers']} | {method} | {cells} |")
    if variants:
        lines += [
            "",
            "Variants (`--tag`): other alignment widths, ranks, learning rates or budgets, same layers and data.",
            "",
            "| tag | shared | method | align_hidden | rank | lr | steps | perplexity | vs base | license ppl "
            "| vs base | train tokens | train min |",
            "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for (_, method, tag), record in sorted(variants.items()):
            shared, cells = _row(record, base)
            lines.append(
                f"| {tag} | {shared} | {method} | {_align_width(record)} | {record.get('rank', '-')} | "
                f"{record.get('lr', '-')} | {record.get('steps', '-')} | {cells} |"
            )
    (out / "results.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(
        json.dumps({"base": base, "runs": [r for _, r in sorted(results.items())]}, indent=2)
    )
    print("\n".join(lines))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in METHODS:
        points = sorted((f, r["eval"]["ppl"]) for (f, m), r in main_runs.items() if m == method)
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=method)
    ax.axhline(base_ppl, color="black", linestyle="--", label=f"base ({base_ppl:.1f})")
    ax.set_yscale("log")
    ax.set_xlabel("fraction of layers shared")
    ax.set_ylabel("held-out perplexity (log)")
    ax.set_title("SmolLM2-135M-Instruct, pydoc held-out")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "perplexity_vs_fraction.png", dpi=120)

    curves = {key: r["curve"] for key, r in sorted(results.items()) if r.get("curve")}
    if curves:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for (fraction, method, tag), curve in curves.items():
            label = f"{method}, {fraction:.0%}" + (f" ({tag})" if tag else "")
            ax.plot([p["tokens"] for p in curve], [p["ppl"] for p in curve], marker="o", label=label)
        curve_base = base_curve["eval"]["ppl"]  # the base model on the same tokens as the curves
        ax.axhline(curve_base, color="black", linestyle="--", label=f"base ({curve_base:.2f})")
        ax.axhline(curve_base * 1.1, color="grey", linestyle=":", label="base +10%")
        ax.set_xlabel("training tokens")
        ax.set_ylabel(f"held-out perplexity (first {args.curve_tokens} tokens)")
        ax.set_yscale("log")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "perplexity_vs_tokens.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model path or hub id (default: built-in SmolLM2-135M)")
    parser.add_argument("--output-dir", default="runs/experiment")
    parser.add_argument(
        "--only",
        nargs="*",
        default=None,
        help="runs to compute, as FRACTION:METHOD (none: only rebuild the report from the cache)",
    )
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument(
        "--align-hidden",
        type=int,
        default=None,
        help="alignment FFN width m (default: 4 x heads, the setting of the published runs; 0 = linear only)",
    )
    parser.add_argument("--attn-kl-weight", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (1 when sharing a small machine)")
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--stride", type=int, default=128)
    parser.add_argument("--eval-tokens", type=int, default=8192, help="held-out tokens scored per evaluation")
    parser.add_argument("--curve-tokens", type=int, default=4096, help="held-out tokens scored along the curve")
    parser.add_argument("--curve-every", type=int, default=0, help="evaluate along training every N steps")
    parser.add_argument("--tag", default="", help="name of a variant run (cached and reported apart)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)

    train_texts, test_texts = load_texts(split="train"), load_texts(split="test")

    def compute_analysis() -> dict:
        model, tokenizer = load_model_and_tokenizer(args.model)
        return analyze(model, tokenizer, train_texts).to_dict()

    analysis = AttentionAnalysis.from_dict(cached(out / "analysis.json", compute_analysis))

    def compute_base() -> dict:
        model, tokenizer = load_model_and_tokenizer(args.model)
        return {"method": "base", "eval": evaluate(model.eval(), tokenizer, test_texts, args)}

    base = cached(out / "base.json", compute_base)

    def compute_base_curve() -> dict:
        model, tokenizer = load_model_and_tokenizer(args.model)
        return {"method": "base", "eval": evaluate(model.eval(), tokenizer, test_texts, args, args.curve_tokens)}

    base_curve = cached(out / f"base_first_{args.curve_tokens}.json", compute_base_curve)
    other_name, other_text = license_text()
    other_texts = [other_text]

    def compute_base_other() -> dict:
        model, tokenizer = load_model_and_tokenizer(args.model)
        return {"method": "base", "text": other_name, "eval": evaluate(model.eval(), tokenizer, other_texts, args)}

    base["eval_other"] = cached(out / "base_other.json", compute_base_other)["eval"]
    wanted = PRIORITY
    if args.only is not None:  # `--only` with nothing after it: just the report from the cache
        wanted = [(float(f), m) for f, m in (item.split(":") for item in args.only)]
        unknown = [m for _, m in wanted if m not in METHODS]
        if unknown:
            parser.error(f"unknown method(s) {unknown} in --only; choose from {list(METHODS)}")
    for fraction, method in wanted:
        logger.info(f"== {fraction:.0%} shared, {method}" + (f" [{args.tag}]" if args.tag else ""))
        cached(
            out / f"run_{run_name(fraction, method, args.tag)}.json",
            lambda f=fraction, m=method: run_one(f, m, analysis, args, test_texts, train_texts, other_texts),
        )
    results = {}
    for path in sorted(out.glob("run_*.json")):
        record = json.loads(path.read_text())
        results[(record["fraction"], record["method"], record.get("tag", ""))] = record
    report(results, base, base_curve, out, args)


if __name__ == "__main__":
    main()
