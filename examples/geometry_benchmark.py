"""Per-layer decode cost of 7B-class geometries on this machine, and what it implies at full depth.

Random-weight, depth-truncated models (speed does not depend on the weights) with the layer geometry of LLaMA-2-7B
(32 heads of 128, no GQA), Llama-3-8B and Mistral-7B (8 KV heads), bf16: decode steps on a synthetic KV cache of
``--context`` tokens at ``--batch``, base and merged LiSA model alternating, every other layer shared. Prints the
table and writes ``geometry.md`` / ``geometry.json`` to ``--output-dir``
(:mod:`peft_lisa.benchmark.geometry`).

    python examples/geometry_benchmark.py --threads 2 --output-dir docs/benchmark

Where the kernel's decode rows run (CPU, the kernel built) a third model is timed beside them, the base with every
layer on those rows (as the merged model's layers are), so that the tables show what sharing alone buys
(``--no-rows-control`` leaves it out).

``--cache static`` decodes on a static cache (``StaticCache``, written in place, as ``generate(
cache_implementation="static")`` and compiled decoding use it) instead of transformers' default dynamic cache, which
copies every layer's keys and values at every step.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Optional

import torch

from peft_lisa.benchmark.geometry import GEOMETRIES, full_depth_estimate, geometry_markdown, layer_decode_times
from peft_lisa.benchmark.measure import machine_info
from peft_lisa.benchmark.report import machine_label
from peft_lisa.benchmark.results import HOOKED_CACHE_KINDS


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--geometries", default=",".join(GEOMETRIES), help="comma-separated, from " + str(list(GEOMETRIES))
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=4, help="depth of the truncated models (default 4)")
    parser.add_argument("--decode-tokens", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--share-fraction", type=float, default=0.5, help="for the full-depth estimate")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument(
        "--cache",
        choices=HOOKED_CACHE_KINDS,
        default="dynamic",
        help="the KV cache decoded on: transformers' default (dynamic) or a static one (written in place)",
    )
    parser.add_argument(
        "--rows-control",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also time the base with every layer on the kernel's decode rows (default: on CPU)",
    )
    parser.add_argument("--output-dir", default="geometry-bench")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[peft-lisa] %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for name in args.geometries.split(","):
        times = layer_decode_times(
            name, batch=args.batch, context=args.context, num_layers=args.layers,
            decode_tokens=args.decode_tokens, repeats=args.repeats, device=args.device, cache=args.cache,
            rows_control=args.rows_control,
        )  # fmt: skip
        rows.append((times, full_depth_estimate(times, args.share_fraction)))
    machine = machine_label(machine_info(torch.device(args.device)))
    table = geometry_markdown(rows)
    defaults = (("device", "cpu"), ("cache", "dynamic"))  # left out of the command, as the default
    command = "python examples/geometry_benchmark.py " + " ".join(
        _option(k, v) for k, v in vars(args).items() if v is not None and (k, v) not in defaults
    )
    markdown = f"**Machine:** {machine}  \n**Command:** `{command}`\n\n{table}"
    print(markdown)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "geometry.md").write_text(markdown, encoding="utf-8")
    payload = {"machine": machine, "command": command, "rows": [{**t.to_dict(), "full_depth": e} for t, e in rows]}
    (out / "geometry.json").write_text(json.dumps(payload, indent=2), encoding="utf-8")


def _option(name: str, value: object) -> str:
    """One option of the command line that reproduces the run."""
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return flag if value else "--no-" + flag[2:]
    return f"{flag} {value}"


if __name__ == "__main__":
    main()
