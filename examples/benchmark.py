"""Benchmark a base model against its merged LiSA model, side by side in one run.

Measures prefill and decode tokens/s over a grid of batch sizes and contexts (medians of alternating repetitions),
KV-cache bytes, peak memory, Q/K compression, and the maximum decode throughput under a fixed memory budget; writes
``results.json``, ``results.md`` and ``benchmark.png`` to ``--output-dir``.

The LiSA weights need not be trained to measure speed: by default an untrained adapter is created and merged. Pass
``--merged-model`` to benchmark a saved merged model instead.

Examples::

    # CI-size run on the built-in SmolLM2-135M (CPU, float32)
    python examples/benchmark.py --quick --output-dir bench-quick

    # The full grid on a GPU (bfloat16), 15 of 30 layers shared
    python examples/benchmark.py --device cuda --share-fraction 0.5 --output-dir bench-gpu
"""

from __future__ import annotations

import argparse
import copy
import shlex
import sys
from pathlib import Path

import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM

import peft_lisa
from peft_lisa.benchmark import default_share_layers, run_benchmark
from peft_lisa.resources import resolve_model_path
from peft_lisa.tuner.config import DEFAULT_ALIGN_HIDDEN

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
GIB = 1024**3
FULL = {"batch_sizes": [1, 8, 32], "contexts": [128, 512, 2048], "decode_tokens": 32, "repeats": 3, "warmup": 1}
QUICK = {"batch_sizes": [1, 2], "contexts": [32, 64], "decode_tokens": 4, "repeats": 1, "warmup": 0}


def int_list(text: str) -> list[int]:
    return [int(item) for item in text.replace(",", " ").split()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="base model name or path (default: built-in SmolLM2-135M)")
    parser.add_argument("--merged-model", default=None, help="a saved merged LiSA model of the same base (optional)")
    share = parser.add_mutually_exclusive_group()
    share.add_argument("--share-layers", type=int_list, default=None, help="layers to share, e.g. '4,5,6,7'")
    share.add_argument(
        "--share-fraction",
        type=float,
        default=0.5,
        help="share this fraction of the layers, spread over the deeper ones (default 0.5; see default_share_layers)",
    )
    parser.add_argument("--rank", type=int, default=8, help="LiSA rank r (default 8)")
    parser.add_argument(
        "--align-hidden", type=int, default=DEFAULT_ALIGN_HIDDEN, help="alignment FFN hidden size m (default 0)"
    )
    parser.add_argument("--batch-sizes", type=int_list, default=None, help="default '1,8,32'")
    parser.add_argument("--contexts", type=int_list, default=None, help="prompt lengths, default '128,512,2048'")
    parser.add_argument("--decode-tokens", type=int, default=None, help="decode steps timed (default 32)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repetitions, median reported (default 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed repetitions per configuration (default 1)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None, help="default: bfloat16 on GPU, float32 on CPU"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument(
        "--memory-budget-gib", type=float, default=None, help="max-throughput budget (default: base at max B, T)"
    )
    parser.add_argument("--budget-context", type=int, default=None, help="context of the max-throughput measure")
    parser.add_argument("--no-max-throughput", action="store_true", help="skip the max-throughput measure")
    parser.add_argument(
        "--memory-limit-gib", type=float, default=None, help="skip runs estimated to need more working memory"
    )
    parser.add_argument(
        "--max-prefill-tokens", type=int, default=None, help="skip configurations with batch * context above this"
    )
    parser.add_argument("--output-dir", type=Path, default=Path("benchmark-results"))
    parser.add_argument(
        "--quick",
        action="store_true",
        help="CI size defaults: batches 1,2; contexts 32,64; 4 decode steps; 1 repetition, no warm-up",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    args = parser.parse_args(argv)
    defaults = QUICK if args.quick else FULL
    for name, value in defaults.items():
        if getattr(args, name) is None:  # explicit flags win over --quick
            setattr(args, name, value)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.threads:
        torch.set_num_threads(args.threads)
    path = resolve_model_path(args.model)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    if args.merged_model:
        merged = AutoModelForCausalLM.from_pretrained(args.merged_model, dtype=dtype).to(device).eval()
    else:
        num_layers = base.config.num_hidden_layers
        share_layers = args.share_layers or default_share_layers(num_layers, args.share_fraction)
        config = peft_lisa.LiSAConfig(share_layers=share_layers, rank=args.rank, align_hidden=args.align_hidden)
        merged = get_peft_model(copy.deepcopy(base), config).merge_and_unload().to(device=device, dtype=dtype).eval()
    result = run_benchmark(
        base,
        merged,
        batch_sizes=tuple(args.batch_sizes),
        contexts=tuple(args.contexts),
        decode_tokens=args.decode_tokens,
        repeats=args.repeats,
        warmup=args.warmup,
        memory_budget_bytes=int(args.memory_budget_gib * GIB) if args.memory_budget_gib else None,
        budget_context=args.budget_context,
        max_throughput=not args.no_max_throughput,
        memory_limit_bytes=int(args.memory_limit_gib * GIB) if args.memory_limit_gib else None,
        max_prefill_tokens=args.max_prefill_tokens,
        device=device,
        progress=not args.quiet,
    )
    result.settings["command"] = shlex.join(
        ["python", *(sys.argv if argv is None else ["examples/benchmark.py", *argv])]
    )
    result.settings["model_path"] = str(path)
    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    result.to_json(out / "results.json")
    markdown = result.to_markdown()
    (out / "results.md").write_text(markdown)
    result.plot(out / "benchmark.png")
    print(markdown)
    print(f"Wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'benchmark.png'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
