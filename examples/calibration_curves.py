"""Calibration, then training: held-out perplexity against CPU-minutes on SmolLM2-135M (built in).

A fresh LiSA adapter (``LiSAConfig.from_analysis`` on the checked-in analysis, ``--fraction`` of the layers shared,
rank ``--rank`` (8), linear alignment, the library's rotary default) is calibrated once (:func:`peft_lisa.calibrate`,
``--calibration SEQUENCES:STEPS``) on ``--calibration-data``: the pydoc *train* split, text the base model samples
itself (``generated``: :func:`peft_lisa.generated_text.sample_answers`, answers to generic prompts, temperature 1;
its CPU time counts as calibration), or both (``mix``: half the tokens each, interleaved). From that calibrated state
every ``--objectives`` entry trains ``--steps`` steps of ``--batch-size`` x 256 train tokens (``--train-data``: pydoc
train, the generated texts, cycled, or ``mix``: one row of each in turn) (AdamW, 5% warm-up, cosine) with

* ``lm``: the causal-LM loss;
* ``kl``: the output KL to the adapter-disabled base model (temperature 1);
* ``lm+kl``: their sum;
* ``lm+attn``: the LM loss plus 0.1 x the mean layer-local attention KL;

each written ``OBJECTIVE:LR``. The held-out pydoc *test* split and a license text shipped with an installed package
(legal English, nothing calibrates or trains on it) are measured (window 256, stride 128, first ``--eval-tokens``
tokens) before, after calibration and every ``--eval-every`` steps; CPU-minutes are ``time.process_time()`` of the
calibration and training only (evaluation excluded), so run it pinned to one core with ``--threads 1``. At the end,
greedy generations of the four built-in prompts and of the last ``--loop-prompts`` generic prompts, with the loop
detector of :func:`peft_lisa.evaluation.repeated_ngram`; text is sampled from the first ``--generation-prompts``
only, and the two sets may not overlap.

    taskset -c 1 python examples/calibration_curves.py --threads 1 --calibration 16:100 \\
        --objectives lm:2e-3 kl:2e-3 --steps 60 --out docs/calibration/curves

Writes ``OUT.json`` and ``OUT.md`` after every measurement (a killed run keeps what it measured).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

import torch
from peft import get_peft_model

from peft_lisa import LiSAConfig, calibrate
from peft_lisa.data import chunk_token_ids, license_text, load_texts
from peft_lisa.evaluation import DEFAULT_PROMPTS, generate_samples, perplexity, repeated_ngram
from peft_lisa.generated_text import GENERIC_PROMPTS, sample_answers
from peft_lisa.resources import load_model_and_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from calibration_study import ANALYSIS  # noqa: E402


def evaluate(model, tokenizer, held_out: dict[str, list[str]], tokens: int) -> dict[str, float]:
    return {
        name: round(
            perplexity(model, tokenizer, texts, window=256, stride=128, max_tokens=tokens, progress=False).ppl, 3
        )
        for name, texts in held_out.items()
    }


def generations(model, tokenizer, max_new_tokens: int, generic: int = 0) -> list[dict[str, str | None]]:
    """Greedy answers to the four built-in prompts and the last ``generic`` of ``GENERIC_PROMPTS`` (the first ones
    may have been sampled for training text: ``--generation-prompts``), each with the phrase it loops on (or None)."""
    prompts = [*DEFAULT_PROMPTS, *GENERIC_PROMPTS[len(GENERIC_PROMPTS) - generic :]]
    outputs = generate_samples(model, tokenizer, prompts=prompts, max_new_tokens=max_new_tokens)
    pairs = zip(prompts, outputs, strict=True)
    return [{"prompt": prompt, "text": text, "loop": repeated_ngram(text)} for prompt, text in pairs]


def self_generated(model, tokenizer, tokens: int, num_prompts: int, batch: int = 8) -> list[str]:
    """Sampled answers of ``model`` to the first ``num_prompts`` generic prompts, ``batch`` at a time (next prompts,
    next seed), until they hold ``tokens`` tokens (:func:`peft_lisa.generated_text.sample_answers`)."""
    return [answer for _, answer in sample_answers(model, tokenizer, tokens, GENERIC_PROMPTS[:num_prompts], batch)]


def interleave(tokenizer, first: list[str], second: list[str]) -> list[str]:
    """The texts of both lists, each next one from the list that has given fewer tokens so far."""
    out, counts, lists = [], [0, 0], [list(first), list(second)]
    while any(lists):
        side = min((i for i in (0, 1) if lists[i]), key=lambda i: counts[i])
        text = lists[side].pop(0)
        counts[side] += len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1
        out.append(text)
    return out


def objective_loss(peft_model, objective: str, ids: torch.Tensor, distiller) -> torch.Tensor:
    from peft_lisa.training import output_kl

    if objective == "lm+attn":
        with distiller.collect():
            out = peft_model(input_ids=ids, labels=ids, use_cache=False)
        return out.loss + 0.1 * distiller.loss()
    out = peft_model(input_ids=ids, labels=ids if "lm" in objective else None, use_cache=False)
    loss = out.loss if "lm" in objective else 0.0
    if "kl" in objective:
        with torch.no_grad(), peft_model.disable_adapter():
            teacher = peft_model(input_ids=ids, use_cache=False).logits
        vocab = out.logits.shape[-1]
        loss = loss + output_kl(out.logits[:, :-1].reshape(-1, vocab), teacher[:, :-1].reshape(-1, vocab))
    return loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fraction", type=float, default=0.5)
    parser.add_argument("--share-layers", help="comma-separated layer indices (instead of --fraction)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--calibration", default="16:100", help="SEQUENCES:ADAM_STEPS (0:0 = no calibration)")
    parser.add_argument("--calibration-data", choices=("pydoc", "generated", "mix"), default="pydoc")
    parser.add_argument("--train-data", choices=("pydoc", "generated", "mix"), default="pydoc")
    parser.add_argument(
        "--generation-prompts", type=int, default=len(GENERIC_PROMPTS), help="sample text from the first K prompts"
    )
    parser.add_argument("--objectives", nargs="*", default=["lm:2e-3", "kl:2e-3"])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument(
        "--loop-prompts", type=int, default=0, help="also answer the last N generic prompts (loop counts over more)"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("docs/calibration/curves"))
    parser.add_argument("--plot", nargs="+", type=Path, help="only draw OUT.png from these results JSON files")
    args = parser.parse_args()
    if args.plot:
        plot(args.plot, args.out.with_suffix(".png"))
        return
    prompts = len(GENERIC_PROMPTS)
    if not (0 <= args.loop_prompts <= prompts and 1 <= args.generation_prompts <= prompts):
        parser.error(f"--loop-prompts must be in 0..{prompts} and --generation-prompts in 1..{prompts}")
    uses_generated = args.calibration_data != "pydoc" or args.train_data != "pydoc"
    if uses_generated and args.generation_prompts + args.loop_prompts > len(GENERIC_PROMPTS):
        parser.error(
            f"--generation-prompts {args.generation_prompts} and --loop-prompts {args.loop_prompts} overlap: the loop "
            f"count must use prompts no training text was sampled from (together at most {len(GENERIC_PROMPTS)})"
        )
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.manual_seed(0)

    model, tokenizer = load_model_and_tokenizer()
    license_name, license_body = license_text()
    held_out = {"pydoc": load_texts("pydoc", split="test"), "license": [license_body]}
    train_texts = load_texts("pydoc", split="train")
    results: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "license": license_name, "runs": {}}

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(to_markdown(results) + "\n")

    results["base"] = evaluate(model, tokenizer, held_out, args.eval_tokens)
    results["base_generations"] = generations(model, tokenizer, args.max_new_tokens, args.loop_prompts)
    print("base", results["base"], flush=True)
    sequences, steps = (int(x) for x in args.calibration.split(":"))
    generated: list[str] = []
    generation_cpu = 0.0
    if args.calibration_data != "pydoc" or args.train_data != "pydoc":
        start = time.process_time()
        share = 0.5 if args.calibration_data == "mix" else 1.0
        tokens = math.ceil(share * max(sequences, 1) * 256)
        generated = self_generated(model, tokenizer, tokens, args.generation_prompts)
        generation_cpu = (time.process_time() - start) / 60
        results["generation"] = {"texts": len(generated), "cpu_minutes": round(generation_cpu, 2)}
        results["generation"]["loops"] = sum(1 for text in generated if repeated_ngram(text))
        results["generated_texts"] = generated
        print("generation", results["generation"], flush=True)
    calibration_texts = {"pydoc": train_texts, "generated": generated}.get(args.calibration_data)
    if args.calibration_data == "mix":
        calibration_texts = interleave(tokenizer, train_texts, generated)
    config = LiSAConfig.from_analysis(ANALYSIS, fraction=args.fraction, rank=args.rank, align_hidden=0)
    if args.share_layers:  # explicit layers, still with the analysis' best head permutations as initial P
        layers = [int(x) for x in args.share_layers.split(",")]
        config = LiSAConfig.from_analysis(ANALYSIS, fraction=28 / 30, rank=args.rank, align_hidden=0)
        perms = {int(k): v for k, v in (config.align_init_permutations or {}).items() if int(k) in layers}
        config = LiSAConfig(share_layers=layers, rank=args.rank, align_hidden=0, align_init_permutations=perms)
    peft_model = get_peft_model(model, config)
    results["share_layers"] = list(config.share_layers)
    results["untrained"] = evaluate(peft_model, tokenizer, held_out, args.eval_tokens)
    print("untrained", results["untrained"], flush=True)
    # Generation counts once: in the calibration when it calibrates on generated text, else in the training.
    generation_in_calibration = generation_cpu if args.calibration_data != "pydoc" else 0.0
    calibration_cpu = generation_in_calibration
    if sequences:
        start = time.process_time()
        report = calibrate(
            peft_model, tokenizer, calibration_texts, num_sequences=sequences, adam_steps=steps, progress=False
        )
        calibration_cpu += (time.process_time() - start) / 60
        results["calibrated"] = {
            **evaluate(peft_model, tokenizer, held_out, args.eval_tokens),
            "cpu_minutes": round(calibration_cpu, 2),  # generation included
            "generation_cpu_minutes": round(generation_in_calibration, 2),
            "mean_kl_after": round(report.mean_kl_after, 4),
        }
        results["calibrated_generations"] = generations(peft_model, tokenizer, args.max_new_tokens, args.loop_prompts)
        print("calibrated", results["calibrated"], flush=True)
    save()
    state = {name: p.detach().clone() for name, p in peft_model.named_parameters() if p.requires_grad}
    # Training rows: pydoc, generated, or (mix) one of each in turn; each source cycled in its own random order.
    names = {"pydoc": ["pydoc"], "generated": ["generated"], "mix": ["pydoc", "generated"]}[args.train_data]
    texts = {"pydoc": train_texts, "generated": generated}
    sources = [chunk_token_ids(tokenizer, texts[name], 256) for name in names]
    orders = [torch.randperm(len(b), generator=torch.Generator().manual_seed(0)) for b in sources]

    def batch_rows(step: int) -> torch.Tensor:
        rows = []
        for i in range(args.batch_size):
            n = step * args.batch_size + i
            source = n % len(sources)
            index = orders[source][(n // len(sources)) % len(orders[source])]
            rows.append(sources[source][index])
        return torch.stack(rows)

    for entry in args.objectives:
        objective, lr = entry.split(":")
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if name in state:
                    p.copy_(state[name])
        params = [p for p in peft_model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=float(lr), weight_decay=0.0)
        warmup = max(1, round(0.05 * args.steps))

        def schedule(step: int, warmup: int = warmup) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup)))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        distiller = None
        if objective == "lm+attn":
            from peft_lisa.training import AttentionDistiller

            distiller = AttentionDistiller(peft_model)
        run = {"objective": objective, "lr": float(lr), "curve": []}
        results["runs"][entry] = run
        cpu = calibration_cpu + generation_cpu - generation_in_calibration
        peft_model.train()
        for step in range(args.steps):
            start = time.process_time()
            loss = objective_loss(peft_model, objective, batch_rows(step), distiller)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            cpu += (time.process_time() - start) / 60
            if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
                point = {"step": step + 1, "cpu_minutes": round(cpu, 2), "loss": round(loss.item(), 4)}
                point.update(evaluate(peft_model, tokenizer, held_out, args.eval_tokens))
                peft_model.train()
                run["curve"].append(point)
                print(entry, point, flush=True)
                save()
        if distiller is not None:
            distiller.remove()
        run["generations"] = generations(peft_model, tokenizer, args.max_new_tokens, args.loop_prompts)
        save()
    print(to_markdown(results))


def plot(files: list[Path], out: Path) -> None:
    """Held-out perplexity (pydoc, license) against CPU-minutes of calibration + training, one line per run."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4.5))
    axes = figure.subplots(1, 2)
    for file in files:
        results = json.loads(file.read_text())
        label = f"{float(results['args']['fraction']):.0%} shared, calibration {results['args']['calibration']}"
        start = results.get("calibrated", {"cpu_minutes": 0.0, **results["untrained"]})
        for ax, text in zip(axes, ("pydoc", "license"), strict=True):
            base = results["base"][text]
            for name, run in results["runs"].items():
                xs = [start["cpu_minutes"]] + [point["cpu_minutes"] for point in run["curve"]]
                ys = [start[text] / base] + [point[text] / base for point in run["curve"]]
                ax.plot(xs, ys, marker="o", label=f"{label}: then {name}")
            ax.scatter([start["cpu_minutes"]], [start[text] / base], color="black", zorder=3)
    for ax, text in zip(axes, ("pydoc test (held out)", "license text (another domain)"), strict=True):
        for level, style in ((1.0, "-"), (1.10, "--"), (1.15, ":")):
            ax.axhline(level, color="gray", linestyle=style, linewidth=1)
        ax.set_xlabel("CPU-minutes (1 thread): calibration, then training")
        ax.set_ylabel("perplexity / base")
        ax.set_title(text)
        ax.set_ylim(0.8, 1.8)  # a long run goes below the base on the in-domain text
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    print(f"wrote {out}")


def to_markdown(results: dict) -> str:
    base = results["base"]
    lines = [
        f"Calibration {results['args']['calibration']} (sequences:Adam steps) on "
        f"{results['args'].get('calibration_data', 'pydoc')} text, {results['args']['fraction']} shared, "
        f"rank {results['args'].get('rank', 8)}, "
        f"{results['args']['threads']} thread(s); training batch {results['args']['batch_size']} x 256 of "
        f"{results['args'].get('train_data', 'pydoc')} text. "
        f"Held out: pydoc test and {results['license']}.",
        "",
        "| run | step | CPU-min | pydoc ppl | vs base | license ppl | vs base |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]

    def row(name: str, step, cpu, point: dict) -> None:
        lines.append(
            f"| {name} | {step} | {cpu} | {point['pydoc']:.2f} | {point['pydoc'] / base['pydoc'] - 1:+.1%} | "
            f"{point['license']:.2f} | {point['license'] / base['license'] - 1:+.1%} |"
        )

    if "generation" in results:
        gen = results["generation"]
        lines.insert(1, f"Self-generated: {gen['texts']} texts, {gen['cpu_minutes']} CPU-min, {gen['loops']} looping.")
    row("base", "", "", base)
    row("untrained", "", "", results["untrained"])
    if "calibrated" in results:
        row("calibrated", 0, results["calibrated"]["cpu_minutes"], results["calibrated"])
    for name, run in results["runs"].items():
        for point in run["curve"]:
            row(name, point["step"], point["cpu_minutes"], point)
    lines.append("")
    named = [("base", results.get("base_generations")), ("calibrated", results.get("calibrated_generations"))]
    named += [(name, run.get("generations")) for name, run in results["runs"].items()]
    for name, gens in named:
        if gens:
            loops = sum(1 for g in gens if g["loop"])
            builtin = gens[: len(DEFAULT_PROMPTS)]
            counts = f"{loops}/{len(gens)} looping"
            if len(gens) > len(builtin):
                counts += f" ({sum(1 for g in builtin if g['loop'])}/{len(builtin)} of the built-in prompts)"
            lines.append(f"- {name}: {counts}; " + " | ".join(repr(g["text"][:80]) for g in builtin))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
