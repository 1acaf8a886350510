"""Where a prefill's time goes, layer by layer: the base model against its merged LiSA model.

Times real prefills (one forward over ``--batch`` x ``--context`` random ids, the cache built, the last token's
logits), the two models alternating, medians of ``--repeats``, and reads each decoder layer's time off forward hooks
(:func:`peft_lisa.benchmark.layer_clock.prefill_layer_times`). The table groups the layers by kind and, for shared
layers, by their depth in a chain of shared layers: each link after the first recomputes its earlier links' terms of
its source logits (no ``T x T`` tensor is held between layers), which is where a merged model's prefill loses time
on long inputs. Writes ``layer_times.json`` and ``layer_times.md`` to ``--output-dir``.

    taskset -c 0 python examples/prefill_by_layer.py --threads 1 \\
        --analysis docs/analysis/smollm2_135m_analysis.json --share-fraction 0.5 \\
        --output-dir docs/benchmark/prefill_by_layer

With ``--geometry`` (``llama-2-7b``, ``llama-3-8b``, ``mistral-7b``) the models are a random-weight, depth-truncated
model of that layer geometry (``--layers``, ``--dtype``, bf16 by default) and its merged copy sharing every odd layer
or ``--share-layers`` (:func:`peft_lisa.benchmark.geometry.geometry_models`), as ``examples/geometry_benchmark.py``
times decoding. Consecutive shared layers form a chain, so the second command prices links 1 to 7 of one:

    python examples/prefill_by_layer.py --threads 2 --geometry llama-2-7b --context 2048 --repeats 3 \\
        --output-dir docs/benchmark/geometry_prefill/llama-2-7b
    python examples/prefill_by_layer.py --threads 2 --geometry llama-2-7b --layers 8 --share-layers 1,2,3,4,5,6,7 \\
        --output-dir docs/benchmark/geometry_prefill/llama-2-7b_chain7

With ``--decode-steps N`` it times decode steps instead: in each repetition an untimed prefill of ``--batch`` x
``--context`` tokens, then N greedy steps on its cache (``--cache static``: a ``StaticCache``), each layer's time per
step (:func:`peft_lisa.benchmark.layer_clock.decode_layer_times`):

    python examples/prefill_by_layer.py --threads 2 --analysis docs/analysis/smollm2_135m_analysis.json \\
        --context 128 --decode-steps 32 --repeats 9 --output-dir docs/benchmark/decode_by_layer/fp32_1x128_threads2
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from pathlib import Path

import torch

from peft_lisa.benchmark.geometry import GEOMETRIES, geometry_models
from peft_lisa.benchmark.layer_clock import decode_layer_times, prefill_layer_times
from peft_lisa.benchmark.pipeline import load_benchmark_models
from peft_lisa.benchmark.results import HOOKED_CACHE_KINDS
from peft_lisa.cli_options import even_rank, layer_list
from peft_lisa.jobs.checks import load_analysis_file


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="base model (local path or hub id); default: the built-in SmolLM2-135M")
    parser.add_argument("--analysis", help="an attention analysis JSON to choose the shared layers from")
    parser.add_argument("--share-fraction", type=float, default=0.5)
    parser.add_argument("--share-layers", type=layer_list, help="layers to share, e.g. 4,5,6")
    parser.add_argument("--rank", type=even_rank, default=8)
    parser.add_argument("--head-mixing", choices=("full", "kv_group"), default="full")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--geometry", choices=sorted(GEOMETRIES), help="a truncated random model of this geometry")
    parser.add_argument("--layers", type=int, default=4, help="depth of the --geometry model (default 4)")
    parser.add_argument(
        "--dtype", choices=("bfloat16", "float32"), help="default: bfloat16 with --geometry, else float32"
    )
    parser.add_argument(
        "--decode-steps", type=int, default=0, help="time this many decode steps after the prefill instead of it"
    )
    parser.add_argument(
        "--cache",
        choices=HOOKED_CACHE_KINDS,
        default="dynamic",
        help="the KV cache of --decode-steps (default: dynamic)",
    )
    parser.add_argument("--output-dir", default="prefill-by-layer")
    args = parser.parse_args(argv)
    if args.cache != "dynamic" and not args.decode_steps:
        parser.error("--cache applies to decode steps: give --decode-steps")
    if args.geometry:
        given = [f"--{name}" for name in ("model", "analysis") if getattr(args, name) is not None]
        if given:
            parser.error(f"--geometry builds its own random-weight models: drop {', '.join(given)}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.geometry else "float32"))
    if args.geometry:
        base, merged = geometry_models(
            args.geometry, args.layers, dtype, args.rank, args.head_mixing, share_layers=args.share_layers
        )
        shared = "every odd layer" if args.share_layers is None else f"layers {args.share_layers}"
        subject = f"{args.geometry} geometry, {args.layers} random-weight layers, {shared} shared"
    else:
        analysis = load_analysis_file(args.analysis) if args.analysis else None
        base, merged, path = load_benchmark_models(
            args.model, None, args.share_layers, args.share_fraction, analysis, args.rank, 0, args.head_mixing, dtype,
            "cpu",
        )  # fmt: skip
        subject = f"{Path(path).name}, layers {merged.config.lisa['share_layers']} shared (untrained adapter)"
    shape = dict(batch=args.batch, context=args.context, repeats=args.repeats)
    if args.decode_steps:
        times = decode_layer_times(base, merged, steps=args.decode_steps, cache=args.cache, **shape)
    else:
        times = prefill_layer_times(base, merged, **shape)
    command = shlex.join(["python", "examples/prefill_by_layer.py", *(sys.argv[1:] if argv is None else argv)])
    settings = f"{subject}, rank {args.rank}, head mixing {args.head_mixing}, {str(dtype).replace('torch.', '')}"
    markdown = f"**Command:** `{command}`  \n**Models:** {settings}\n\n{times.to_markdown()}"
    print(markdown)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    record = {"command": command, "models": settings, **times.to_dict()}
    (out / "layer_times.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    (out / "layer_times.md").write_text(markdown, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
