"""Train a LiSA adapter with TRL's SFTTrainer, then evaluate it on held-out text: the project's main training job.

This script is ``peft-lisa train`` (:func:`peft_lisa.jobs.train`) with the defaults of the main job: results in
``runs/train_lisa``, the base model, the untrained and the calibrated adapter measured too (``--eval-base
--eval-untrained --eval-calibrated``), on the held-out text and on a license text from another domain
(``--eval-license``), 40-token greedy generations for the built-in prompts (each checked for loops) and for 16
everyday prompts of which only the loop counts are printed (``--loop-check 16``), 60 training steps
of the LM loss plus the output KL to the base model (``--max-steps 60 --output-kl-weight 1``), and one torch thread
per idle core (``--threads``). Every other option is ``peft-lisa train``'s (``--help`` lists them all);
``--skip-base-eval`` skips the base, untrained and calibrated measurements.

What it does, in order:

1. loads the base model (default: the built-in SmolLM2-135M-Instruct, optionally 4-bit NF4 with --load-in-4bit) and
   the data (default: the Python documentation topics of ``pydoc_data``; or a .txt file, a .jsonl/.json file with a
   "text" field or chat "messages", or a ``datasets`` name). A deterministic held-out part of the data (or the
   dataset's own test split) is never trained on;
2. chooses the shared layers: --share-layers, or --share-fraction of all layers from a calibration analysis
   (``peft_lisa.analysis``: by default each layer calibrated alone and scored by the output KL to the base,
   ``--layer-score sensitivity_calibrated``; the lowest first, first layers kept full, head permutations as the
   alignment's initialisation);
3. measures the held-out sliding-window perplexity and greedy generations of the base model, and the perplexity of
   the untrained LiSA model (direct sharing with realigned heads);
4. calibrates the adapter layer by layer to the base model (``peft_lisa.calibrate``, 32 sequences x 100 Adam steps per
   shared layer; ``--no-calibrate`` skips it) and measures it;
5. samples the base model's own answers to the first 16 everyday prompts (4,096 tokens, ``--self-generated``; 0
   turns it off) and mixes them into the training data as half its tokens;
6. trains only the LiSA modules with the causal-LM loss plus the output KL to the base model (plain text: packed into
   blocks of --seq-len tokens; chat: the chat template), optionally plus attention distillation;
7. prints the base / untrained / calibrated / trained perplexity table (held-out text and license text, each vs
   base), tokens seen, wall-clock minutes and the generations (looping ones flagged), saves the adapter to
   OUTPUT_DIR/adapter and writes OUTPUT_DIR/results.json.

The default run (no arguments): SmolLM2-135M-Instruct with 15 of its 30 layers shared (--share-fraction 0.5), rank 8,
linear-only head alignment and strided rotary frequencies (the library defaults); calibration 32 x 100; then 60 steps
of 2 x 256 tokens, half pydoc, half the base model's own answers, at learning rate 2e-3 (cosine), LM loss + output KL;
perplexity on the first 4096 tokens of the held-out pydoc text and of the license text, window 256, stride 128.
Measured with 2 threads on the project's 2-core machine: held-out pydoc perplexity 13.14 (base), 58.09 (untrained),
15.04 (calibrated), 13.14 (trained, +0.0%); license text 10.60, 51.69, 14.09, 12.74 (+20%); none of the four trained
generations loops, 2 of the 16 everyday ones do (base: 0, calibrated: 5); 13.6 minutes in all (15.0 in a second run),
2.2 of them choosing the layers (``--layer-score js_matched`` takes seconds).
Measurements and choices: docs/calibration/objective.md.

Examples::

    python examples/train_lisa.py                                   # the default main job
    python examples/train_lisa.py --max-steps 20 --output-dir runs/smoke
    python examples/train_lisa.py --share-layers 4,5,6,7 --attn-kl-weight 0.1 --attn-kl-warmup-steps 40
    python examples/train_lisa.py --data chat.jsonl --load-in-4bit
"""

from __future__ import annotations

import os
import sys
from typing import Optional

import torch

from peft_lisa.cli import main as peft_lisa_main

# The main job's settings; options given on the command line come later and win (argparse keeps the last value).
DEFAULTS = ["--output-dir", "runs/train_lisa", "--eval-base", "--eval-untrained", "--eval-calibrated"]
DEFAULTS += ["--eval-license", "--max-new-tokens", "40", "--loop-check", "16"]
# After calibration (32 sequences x 100 Adam steps per layer, the default): 60 steps of the LM loss plus the output KL
# to the base model, on pydoc mixed half and half with 4,096 tokens of the base model's own answers to the first 16
# everyday prompts (fewer loops on everyday requests: docs/calibration/objective.md).
DEFAULTS += ["--max-steps", "60", "--output-kl-weight", "1", "--self-generated", "4096"]
# This script's spellings -> peft-lisa train's.
ALIASES = {"--skip-base-eval": ["--no-eval-base", "--no-eval-untrained", "--no-eval-calibrated"]}


def idle_cores() -> int:
    """Cores not busy with other processes: torch's thread count (one per usable core) minus the 1-minute load
    average, rounded, at least 1 (threads of one op waiting on a core another job holds can make a step several
    times slower)."""
    cores = torch.get_num_threads()
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # not on this platform
        return cores
    return max(1, min(cores, round(cores - load)))


def main(argv: Optional[list[str]] = None) -> int:
    """Run ``peft-lisa train`` with the main job's defaults and ``argv`` (default: the command line)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    threads = [] if any(arg.split("=")[0] == "--threads" for arg in argv) else ["--threads", str(idle_cores())]
    options = [spelling for arg in argv for spelling in ALIASES.get(arg, [arg])]
    return peft_lisa_main(["train", *DEFAULTS, *threads, *options])


if __name__ == "__main__":
    raise SystemExit(main())
