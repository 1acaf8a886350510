"""How much a base model and its merged LiSA model move when run in bf16: each against itself in float32.

For the base model and the adapter merged into it, :func:`peft_lisa.evaluation.precision_agreement` runs the float32
model and a bf16 copy on the same held-out windows and prints the mean and largest per-token KL of their next-token
distributions, and both perplexities. The base's figures are the scale of bf16's own rounding; the merged model's
include the shared layers' (on a CPU where the kernel runs bf16 products on packed operands, e.g. with AMX, its
rounding of the queries it mixes: ``docs/method.md``, "Rounding the mixed queries"). Prefills longer than the
handed-logits bound take the CPU kernel, so use windows of several hundred tokens.

    peft-lisa calibrate --threads 2 --share-fraction 0.5 --no-eval --output-dir runs/cal50
    python examples/precision_agreement.py --threads 2 --adapter runs/cal50/adapter
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
from peft import PeftModel

import peft_lisa  # noqa: F401  (registers the LiSA tuner with peft)
from peft_lisa.data import load_texts
from peft_lisa.evaluation import precision_agreement
from peft_lisa.resources import load_model_and_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", required=True, help="a LiSA adapter directory (of the base model --model)")
    parser.add_argument("--model", default=None, help="base model path or hub id (default: built-in SmolLM2-135M)")
    parser.add_argument("--data", default="pydoc", help="text source, as peft-lisa's --data (its held-out part)")
    parser.add_argument("--window", type=int, default=1024, help="tokens per window")
    parser.add_argument("--windows", type=int, default=8, help="disjoint windows, from the start of the text")
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    base, tokenizer = load_model_and_tokenizer(args.model)
    merged = PeftModel.from_pretrained(copy.deepcopy(base), args.adapter).merge_and_unload()
    texts = load_texts(args.data, split="test")
    dtype = getattr(torch, args.dtype)
    results = {}
    for name, model in (("base", base), ("merged", merged)):
        results[name] = precision_agreement(
            model, tokenizer, texts, dtype, window=args.window, num_windows=args.windows
        ).to_dict()
    count = results["base"]["num_tokens"]
    windows = count // (args.window - 1)
    print(f"\n{args.dtype} against float32, {count} held-out {args.data} tokens ({windows} x {args.window}):\n")
    print(f"| model | KL mean | KL max | perplexity, float32 | perplexity, {args.dtype} |")
    print("|---|---:|---:|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['kl_mean']:.3e} | {r['kl_max']:.3e} | {r['ppl_float32']:.4f} | {r['ppl']:.4f} |")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps({"args": vars(args), "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
