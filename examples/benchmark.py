"""Benchmark a base model against its merged LiSA model, side by side in one run.

Measures prefill and decode tokens/s over a grid of batch sizes and contexts (medians of alternating repetitions),
KV-cache bytes, peak memory, Q/K compression, and the maximum decode throughput under a fixed memory budget; writes
``results.json``, ``results.md`` and ``benchmark.png`` to ``--output-dir``.

The LiSA weights need not be trained to measure speed: by default an untrained adapter is created and merged. Pass
``--merged-model`` to benchmark a saved merged model instead.

This script is ``peft-lisa bench`` (``peft_lisa.cli``) with two spellings of its own kept: ``--merged-model`` for
``--merged`` and ``--quiet`` for ``--no-progress``, and ``benchmark-results`` as the default output directory.
``--help`` lists every option.

Examples::

    # CI-size run on the built-in SmolLM2-135M (CPU, float32)
    python examples/benchmark.py --quick --output-dir bench-quick

    # The full grid on a GPU (bfloat16), 15 of 30 layers shared
    python examples/benchmark.py --device cuda --share-fraction 0.5 --output-dir bench-gpu
"""

from __future__ import annotations

import sys
from typing import Optional

from peft_lisa.cli import main as peft_lisa_main

# This script's spellings -> peft-lisa bench's.
ALIASES = {"--merged-model": "--merged", "--quiet": "--no-progress"}


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # The default output directory comes first: an --output-dir given on the command line wins (argparse keeps the
    # last value).
    return peft_lisa_main(["bench", "--output-dir", "benchmark-results", *(ALIASES.get(arg, arg) for arg in argv)])


if __name__ == "__main__":
    raise SystemExit(main())
