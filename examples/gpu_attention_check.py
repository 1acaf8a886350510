"""On a GPU: a shared layer's attention paths, checked against each other and timed (bf16, random weights).

1. A merged model (random weights with the geometry of ``--model``'s config, ``--share-fraction`` shared, ``full``
   mixing) computes the same logits by its default routing (fused flash calls, explicit blocks past
   ``FUSED_MAX_HEAD_DIM``) as by explicit float32 blocks everywhere, causal and left-padded.
2. The attention core of the first and the fourth link of a chain (fused head size 200 and 272 on SmolLM2 shapes) at
   1 and 8 x 2048 tokens: the base's sdpa, the fused call, and explicit blocks of 16 / 64 / 256 MiB of logits; median
   milliseconds of 10 and the peak bytes allocated above the inputs.

    python examples/gpu_attention_check.py --model HuggingFaceTB/SmolLM2-135M-Instruct --output gpu_check.txt

Speed does not depend on the weights; the model is built from the config alone.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

from peft_lisa.analysis import AttentionAnalysis
from peft_lisa.benchmark import untrained_merged
from peft_lisa.tuner.carrier import FoldedScores


def timed(fn: Callable[[], object], repeats: int = 10) -> tuple[float, float]:
    """Median milliseconds and peak MiB allocated above the level before."""
    fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3, (torch.cuda.max_memory_allocated() - before) / 2**20


def routing_check(model: str, analysis: str, fraction: float) -> list[str]:
    config = AutoConfig.from_pretrained(model)
    config._attn_implementation = "sdpa"
    base = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).cuda().eval()
    merged = untrained_merged(base, None, fraction, AttentionAnalysis.from_json(analysis), 8, 0, "full").eval()
    default = FoldedScores.attend
    lines = []
    ids = torch.randint(0, config.vocab_size, (2, 300), device="cuda")
    padding = torch.ones_like(ids)
    padding[1, :40] = 0
    with torch.no_grad():
        for name, kwargs in (("causal", {}), ("left-padded", {"attention_mask": padding})):
            routed = merged(ids, **kwargs).logits.float()
            FoldedScores.attend = lambda self, mask, value, dropout=0.0: self.attend_by_blocks(mask, value)
            try:
                explicit = merged(ids, **kwargs).logits.float()
            finally:
                FoldedScores.attend = default
            valid = padding.bool() if kwargs else slice(None)
            difference = float((routed - explicit)[valid].abs().max())
            lines.append(
                f"{name}: default routing vs explicit float32 blocks, max |diff| {difference:.4f}, "
                f"logit scale {float(explicit.abs().max()):.2f}"
            )
    return lines


def core_subjects(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scores: FoldedScores
) -> dict[str, Callable[[], object]]:
    """The base's sdpa, the shared layer's fused call and its explicit blocks of 16 / 64 / 256 MiB."""
    subjects: dict[str, Callable[[], object]] = {
        "base sdpa": lambda: F.scaled_dot_product_attention(query, key, value, is_causal=True, enable_gqa=True),
        f"fused (head {scores.head_dim})": lambda: scores.attend_fused(None, value),
    }
    for mib in (16, 64, 256):
        subjects[f"explicit {mib} MiB"] = lambda mib=mib: scores.attend_by_blocks(None, value, block_bytes=mib << 20)
    return subjects


def core_timings(heads: int = 9, kv_heads: int = 3, head_dim: int = 64, rank: int = 8) -> list[str]:
    lines = []
    options = {"device": "cuda", "dtype": torch.bfloat16}
    for batch, tokens in ((1, 2048), (8, 2048)):
        query = torch.randn(batch, heads, tokens, head_dim, **options)
        key, value = (torch.randn(batch, kv_heads, tokens, head_dim, **options) for _ in range(2))
        for links in (1, 4):
            scores = FoldedScores.from_query_key(query, key, head_dim**-0.5)
            for _ in range(links):
                mixing = torch.randn(heads, heads, device="cuda")
                q_small = torch.randn(batch, heads, tokens, rank, **options)
                k_small = torch.randn(batch, kv_heads, tokens, rank, **options)
                scores = scores.mixed(mixing, None).with_lowrank(q_small, k_small, rank**-0.5)
            subjects = core_subjects(query, key, value, scores)
            with torch.no_grad():
                results = {name: timed(fn) for name, fn in subjects.items()}
            lines.append(
                f"{batch}x{tokens} link {links}: "
                + ", ".join(f"{name} {ms:.2f} ms / +{mib:.0f} MiB" for name, (ms, mib) in results.items())
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a model directory or hub id (its config.json is enough)")
    parser.add_argument("--analysis", default="docs/analysis/smollm2_135m_analysis.json")
    parser.add_argument("--share-fraction", type=float, default=0.5)
    parser.add_argument("--output", default=None, help="also write the lines to this file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this check needs a CUDA device")
    torch.manual_seed(0)
    lines = routing_check(args.model, args.analysis, args.share_fraction) + core_timings()
    print("\n".join(lines))
    if args.output:
        with open(args.output, "w", encoding="utf-8") as handle:
            handle.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
