"""Decode steps on a static cache in a model that mixes full and sliding-window layers, layer by layer.

A random-weight Qwen2 model with LLaMA-3-8B's layer geometry (32 query heads, 8 KV heads of 128, MLP 14,336), bf16,
4 layers: full, full, sliding, sliding (window ``--window``, 1,024 by default); the merged LiSA model shares layers
1 (full, from a full source) and 3 (sliding, from a sliding source). Both prefill ``--batch`` x ``--context`` random
tokens into a ``StaticCache`` (``generate(cache_implementation="static")``'s cache), then decode ``--steps`` greedy
steps per repetition, alternating; every decoder layer is timed by forward hooks, medians over the repetitions.

    python docs/benchmark/static_cache/mixed_window_decode.py --threads 2
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM, Qwen2Config, StaticCache

from peft_lisa import LiSAConfig
from peft_lisa.benchmark.layer_clock import LayerClock
from peft_lisa.benchmark.measure import alternating, machine_info, random_ids
from peft_lisa.benchmark.report import machine_label

LAYER_TYPES = ["full_attention", "full_attention", "sliding_attention", "sliding_attention"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=4, help="decode steps per repetition")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--window", type=int, default=1024, help="the sliding window (default 1,024)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = Qwen2Config(
        hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128, intermediate_size=14336,
        num_hidden_layers=4, vocab_size=32000, use_sliding_window=True, sliding_window=args.window,
        layer_types=LAYER_TYPES, attn_implementation="sdpa",
    )  # fmt: skip
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    merged = get_peft_model(copy.deepcopy(base), LiSAConfig(share_layers=[1, 3], rank=8)).merge_and_unload()
    models = {"base": base, "merged": merged.eval()}
    clocks = {key: LayerClock(model, torch.device("cpu")) for key, model in models.items()}
    ids = random_ids(args.batch, args.context, config.vocab_size, torch.device("cpu"), 0)
    slots = args.context + args.steps * (args.repeats + 1)
    state, times = {}, {key: [] for key in models}
    with torch.inference_mode():
        for key, model in models.items():
            cache = StaticCache(config=model.config, max_cache_len=slots)
            out = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
            state[key] = (cache, out.logits[:, -1:].argmax(-1))
        for repetition in range(args.repeats + 1):  # the first is a warm-up
            for key in alternating(list(models), repetition):
                cache, next_ids = state[key]
                clocks[key].reset()
                for _ in range(args.steps):
                    next_ids = models[key](input_ids=next_ids, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
                state[key] = (cache, next_ids)
                if repetition:
                    times[key].append([seconds * 1000 / args.steps for seconds in clocks[key].spent])
    print(f"Machine: {machine_label(machine_info(torch.device('cpu')))}")
    print(
        f"Decode step per layer (ms, median of {args.repeats}), {args.batch} x {args.context}, static cache, "
        f"sliding window {args.window}\n"
    )
    print("| model | " + " | ".join(f"layer {i} ({kind.split('_')[0]})" for i, kind in enumerate(LAYER_TYPES)) + " |")
    print("|---|" + "---:|" * len(LAYER_TYPES))
    for key in models:
        medians = [statistics.median(row[i] for row in times[key]) for i in range(len(LAYER_TYPES))]
        cells = [f"{ms:.1f} ({kind})" for ms, kind in zip(medians, clocks[key].kinds, strict=True)]
        print(f"| {key} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
