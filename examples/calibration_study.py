"""Calibration study on SmolLM2-135M (built in): rotary frequencies and calibration budget, calibration alone.

For each setting a fresh LiSA adapter (``LiSAConfig.from_analysis`` on the checked-in analysis, ``--fraction`` of the
layers shared, rank 8, linear alignment) is calibrated with :func:`peft_lisa.calibrate` on the pydoc *train* split and
evaluated on two held-out texts it never saw: the pydoc *test* split and a license text shipped with an installed
package (legal English, another domain). Perplexity: window 256, stride 128, the first ``--eval-tokens`` tokens.
CPU minutes are ``time.process_time()`` of the calibration.

    python examples/calibration_study.py --threads 2 --settings strided:32:200 first:32:200

Writes ``docs/calibration/results.md`` and ``results.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from pathlib import Path

import torch
from peft import get_peft_model

from peft_lisa import LiSAConfig, calibrate
from peft_lisa.data import license_text, load_texts
from peft_lisa.evaluation import perplexity
from peft_lisa.resources import load_model_and_tokenizer

BASELINES = ("base", "untrained")
REPO = Path(__file__).resolve().parents[1]
ANALYSIS = REPO / "docs" / "analysis" / "smollm2_135m_analysis.json"


def evaluate(model, tokenizer, held_out: dict[str, list[str]], tokens: int) -> dict[str, float]:
    return {
        name: round(
            perplexity(model, tokenizer, texts, window=256, stride=128, max_tokens=tokens, progress=False).ppl, 3
        )
        for name, texts in held_out.items()
    }


def parse_setting(text: str) -> dict:
    """``rotary:sequences:adam_steps[:head_mixing]``, e.g. ``strided:16:100`` or ``strided:16:100:kv_group``."""
    rotary, sequences, steps, *mixing = text.split(":")
    setting = {"rotary_frequencies": rotary, "num_sequences": int(sequences), "adam_steps": int(steps)}
    return {**setting, "head_mixing": mixing[0] if mixing else "full"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--settings",
        nargs="+",
        default=["first:32:200", "strided:32:200"],
        help="rotary:sequences:adam_steps[:head_mixing] per run",
    )
    parser.add_argument("--fraction", type=float, default=0.5)
    parser.add_argument("--lbfgs-steps", type=int, default=10)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--baselines-from", type=Path, help="take the base and untrained rows from this results.json (same model)"
    )
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "calibration" / "results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    model, tokenizer = load_model_and_tokenizer()
    license_name, license_body = license_text()
    held_out = {"pydoc": load_texts("pydoc", split="test"), "license": [license_body]}
    train = load_texts("pydoc", split="train")
    if args.baselines_from:
        rows = [row for row in json.loads(args.baselines_from.read_text())["rows"] if row["setting"] in BASELINES]
    else:
        rows = [{"setting": "base", **evaluate(model, tokenizer, held_out, args.eval_tokens)}]
    print(rows[0], flush=True)
    for index, text in enumerate(args.settings):
        setting = parse_setting(text)
        config = LiSAConfig.from_analysis(
            ANALYSIS,
            fraction=args.fraction,
            rank=8,
            align_hidden=0,
            rotary_frequencies=setting["rotary_frequencies"],
            head_mixing=setting["head_mixing"],
        )
        peft_model = get_peft_model(model, config)
        if index == 0 and len(rows) == 1:  # an untrained adapter: delta = 0, so the rotary choice does not matter
            rows.append({"setting": "untrained", **evaluate(peft_model, tokenizer, held_out, args.eval_tokens)})
            print(rows[-1], flush=True)
        start = time.process_time()
        report = calibrate(
            peft_model,
            tokenizer,
            train,
            num_sequences=setting["num_sequences"],
            adam_steps=setting["adam_steps"],
            lbfgs_steps=args.lbfgs_steps,
            progress=False,
        )
        cpu_minutes = (time.process_time() - start) / 60
        rows.append(
            {
                "setting": f"calibrated {text}",
                **setting,
                "cpu_minutes": round(cpu_minutes, 2),
                "mean_kl_before": round(report.mean_kl_before, 4),
                "mean_kl_after": round(report.mean_kl_after, 4),
                **evaluate(peft_model, tokenizer, held_out, args.eval_tokens),
                "report": report.to_dict(),
            }
        )
        print({k: v for k, v in rows[-1].items() if k != "report"}, flush=True)
        write_results(args, license_name, rows)  # after every setting: a killed run keeps what it measured
        model, tokenizer = load_model_and_tokenizer()  # a fresh base model for the next setting
    print(write_results(args, license_name, rows))


def write_results(args: argparse.Namespace, license_name: str, rows: list[dict]) -> str:
    base = rows[0]
    lines = [
        f"# Calibration study ({args.fraction:.0%} of SmolLM2-135M's layers shared, rank 8, linear alignment)",
        "",
        f"Command: `python examples/calibration_study.py --threads {args.threads} --fraction {args.fraction} "
        f"--lbfgs-steps {args.lbfgs_steps} --settings {' '.join(args.settings)}`",
        f"Machine: {platform.processor() or platform.machine()}, {args.threads} torch threads, shared CPU; "
        f"torch {torch.__version__}. Held out: pydoc test split and `{license_name}` (legal English), window 256, "
        f"stride 128, first {args.eval_tokens} tokens each. Calibration on the pydoc train split.",
        "",
        "| setting | pydoc ppl | vs base | license ppl | vs base | mean KL before -> after | CPU-min |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        kl = f"{row['mean_kl_before']:.3f} -> {row['mean_kl_after']:.3f}" if "mean_kl_after" in row else ""
        lines.append(
            f"| {row['setting']} | {row['pydoc']:.2f} | {row['pydoc'] / base['pydoc'] - 1:+.0%} | "
            f"{row['license']:.2f} | {row['license'] / base['license'] - 1:+.0%} | {kl} | "
            f"{row.get('cpu_minutes', '')} |"
        )
    table = "\n".join(lines)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(table + "\n")
    args.out.with_suffix(".json").write_text(
        json.dumps(
            {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "rows": rows}, indent=2
        )
        + "\n"
    )
    return table


if __name__ == "__main__":
    main()
