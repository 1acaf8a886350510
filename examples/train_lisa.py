"""Train a LiSA adapter with TRL's SFTTrainer, then evaluate it on held-out text.

What it does, in order:

1. loads the base model (default: the built-in SmolLM2-135M-Instruct, optionally 4-bit NF4 with --load-in-4bit) and
   the data (default: the Python documentation topics of ``pydoc_data``; or a .txt file, a .jsonl/.json file with a
   "text" field or chat "messages", or a ``datasets`` name). A deterministic held-out part of the data (or the
   dataset's own test split) is never trained on;
2. chooses the shared layers: --share-layers, or --share-fraction of all layers from a calibration analysis
   (``peft_lisa.analysis``: lowest best-matched JS divergence, first layers kept full, head permutations as the
   alignment's initialisation);
3. prints the held-out sliding-window perplexity of the base model and of the untrained LiSA model (direct
   sharing with realigned heads);
4. trains only the LiSA modules with the causal-LM loss (plain text: packed into blocks of --seq-len tokens; chat:
   the chat template), optionally plus attention and/or output distillation (off by default);
5. prints the trained perplexity, tokens seen, wall-clock minutes and a few greedy generations, saves the adapter to
   OUTPUT_DIR/adapter and writes OUTPUT_DIR/results.json.

The default run (no arguments) is this project's main training job: SmolLM2-135M-Instruct with 15 of its 30 layers
shared (--share-fraction 0.5), rank 8, linear-only head alignment (the library default), LM loss only, 120 steps of
2 x 256 pydoc tokens (61,440 tokens) at learning rate 2e-3 (cosine); perplexity on the first 4096 held-out pydoc tokens
with window 256 and stride 128. Measured on the project's 2-core CPU (1 torch thread, another training run on the
other core): 11.6 minutes in all, 9.8 of them training; held-out perplexity 13.14 (base), 69.86 (untrained LiSA),
22.58 (trained). With --align-hidden 36 (an FFN of 4 x heads): 20.50 in 13.3 minutes, but a slower merged model.
The prototype of METHOD.md trained on twice the tokens (120 steps of 4 x 256): pass --batch-size 4 for that budget
(about twice the training time).

Examples::

    python examples/train_lisa.py                                   # the default main job
    python examples/train_lisa.py --max-steps 20 --output-dir runs/smoke
    python examples/train_lisa.py --share-layers 4,5,6,7 --attn-kl-weight 0.1 --attn-kl-schedule linear_decay \\
        --attn-kl-warmup-steps 40
    python examples/train_lisa.py --data chat.jsonl --load-in-4bit
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import torch

import peft_lisa  # noqa: F401  (registers the LiSA tuner before SFTTrainer calls get_peft_model)
from peft_lisa import LiSAConfig, qk_compression_report
from peft_lisa.evaluation import DEFAULT_PROMPTS, generate_samples, perplexity
from peft_lisa.resources import load_model_and_tokenizer
from peft_lisa.training import (
    LiSADistillationConfig,
    LiSATrainer,
    evaluation_texts,
    is_conversational_dataset,
    keep_4bit_weights_trainable,
    lisa_sft_config,
    load_sft_dataset,
)
from peft_lisa.tuner.config import DEFAULT_ALIGN_HIDDEN


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train_lisa.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    data = parser.add_argument_group("model and data")
    data.add_argument("--model", default=None, help="model path or hub id (default: built-in SmolLM2-135M-Instruct)")
    data.add_argument(
        "--data",
        default="pydoc",
        help="'pydoc' (built-in, default), a .txt file (documents separated by blank lines), a .jsonl/.json file "
        "(a text field, or chat 'messages'), or a datasets name/directory",
    )
    data.add_argument("--text-field", default="text", help="text field of JSON records / dataset rows (default: text)")
    data.add_argument(
        "--held-out-fraction",
        type=float,
        default=0.1,
        help="fraction of documents held out for evaluation when the data has no test split (default: 0.1)",
    )
    data.add_argument("--load-in-4bit", action="store_true", help="load the base model in 4-bit NF4 (bitsandbytes)")

    lisa = parser.add_argument_group("LiSA adapter")
    choice = lisa.add_mutually_exclusive_group()
    choice.add_argument("--share-layers", default=None, help="comma-separated layer indices to share, e.g. 4,5,6")
    choice.add_argument(
        "--share-fraction",
        type=float,
        default=None,
        help="share this fraction of all layers, chosen by a calibration analysis (default: 0.5)",
    )
    lisa.add_argument("--keep-first", type=int, default=2, help="with --share-fraction: first layers kept full")
    lisa.add_argument(
        "--analysis-batches", type=int, default=2, help="with --share-fraction: calibration batches of 4 x 256 tokens"
    )
    lisa.add_argument("--rank", type=int, default=8, help="per-head rank of the low-rank Q/K delta (even, default 8)")
    lisa.add_argument(
        "--align-hidden",
        type=int,
        default=DEFAULT_ALIGN_HIDDEN,
        help="hidden size of the head-alignment FFN (default 0 = linear only; 36 = 4 x heads on SmolLM2)",
    )

    train = parser.add_argument_group("training")
    train.add_argument("--max-steps", type=int, default=120, help="optimizer steps (default: 120)")
    train.add_argument("--seq-len", type=int, default=256, help="tokens per training sequence (default: 256)")
    train.add_argument("--batch-size", type=int, default=2, help="sequences per step (default: 2)")
    train.add_argument("--lr", type=float, default=2e-3, help="peak learning rate, cosine schedule (default: 2e-3)")
    train.add_argument(
        "--packing",
        choices=("auto", "yes", "no"),
        default="auto",
        help="pack the texts into full blocks (auto: yes for plain text, no for chat data)",
    )
    train.add_argument(
        "--gradient-checkpointing", action="store_true", help="non-reentrant activation checkpointing (saves memory)"
    )
    train.add_argument("--seed", type=int, default=0)
    train.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads; 0 (default) = one per core left idle by other processes (1-minute load average), "
        "since threads of one op waiting on a core another job holds can make a step several times slower",
    )
    train.add_argument("--logging-steps", type=int, default=10)

    distill = parser.add_argument_group("distillation (off by default)")
    distill.add_argument("--attn-kl-weight", type=float, default=0.0, help="weight of the attention KL (default 0)")
    distill.add_argument(
        "--attn-kl-schedule",
        choices=("constant", "linear_decay"),
        default="constant",
        help="constant weight, or linear decay to 0 over --attn-kl-warmup-steps",
    )
    distill.add_argument("--attn-kl-warmup-steps", type=int, default=0, help="length of the linear decay (steps)")
    distill.add_argument(
        "--attn-kl-layer-reduction",
        choices=("mean", "sum"),
        default="mean",
        help="combine the per-layer KLs by mean (default) or sum",
    )
    distill.add_argument(
        "--output-kl-weight", type=float, default=0.0, help="weight of the KL to the adapter-disabled model"
    )
    distill.add_argument("--temperature", type=float, default=1.0, help="temperature of the output KL")

    evaluation = parser.add_argument_group("evaluation")
    evaluation.add_argument("--eval-window", type=int, default=256, help="perplexity window in tokens (default 256)")
    evaluation.add_argument("--eval-stride", type=int, default=128, help="perplexity stride in tokens (default 128)")
    evaluation.add_argument(
        "--eval-max-tokens",
        type=int,
        default=4096,
        help="evaluate on the first N held-out tokens (default 4096; 0 = all)",
    )
    evaluation.add_argument("--eval-batch-size", type=int, default=8)
    evaluation.add_argument("--max-new-tokens", type=int, default=40, help="tokens per sample generation")
    evaluation.add_argument(
        "--skip-base-eval", action="store_true", help="skip the base and untrained perplexities (faster)"
    )

    parser.add_argument("--output-dir", default="runs/train_lisa", help="where adapter and results.json go")
    return parser


def _log(message: str) -> None:
    print(f"[train_lisa] {message}", flush=True)


def _idle_cores() -> int:
    """Cores not busy with other processes: torch's thread count (one per usable core) minus the 1-minute load
    average, rounded, at least 1."""
    cores = torch.get_num_threads()
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # not on this platform
        return cores
    return max(1, min(cores, round(cores - load)))


def _fallback_share_layers(num_layers: int, fraction: float, keep_first: int) -> list[int]:
    """The deepest ``round(fraction * num_layers)`` layers (shallow layers are the fragile ones)."""
    count = max(1, round(fraction * num_layers))
    first = max(keep_first, 1, num_layers - count)
    return list(range(first, num_layers))


def choose_lisa_config(args: argparse.Namespace, model: Any, tokenizer: Any, train_texts: list[str]) -> tuple:
    """The ``LiSAConfig`` for the run, and a dict describing how its layers were chosen."""
    common = dict(rank=args.rank, align_hidden=args.align_hidden, task_type="CAUSAL_LM")
    if args.share_layers:
        layers = [int(i) for i in args.share_layers.split(",") if i.strip()]
        return LiSAConfig(share_layers=layers, **common), {"method": "explicit"}
    fraction = 0.5 if args.share_fraction is None else args.share_fraction
    num_layers = model.config.num_hidden_layers
    try:
        from peft_lisa.analysis import analyze

        if not hasattr(LiSAConfig, "from_analysis"):
            raise ImportError("LiSAConfig.from_analysis is missing")
    except ImportError as error:
        layers = _fallback_share_layers(num_layers, fraction, args.keep_first)
        warnings.warn(
            f"peft_lisa.analysis is not available ({error}); sharing the deepest {len(layers)} layers {layers} "
            "instead of choosing them from a calibration analysis.",
            stacklevel=2,
        )
        print(f"WARNING: no calibration analysis available; sharing the deepest layers {layers}", flush=True)
        return LiSAConfig(share_layers=layers, **common), {"method": "deepest (fallback)", "fraction": fraction}
    _log(f"calibration analysis for --share-fraction {fraction} ({args.analysis_batches} batch(es) of 4 x 256)")
    started = time.monotonic()
    analysis = analyze(
        model,
        tokenizer,
        train_texts,
        seq_len=256,
        batch_size=4,
        max_batches=args.analysis_batches,
        sensitivity=False,
        progress=True,
    )
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    analysis.to_json(output_dir / "analysis.json")
    config = LiSAConfig.from_analysis(analysis, fraction=fraction, keep_first=args.keep_first, **common)
    info = {
        "method": "analysis (js_matched)",
        "fraction": fraction,
        "keep_first": args.keep_first,
        "analysis_minutes": round((time.monotonic() - started) / 60, 2),
        "analysis_file": str(output_dir / "analysis.json"),
    }
    return config, info


def _ppl(model: Any, tokenizer: Any, texts: list[str], args: argparse.Namespace, label: str) -> dict[str, Any]:
    started = time.monotonic()
    result = perplexity(
        model,
        tokenizer,
        texts,
        window=args.eval_window,
        stride=args.eval_stride,
        batch_size=args.eval_batch_size,
        max_tokens=args.eval_max_tokens or None,
    )
    minutes = (time.monotonic() - started) / 60
    _log(f"{label} perplexity: {result.ppl:.2f} ({result.num_tokens} tokens, {minutes:.1f} min)")
    return {**result.to_dict(), "minutes": round(minutes, 2)}


def _generate(model: Any, tokenizer: Any, args: argparse.Namespace, label: str) -> list[str]:
    started = time.monotonic()
    samples = generate_samples(model, tokenizer, DEFAULT_PROMPTS, args.max_new_tokens)
    _log(f"{label}: {len(samples)} greedy generations in {(time.monotonic() - started) / 60:.1f} min")
    return samples


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    """Run the script with ``argv`` (default: the command line); returns the results that go to results.json."""
    args = build_parser().parse_args(argv)
    run_started = time.monotonic()
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads or _idle_cores())
    _log(f"torch threads: {torch.get_num_threads()}")

    load_kwargs: dict[str, Any] = {}
    if args.load_in_4bit:
        from transformers import BitsAndBytesConfig

        compute_dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
        load_kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype
        )
    model, tokenizer = load_model_and_tokenizer(args.model, **load_kwargs)
    if args.load_in_4bit:
        keep_4bit_weights_trainable(model)  # same float compute path for evaluation and training on CPU
    if torch.cuda.is_available() and not args.load_in_4bit:
        model = model.to("cuda")
    _log(f"model: {args.model or 'SmolLM2-135M-Instruct (built-in)'}{' (4-bit NF4)' if args.load_in_4bit else ''}")

    train_dataset = load_sft_dataset(args.data, "train", args.text_field, args.held_out_fraction)
    held_out = evaluation_texts(
        load_sft_dataset(args.data, "test", args.text_field, args.held_out_fraction), tokenizer
    )
    chat = is_conversational_dataset(train_dataset)
    packing = {"auto": not chat, "yes": True, "no": False}[args.packing]
    _log(
        f"data: {args.data} ({'chat' if chat else 'plain text'}), {len(train_dataset)} training documents, "
        f"{len(held_out)} held-out documents"
    )

    train_texts = evaluation_texts(train_dataset, tokenizer)
    lisa_config, layer_choice = choose_lisa_config(args, model, tokenizer, train_texts)
    _log(f"shared layers ({layer_choice['method']}): {lisa_config.share_layers}")

    generations: dict[str, list[str]] = {}
    ppl: dict[str, Any] = {}
    if not args.skip_base_eval:
        ppl["base"] = _ppl(model, tokenizer, held_out, args, "base model")
        generations["base"] = _generate(model, tokenizer, args, "base model")

    distillation = LiSADistillationConfig(
        attn_kl_weight=args.attn_kl_weight,
        attn_kl_schedule=args.attn_kl_schedule,
        attn_kl_warmup_steps=args.attn_kl_warmup_steps,
        attn_kl_layer_reduction=args.attn_kl_layer_reduction,
        output_kl_weight=args.output_kl_weight,
        temperature=args.temperature,
    )
    sft_config = lisa_sft_config(
        output_dir / "trainer",
        max_steps=args.max_steps,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        packing=packing,
        gradient_checkpointing=args.gradient_checkpointing,
        logging_steps=args.logging_steps,
        seed=args.seed,
    )
    trainer = LiSATrainer(
        model=model,
        args=sft_config,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        peft_config=lisa_config,
        distillation=distillation,
    )
    peft_model = trainer.model
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    _log(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")
    if not args.skip_base_eval:
        ppl["untrained_lisa"] = _ppl(peft_model, tokenizer, held_out, args, "untrained LiSA")

    _log(
        f"training {args.max_steps} steps x {args.batch_size} x {args.seq_len} tokens, lr {args.lr}, "
        f"attn KL {args.attn_kl_weight} ({args.attn_kl_schedule}), output KL {args.output_kl_weight}"
    )
    train_started = time.monotonic()
    train_output = trainer.train()
    train_minutes = (time.monotonic() - train_started) / 60
    tokens_seen = int(getattr(trainer, "_total_train_tokens", 0) or args.max_steps * args.batch_size * args.seq_len)
    _log(f"trained in {train_minutes:.1f} min on {tokens_seen:,} tokens")

    ppl["trained_lisa"] = _ppl(peft_model, tokenizer, held_out, args, "trained LiSA")
    generations["trained_lisa"] = _generate(peft_model, tokenizer, args, "trained LiSA")

    adapter_dir = output_dir / "adapter"
    peft_model.save_pretrained(adapter_dir)
    tokenizer.save_pretrained(adapter_dir)
    trainer.save_distillation_config(adapter_dir)

    report = qk_compression_report(peft_model)
    results: dict[str, Any] = {
        "command": " ".join(["python", "examples/train_lisa.py", *(sys.argv[1:] if argv is None else argv)]),
        "torch_threads": torch.get_num_threads(),
        "model": args.model or "HuggingFaceTB/SmolLM2-135M-Instruct (built-in)",
        "load_in_4bit": args.load_in_4bit,
        "data": args.data,
        "data_format": "chat" if chat else "text",
        "packing": packing,
        "share_layers": lisa_config.share_layers,
        "layer_choice": layer_choice,
        "lisa_config": {"rank": args.rank, "align_hidden": args.align_hidden},
        "distillation": distillation.to_dict(),
        "training": {
            "max_steps": args.max_steps,
            "batch_size": args.batch_size,
            "seq_len": args.seq_len,
            "learning_rate": args.lr,
            "tokens_seen": tokens_seen,
            "wall_minutes": round(train_minutes, 2),
            "train_loss": train_output.training_loss,
            "trainable_parameters": trainable,
            "log_history": trainer.state.log_history,
        },
        "perplexity": ppl,
        "eval": {
            "window": args.eval_window,
            "stride": args.eval_stride,
            "max_tokens": args.eval_max_tokens or None,
            "held_out_documents": len(held_out),
        },
        "qk_compression": {"ratio": report.ratio, "qk_params_original": report.qk_params_original},
        "generations": {
            "prompts": list(DEFAULT_PROMPTS),
            **generations,
        },
        "adapter_dir": str(adapter_dir),
        "total_minutes": round((time.monotonic() - run_started) / 60, 2),
    }
    (output_dir / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")

    print()
    print("=" * 100)
    for key, label in (("base", "base model"), ("untrained_lisa", "untrained LiSA"), ("trained_lisa", "trained LiSA")):
        if key in ppl:
            print(f"{label:>16} perplexity: {ppl[key]['ppl']:8.2f}")
    print(
        f"(held-out {args.data}, {ppl['trained_lisa']['num_tokens']} tokens, window {args.eval_window}, "
        f"stride {args.eval_stride})"
    )
    print(f"shared layers: {lisa_config.share_layers}; Q/K compression of the shared layers: {report.ratio:.2f}x")
    print(f"tokens seen: {tokens_seen:,}; training: {train_minutes:.1f} min; total: {results['total_minutes']} min")
    for index, prompt in enumerate(DEFAULT_PROMPTS):
        print(f"\n>>> {prompt}")
        for key in generations:
            print(f"  [{key}] {generations[key][index]!r}")
    print(f"\nadapter: {adapter_dir}; results: {output_dir / 'results.json'}")
    if not math.isfinite(ppl["trained_lisa"]["ppl"]):
        raise SystemExit("The trained perplexity is not finite.")
    return results


if __name__ == "__main__":
    main()
