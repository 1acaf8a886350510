"""Quick start: put LiSA on half of SmolLM2-135M-Instruct's layers, inspect it, merge it, save it, reload it.

No training here (see ``examples/train_lisa.py``): the untrained adapter is "direct sharing", so its perplexity shows
how much the shared layers need training. Run: ``python examples/quickstart.py [--model PATH_OR_HUB_ID]``.
"""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path

import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM

import peft_lisa  # noqa: F401  (registers the LiSA tuner with peft and the merged model types with transformers)
from peft_lisa import LiSAConfig, qk_compression_report
from peft_lisa.data import chunk_token_ids, load_texts
from peft_lisa.resources import load_model_and_tokenizer

# The layers a calibration analysis of SmolLM2 finds most similar to their predecessor (docs/method.md prototype).
DEFAULT_SHARE = "4,5,6,7,8,13,15,18,19,22,23,24,25,26,27"


def held_out_perplexity(model, blocks: torch.Tensor) -> float:
    with torch.no_grad():
        losses = [model(input_ids=block[None], labels=block[None]).loss.item() for block in blocks]
    return math.exp(sum(losses) / len(losses))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model path or hub id (default: built-in SmolLM2-135M)")
    parser.add_argument("--share-layers", default=DEFAULT_SHARE, help="comma-separated layer indices to share")
    parser.add_argument("--rank", type=int, default=8, help="per-head rank of the low-rank Q/K (even)")
    parser.add_argument("--output-dir", default="runs/quickstart", help="where the merged model is saved")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")  # the one-off build of the default model

    model, tokenizer = load_model_and_tokenizer(args.model)
    blocks = chunk_token_ids(tokenizer, load_texts(split="test"), 256)[:8]
    print(
        f"base model perplexity (held-out pydoc, {len(blocks)} x 256 tokens): {held_out_perplexity(model, blocks):.2f}"
    )

    config = LiSAConfig(share_layers=[int(i) for i in args.share_layers.split(",")], rank=args.rank)
    peft_model = get_peft_model(model, config).eval()
    peft_model.print_trainable_parameters()
    print(f"untrained LiSA (= direct sharing) perplexity: {held_out_perplexity(peft_model, blocks):.2f}")
    print(qk_compression_report(peft_model).to_markdown())

    merged = peft_model.merge_and_unload()
    out = Path(args.output_dir)
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    print(f"merged model saved to {out}; reloaded perplexity: {held_out_perplexity(reloaded, blocks):.2f}")


if __name__ == "__main__":
    main()
