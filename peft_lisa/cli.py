"""The ``peft-lisa`` command: calibration analysis, training, evaluation, merging and the speed benchmark.

Every subcommand takes ``--model`` (a local directory or a hub id; default: the built-in SmolLM2-135M-Instruct, see
:mod:`peft_lisa.resources`) and, where it reads text, ``--data`` (``pydoc``, the built-in default; a ``.txt`` file;
a ``.jsonl``/``.json`` file with a text field or chat ``messages``; or a ``datasets`` name or directory)::

    peft-lisa analyze --output-dir lisa-analysis
    peft-lisa train --analysis lisa-analysis/analysis.json --share-fraction 0.5 --output-dir lisa-run
    peft-lisa train --output-dir lisa-run --resume latest          # continue from the last checkpoint
    peft-lisa eval --adapter lisa-run/adapter --compare-base
    peft-lisa merge --adapter lisa-run/adapter --output lisa-merged
    peft-lisa eval --merged lisa-merged
    peft-lisa bench --merged lisa-merged --quick

Bad arguments end with one line ``peft-lisa <command>: error: ...`` on stderr and exit code 2; failures while
running exit with code 1 (``--debug`` prints the Python traceback).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import sys
import textwrap
import time
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

PROG = "peft-lisa"
DTYPE_NAMES = ("float32", "bfloat16", "float16")
ADAPTER_METRICS_FILE = "lisa_metrics.json"
TRAIN_RESULTS_FILE = "results.json"
EXIT_USAGE, EXIT_FAILURE = 2, 1
TEXT_SUFFIXES = (".txt", ".jsonl", ".json")

# The benchmark grids (same as examples/benchmark.py).
BENCH_FULL = {"batch_sizes": [1, 8, 32], "contexts": [128, 512, 2048], "decode_tokens": 32, "repeats": 3, "warmup": 1}
BENCH_QUICK = {"batch_sizes": [1, 2], "contexts": [32, 64], "decode_tokens": 4, "repeats": 1, "warmup": 0}


class CLIError(Exception):
    """An expected failure: reported as one line ``peft-lisa <command>: error: <message>``, no traceback."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (with a pointer to ``--help``) and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


# --------------------------------------------------------------------------------------------------------------
# Argument types
# --------------------------------------------------------------------------------------------------------------


def layer_list(text: str) -> list[int]:
    """``"4,5,6"`` (or ``"4 5 6"``) -> ``[4, 5, 6]``; refuses layer 0, negative and repeated indices."""
    items = [item for item in re.split(r"[,\s]+", text.strip()) if item]
    try:
        layers = [int(item) for item in items]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated layer indices such as 4,5,6, got {text!r}"
        ) from None
    if not layers:
        raise argparse.ArgumentTypeError("no layer indices given (expected e.g. 4,5,6)")
    if any(layer <= 0 for layer in layers):
        raise argparse.ArgumentTypeError(
            f"{text!r} contains {sorted(layer for layer in layers if layer <= 0)}: layer 0 can never share (it has "
            "no previous layer to take attention from) and indices must be positive"
        )
    duplicates = sorted({layer for layer in layers if layers.count(layer) > 1})
    if duplicates:
        raise argparse.ArgumentTypeError(f"{text!r} lists layers {duplicates} more than once")
    return sorted(layers)


def int_list(text: str) -> list[int]:
    """``"1,8,32"`` -> ``[1, 8, 32]`` (positive integers)."""
    try:
        values = [int(item) for item in re.split(r"[,\s]+", text.strip()) if item]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}") from None
    if not values or any(value <= 0 for value in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def positive_float(text: str) -> float:
    value = non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number strictly between 0 and 1, got {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number strictly between 0 and 1, got {text!r}")
    return value


def even_rank(text: str) -> int:
    value = positive_int(text)
    if value % 2:
        raise argparse.ArgumentTypeError(f"the rank must be even (rotary embeddings rotate pairs), got {value}")
    return value


def held_out(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}")
    return value


# --------------------------------------------------------------------------------------------------------------
# Parser
# --------------------------------------------------------------------------------------------------------------

_DATA_HELP = (
    "'pydoc' (built-in Python documentation, the default), a .txt file (documents separated by blank lines), a "
    ".jsonl/.json file (a text field, or chat 'messages'), or a datasets name/directory"
)
_MODEL_HELP = "base model: a local directory or a hub id (default: the built-in SmolLM2-135M-Instruct)"


def _common_parent() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("general")
    group.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    group.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    group.add_argument("--no-progress", action="store_true", help="no progress bars")
    group.add_argument("--debug", action="store_true", help="print the Python traceback of a failure")
    return parent


def _data_parent(default_split: str) -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("data")
    group.add_argument("--data", default="pydoc", help=_DATA_HELP)
    group.add_argument(
        "--text-field", default="text", help="text field of JSON records / dataset rows (default: text)"
    )
    group.add_argument(
        "--split",
        choices=("train", "test", "all"),
        default=default_split,
        help=f"which part of the data to use (default: {default_split}; 'test' is the dataset's own test split or "
        "the deterministic held-out part)",
    )
    group.add_argument(
        "--held-out-fraction",
        type=held_out,
        default=0.1,
        help="fraction of documents held out as 'test' when the data has no test split (default: 0.1)",
    )
    return parent


def _add_eval_options(group: Any, prefix: str = "") -> None:
    """Perplexity options; ``prefix="eval-"`` gives the ``train``/``merge`` spelling (``--eval-window``...)."""
    group.add_argument(f"--{prefix}window", type=positive_int, default=256, help="perplexity window (default: 256)")
    group.add_argument(f"--{prefix}stride", type=positive_int, default=128, help="perplexity stride (default: 128)")
    group.add_argument(
        f"--{prefix}max-tokens",
        type=non_negative_int,
        default=4096,
        help="evaluate on the first N tokens of the held-out text (default: 4096; 0 = all)",
    )
    group.add_argument(
        f"--{prefix}batch-size", type=positive_int, default=8, help="perplexity windows per forward (default: 8)"
    )


_MAIN_EPILOG = """\
examples:
  peft-lisa analyze --output-dir lisa-analysis
  peft-lisa train --analysis lisa-analysis/analysis.json --share-fraction 0.5 --output-dir lisa-run
  peft-lisa train --output-dir lisa-run --resume latest
  peft-lisa eval --adapter lisa-run/adapter --compare-base
  peft-lisa merge --adapter lisa-run/adapter --output lisa-merged
  peft-lisa eval --merged lisa-merged
  peft-lisa bench --merged lisa-merged --quick

Run 'peft-lisa <command> --help' for the options of a command. Bad arguments exit with code 2 and one line
'peft-lisa <command>: error: ...'; failures while running exit with code 1 (--debug prints the traceback)."""


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(
        prog=PROG,
        description="LiSA cross-layer attention sharing as a PEFT tuner: analyse a model, train a LiSA adapter, "
        "evaluate it, merge it into a compact model, and benchmark its speed.",
        epilog=_MAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="<command>", parser_class=_Parser)
    common = _common_parent()
    raw = argparse.RawDescriptionHelpFormatter

    # ---- analyze -------------------------------------------------------------------------------------------------
    analyze = commands.add_parser(
        "analyze",
        parents=[common, _data_parent("train")],
        help="calibration analysis: attention similarity of adjacent layers, suggested share_layers",
        description="Measure how similar every layer's attention is to its predecessor's (Jensen-Shannon divergence "
        "with the best head matching) and, optionally, how much the loss rises when each layer alone shares. Writes "
        "OUTPUT_DIR/analysis.json, OUTPUT_DIR/attention_heatmap.png and OUTPUT_DIR/attention_layers.png, prints a "
        "table per layer and the share_layers suggested for --fraction.",
        epilog="example:\n  peft-lisa analyze --max-batches 2 --output-dir lisa-analysis\n"
        "  peft-lisa train --analysis lisa-analysis/analysis.json --share-fraction 0.5",
        formatter_class=raw,
    )
    analyze.add_argument("--model", default=None, help=_MODEL_HELP)
    group = analyze.add_argument_group("analysis")
    group.add_argument("--seq-len", type=positive_int, default=256, help="tokens per sequence (default: 256)")
    group.add_argument("--batch-size", type=positive_int, default=4, help="sequences per forward (default: 4)")
    group.add_argument("--max-batches", type=positive_int, default=8, help="calibration batches (default: 8)")
    group.add_argument(
        "--no-sensitivity",
        action="store_true",
        help="skip the per-layer sensitivity (one extra forward pass per layer)",
    )
    group.add_argument(
        "--fraction", type=fraction, default=0.5, help="fraction of all layers to suggest for sharing (default: 0.5)"
    )
    group.add_argument("--keep-first", type=non_negative_int, default=2, help="first layers kept full (default: 2)")
    group.add_argument(
        "--score",
        default="js_matched",
        choices=("js_matched", "js_indexed", "js_matched_grouped", "sensitivity_direct", "sensitivity_permuted"),
        help="score ranking the layers (lower shares first; default: js_matched)",
    )
    analyze.add_argument("--output-dir", "--output", default="lisa-analysis", help="default: lisa-analysis")

    # ---- train ---------------------------------------------------------------------------------------------------
    train = commands.add_parser(
        "train",
        parents=[common, _data_parent("train")],
        help="train a LiSA adapter (TRL SFTTrainer, checkpoints, resume)",
        description="Train a LiSA adapter with TRL's SFTTrainer (only the LiSA modules train): plain text is packed "
        "into blocks of --seq-len tokens, chat data uses the chat template. Checkpoints go to "
        "OUTPUT_DIR/checkpoint-STEP every --save-steps steps; --resume continues from one. At the end the held-out "
        "perplexity is measured (--no-eval to skip) and the adapter is saved atomically to OUTPUT_DIR/adapter with a "
        "model card, the tokenizer and lisa_metrics.json; OUTPUT_DIR/results.json holds the run's summary. "
        "--data selects the training text; perplexity uses its held-out part (--split only applies to training).",
        epilog="examples:\n"
        "  peft-lisa train --share-layers 4,5,6,7,8 --max-steps 120 --output-dir lisa-run\n"
        "  peft-lisa train --share-fraction 0.5 --analysis lisa-analysis/analysis.json --output-dir lisa-run\n"
        "  peft-lisa train --output-dir lisa-run --max-steps 240 --resume latest\n"
        "  peft-lisa train --data chat.jsonl --load-in-4bit --attn-kl-weight 0.1",
        formatter_class=raw,
    )
    train.add_argument("--model", default=None, help=_MODEL_HELP)
    train.add_argument("--load-in-4bit", action="store_true", help="load the base model in 4-bit NF4 (bitsandbytes)")
    lisa = train.add_argument_group("LiSA adapter")
    choice = lisa.add_mutually_exclusive_group()
    choice.add_argument("--share-layers", type=layer_list, default=None, help="layers to share, e.g. 4,5,6,7")
    choice.add_argument(
        "--share-fraction",
        type=fraction,
        default=None,
        help="share this fraction of all layers, chosen by the calibration analysis (default: 0.5)",
    )
    lisa.add_argument(
        "--analysis",
        default=None,
        help="analysis.json from 'peft-lisa analyze' to choose the layers from (else an analysis is run first and "
        "saved to OUTPUT_DIR/analysis.json); with --share-layers it gives their initial head permutations",
    )
    lisa.add_argument("--keep-first", type=non_negative_int, default=2, help="first layers kept full (default: 2)")
    lisa.add_argument(
        "--analysis-batches",
        type=positive_int,
        default=2,
        help="batches of 4 x 256 tokens for the analysis run by train (default: 2)",
    )
    lisa.add_argument("--rank", type=even_rank, default=None, help="per-head rank of the low-rank Q/K (default: 8)")
    lisa.add_argument(
        "--align-hidden",
        type=non_negative_int,
        default=None,
        help="hidden size of the head-alignment FFN (default: 0 = linear only; 4 x heads is the widest tested)",
    )
    group = train.add_argument_group("training")
    group.add_argument("--max-steps", type=positive_int, default=120, help="optimizer steps (default: 120)")
    group.add_argument("--seq-len", type=positive_int, default=256, help="tokens per sequence (default: 256)")
    group.add_argument("--batch-size", type=positive_int, default=2, help="sequences per step (default: 2)")
    group.add_argument("--lr", type=positive_float, default=2e-3, help="peak learning rate, cosine (default: 2e-3)")
    group.add_argument(
        "--packing",
        choices=("auto", "yes", "no"),
        default="auto",
        help="pack texts into full blocks (auto: yes for plain text, no for chat data)",
    )
    group.add_argument(
        "--gradient-checkpointing", action="store_true", help="non-reentrant activation checkpointing (less memory)"
    )
    group.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    group.add_argument("--logging-steps", type=positive_int, default=10, help="log every N steps (default: 10)")
    group.add_argument("--save-steps", type=positive_int, default=50, help="checkpoint every N steps (default: 50)")
    group.add_argument(
        "--save-total-limit", type=positive_int, default=2, help="checkpoints kept, oldest deleted (default: 2)"
    )
    group.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        metavar="PATH|latest",
        help="continue from a checkpoint directory, or from the last one in OUTPUT_DIR ('latest', also the value "
        "of a bare --resume); the adapter's layers and shape come from the checkpoint",
    )
    distill = train.add_argument_group("distillation (off by default)")
    distill.add_argument("--attn-kl-weight", type=non_negative_float, default=0.0, help="attention KL weight")
    distill.add_argument(
        "--attn-kl-warmup-steps",
        type=non_negative_int,
        default=0,
        help="decay the attention KL weight linearly to 0 over this many steps (0: constant weight)",
    )
    distill.add_argument(
        "--output-kl-weight", type=non_negative_float, default=0.0, help="weight of the KL to the base model's output"
    )
    distill.add_argument("--temperature", type=positive_float, default=1.0, help="output KL temperature (default 1)")
    group = train.add_argument_group("evaluation after training")
    group.add_argument(
        "--eval",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="measure the held-out perplexity of the trained adapter (default: on)",
    )
    group.add_argument("--eval-base", action="store_true", help="also measure the base model's perplexity")
    _add_eval_options(group, "eval-")
    train.add_argument("--output-dir", "--output", default="lisa-run", help="default: lisa-run")

    # ---- eval ----------------------------------------------------------------------------------------------------
    evaluate = commands.add_parser(
        "eval",
        parents=[common, _data_parent("test")],
        help="held-out perplexity and greedy sample generations",
        description="Sliding-window perplexity on held-out text and greedy generations of a base model, a LiSA "
        "adapter on its base model (--adapter), or a merged LiSA model (--merged).",
        epilog="examples:\n  peft-lisa eval --adapter lisa-run/adapter --compare-base\n"
        "  peft-lisa eval --merged lisa-merged --json eval.json\n"
        "  peft-lisa eval --model HuggingFaceTB/SmolLM2-360M-Instruct --data notes.txt --prompts 'Hello!'",
        formatter_class=raw,
    )
    evaluate.add_argument(
        "--model",
        default=None,
        help="base model: a local directory or a hub id (default: the one recorded in --adapter/--merged, else the "
        "built-in SmolLM2-135M-Instruct)",
    )
    which = evaluate.add_mutually_exclusive_group()
    which.add_argument("--adapter", default=None, help="a LiSA adapter directory (applied to --model)")
    which.add_argument("--merged", default=None, help="a merged LiSA model directory ('peft-lisa merge')")
    evaluate.add_argument(
        "--compare-base", action="store_true", help="with --adapter: also evaluate the base model (adapter disabled)"
    )
    evaluate.add_argument("--dtype", choices=DTYPE_NAMES, default="float32", help="weights dtype (default: float32)")
    group = evaluate.add_argument_group("perplexity")
    group.add_argument("--no-perplexity", action="store_true", help="skip the perplexity")
    _add_eval_options(group)
    group = evaluate.add_argument_group("generation")
    group.add_argument(
        "--prompts",
        nargs="+",
        default=None,
        metavar="PROMPT",
        help="prompts for greedy generation, or one .txt file with a prompt per line (default: four built-in ones)",
    )
    group.add_argument(
        "--max-new-tokens", type=non_negative_int, default=40, help="tokens per generation (default: 40; 0 = none)"
    )
    evaluate.add_argument("--json", default=None, metavar="FILE", help="also write the results to this JSON file")

    # ---- merge ---------------------------------------------------------------------------------------------------
    merge = commands.add_parser(
        "merge",
        parents=[common, _data_parent("test")],
        help="merge a LiSA adapter into a standalone compact model directory",
        description="Load the base model and a LiSA adapter, merge_and_unload() (the shared layers lose "
        "q_proj/k_proj), and save the merged model and tokenizer atomically to OUTPUT with a model card. The card "
        "carries the perplexity recorded with the adapter (lisa_metrics.json or its README), or the one measured "
        "with --eval. The saved model is reloaded and checked against the in-memory one.",
        epilog="example:\n  peft-lisa merge --adapter lisa-run/adapter --output lisa-merged\n"
        '  python -c "import peft_lisa, transformers; '
        "transformers.AutoModelForCausalLM.from_pretrained('lisa-merged')\"",
        formatter_class=raw,
    )
    merge.add_argument("--adapter", required=True, help="the LiSA adapter directory")
    merge.add_argument("--output", "--output-dir", required=True, help="directory for the merged model")
    merge.add_argument(
        "--model",
        default=None,
        help="base model: a local directory or a hub id (default: the one recorded in the adapter)",
    )
    merge.add_argument("--dtype", choices=DTYPE_NAMES, default="float32", help="saved dtype (default: float32)")
    merge.add_argument("--no-verify", action="store_true", help="skip reloading the saved model to check it")
    group = merge.add_argument_group("evaluation (with --eval)")
    group.add_argument("--eval", action="store_true", help="measure the merged model's held-out perplexity")
    _add_eval_options(group, "eval-")

    # ---- bench ---------------------------------------------------------------------------------------------------
    bench = commands.add_parser(
        "bench",
        parents=[common],
        help="speed benchmark: base model vs merged LiSA model",
        description="Measure prefill and decode tokens/s of the base model and a merged LiSA model side by side, "
        "KV-cache bytes, peak memory, Q/K compression and the maximum decode throughput under a memory budget. "
        "Writes OUTPUT_DIR/results.json, results.md and benchmark.png. Without --merged an untrained adapter is "
        "merged (speed does not depend on the weights).",
        epilog="examples:\n  peft-lisa bench --quick --output-dir lisa-bench\n"
        "  peft-lisa bench --merged lisa-merged --device cuda --batch-sizes 1,8 --contexts 512,2048",
        formatter_class=raw,
    )
    bench.add_argument(
        "--model",
        default=None,
        help="base model: a local directory or a hub id (default: the one recorded in --merged, else the built-in "
        "SmolLM2-135M-Instruct)",
    )
    which = bench.add_mutually_exclusive_group()
    which.add_argument("--merged", default=None, help="a merged LiSA model directory of the same base")
    which.add_argument("--share-layers", type=layer_list, default=None, help="layers to share, e.g. 4,5,6,7")
    which.add_argument(
        "--share-fraction",
        type=fraction,
        default=None,
        help="share this fraction of the layers (default: 0.5), from --analysis if given, else spread over the "
        "deeper layers",
    )
    bench.add_argument("--analysis", default=None, help="analysis.json to choose the --share-fraction layers from")
    bench.add_argument("--rank", type=even_rank, default=8, help="LiSA rank r (default: 8)")
    bench.add_argument(
        "--align-hidden", type=non_negative_int, default=0, help="alignment FFN size (default: 0 = linear only)"
    )
    group = bench.add_argument_group("grid")
    group.add_argument("--quick", action="store_true", help="CI size: batches 1,2; contexts 32,64; 4 decode steps")
    group.add_argument("--batch-sizes", type=int_list, default=None, help="default: 1,8,32")
    group.add_argument("--contexts", type=int_list, default=None, help="prompt lengths (default: 128,512,2048)")
    group.add_argument("--decode-tokens", type=positive_int, default=None, help="decode steps timed (default: 32)")
    group.add_argument("--repeats", type=positive_int, default=None, help="timed repetitions, median (default: 3)")
    group.add_argument("--warmup", type=non_negative_int, default=None, help="untimed repetitions (default: 1)")
    group.add_argument("--dtype", choices=DTYPE_NAMES, default=None, help="default: bfloat16 on GPU, float32 on CPU")
    group.add_argument("--memory-budget-gib", type=positive_float, default=None, help="max-throughput memory budget")
    group.add_argument("--budget-context", type=positive_int, default=None, help="context of the max-throughput run")
    group.add_argument("--no-max-throughput", action="store_true", help="skip the max-throughput measure")
    group.add_argument(
        "--memory-limit-gib", type=positive_float, default=None, help="skip runs estimated to need more memory"
    )
    group.add_argument(
        "--max-prefill-tokens", type=positive_int, default=None, help="skip configurations with batch x context above"
    )
    bench.add_argument("--output-dir", "--output", default="lisa-bench", help="default: lisa-bench")
    for sub in commands.choices.values():  # raw formatting keeps the epilogs' examples; wrap the descriptions
        sub.description = textwrap.fill(sub.description, width=100)
    return parser


# --------------------------------------------------------------------------------------------------------------
# Helpers: logging, checks, loading
# --------------------------------------------------------------------------------------------------------------


def _log(message: str) -> None:
    print(f"[{PROG}] {message}", file=sys.stderr, flush=True)


def _looks_like_path(name: str) -> bool:
    """Whether ``name`` is meant as a local path rather than a hub id (``org/name`` or ``name``)."""
    return (
        os.path.isabs(name)
        or name.startswith(("./", "../", "~", ".\\", "..\\"))
        or name in (".", "..")
        or name.count("/") > 1
        or "\\" in name
    )


def _check_model_arg(name: Optional[str], option: str = "--model") -> None:
    if name is None:
        return
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise CLIError(f"{option} {name}: not a model directory (it has no config.json)")
    elif _looks_like_path(name):
        raise CLIError(f"{option} {name}: no such directory")


def _check_data_arg(data: str) -> None:
    if data == "pydoc":
        return
    path = Path(data).expanduser()
    if path.suffix.lower() in TEXT_SUFFIXES and not path.is_file():
        raise CLIError(f"--data {data}: no such file")
    if not path.exists() and _looks_like_path(data):
        raise CLIError(f"--data {data}: no such file or directory")


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise CLIError(f"{path} is not valid JSON ({error.msg}); expected {what}") from None
    if not isinstance(data, dict):
        raise CLIError(f"{path} holds a {type(data).__name__}; expected {what}")
    return data


def check_adapter_dir(name: str, option: str = "--adapter") -> tuple[Path, dict[str, Any]]:
    """The path and ``adapter_config.json`` of a LiSA adapter directory; a :class:`CLIError` if it is not one."""
    path = Path(name).expanduser()
    if not path.exists():
        raise CLIError(f"{option} {name}: no such directory")
    if not path.is_dir():
        raise CLIError(f"{option} {name}: not a directory")
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        hint = " (it is a merged model: use --merged)" if (path / "config.json").is_file() else ""
        raise CLIError(f"{option} {name}: not a PEFT adapter directory (no adapter_config.json){hint}")
    config = _read_json(config_file, "a PEFT adapter config")
    peft_type = config.get("peft_type")
    if peft_type != "LISA":
        raise CLIError(f"{option} {name}: not a LiSA adapter (its peft_type is {peft_type!r}, expected 'LISA')")
    if not (path / "adapter_model.safetensors").is_file():
        raise CLIError(f"{option} {name}: the adapter has no adapter_model.safetensors (an interrupted save?)")
    return path, config


def check_merged_dir(name: str, option: str = "--merged") -> tuple[Path, dict[str, Any]]:
    """The path and ``config.json`` of a merged LiSA model directory; a :class:`CLIError` if it is not one."""
    path = Path(name).expanduser()
    if not path.exists():
        raise CLIError(f"{option} {name}: no such directory")
    if not path.is_dir():
        raise CLIError(f"{option} {name}: not a directory")
    config_file = path / "config.json"
    if not config_file.is_file():
        hint = " (it is an adapter: use --adapter)" if (path / "adapter_config.json").is_file() else ""
        raise CLIError(f"{option} {name}: not a model directory (no config.json){hint}")
    config = _read_json(config_file, "a model config")
    model_type = str(config.get("model_type", ""))
    if not model_type.startswith("lisa_") or not isinstance(config.get("lisa"), dict):
        raise CLIError(
            f"{option} {name}: not a merged LiSA model (model_type {model_type!r}; 'peft-lisa merge' makes one)"
        )
    return path, config


def _load_analysis(name: str) -> Any:
    from .analysis import AttentionAnalysis

    path = Path(name).expanduser()
    if not path.is_file():
        raise CLIError(f"--analysis {name}: no such file")
    try:
        return AttentionAnalysis.from_json(path)
    except ValueError as error:
        raise CLIError(f"--analysis {name}: {error}") from None


def _base_from_hint(hint: Optional[str]) -> Optional[str]:
    """The base model recorded in an adapter or merged model, as a ``--model`` value (None: the built-in one)."""
    from .resources import DEFAULT_MODEL, DEFAULT_MODEL_DIRNAME

    if not hint or hint == DEFAULT_MODEL:
        return None
    path = Path(hint).expanduser()
    if path.is_dir():
        return hint
    if path.name == DEFAULT_MODEL_DIRNAME and _looks_like_path(hint):
        return None  # the built-in model's cache directory on another machine
    if _looks_like_path(hint):
        raise CLIError(f"the recorded base model {hint} does not exist on this machine: pass --model")
    return hint


def _device(name: Optional[str]) -> Any:
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CLIError(f"--device {name}: not a device (expected cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: CUDA is not available on this machine")
    return device


def _dtype(name: Optional[str]) -> Any:
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name or "float32"]


def _load_base(name: Optional[str], **kwargs: Any) -> tuple[Any, Any]:
    from .resources import load_model_and_tokenizer

    label = name or "the built-in SmolLM2-135M-Instruct"
    _log(f"loading {label}")
    try:
        return load_model_and_tokenizer(name, **kwargs)
    except OSError as error:
        raise CLIError(f"could not load the model {label}: {error}", EXIT_FAILURE) from None


def _model_label(name: Optional[str]) -> str:
    from .resources import DEFAULT_MODEL

    return name or f"{DEFAULT_MODEL} (built-in)"


def _eval_settings(args: argparse.Namespace, prefix: str = "") -> dict[str, Any]:
    get = lambda key: getattr(args, prefix + key)  # noqa: E731
    window, stride = get("window"), get("stride")
    if stride > window:
        flag = f"--{prefix.replace('_', '-')}stride"
        raise CLIError(f"{flag} {stride} is larger than the window {window}: every token must be scored")
    if window < 2:
        raise CLIError(f"--{prefix.replace('_', '-')}window must be at least 2")
    if get("max_tokens") == 1:
        raise CLIError(f"--{prefix.replace('_', '-')}max-tokens must be 0 (all) or at least 2")
    return {
        "window": window,
        "stride": stride,
        "max_tokens": get("max_tokens") or None,
        "batch_size": get("batch_size"),
    }


def _held_out_texts(args: argparse.Namespace, tokenizer: Any, split: str = "test") -> list[str]:
    from .training import evaluation_texts, load_sft_dataset

    dataset = load_sft_dataset(args.data, split, args.text_field, args.held_out_fraction)
    return evaluation_texts(dataset, tokenizer)


def _measure_perplexity(
    model: Any, tokenizer: Any, texts: list[str], settings: dict[str, Any], progress: bool, label: str
) -> dict[str, Any]:
    from .evaluation import perplexity

    started = time.monotonic()
    result = perplexity(model, tokenizer, texts, progress=progress, **settings)
    seconds = time.monotonic() - started
    _log(f"{label} perplexity: {result.ppl:.2f} ({result.num_tokens} tokens, {seconds:.0f} s)")
    return {**result.to_dict(), "seconds": round(seconds, 1)}


def _ppl_text(result: dict[str, Any], data: str, split: str) -> str:
    return (
        f"{result['ppl']:.2f} ({data} {split}, {result['num_tokens']:,} tokens, window {result['window']}, "
        f"stride {result['stride']})"
    )


def _ppl_card_key(result: dict[str, Any], data: str, split: str, note: str = "") -> str:
    return (
        f"Perplexity ({data} {split}, {result['num_tokens']:,} tokens, window {result['window']}, "
        f"stride {result['stride']}{note})"
    )


def _card_metrics(
    rank: int, align_hidden: Optional[int], metrics: Optional[dict[str, Any]], note: str = ""
) -> dict[str, Any]:
    """Lines for the model card: the LiSA shape, then the perplexities of ``metrics`` (lisa_metrics.json form)."""
    card: dict[str, Any] = {"LiSA rank r (per head)": rank}
    if align_hidden is not None:
        card["Head-alignment FFN hidden size"] = align_hidden
    measured = (metrics or {}).get("perplexity")
    if measured and metrics.get("base_quantization"):
        note = f"; {metrics['base_quantization']} base{note}"
    if measured:
        key = _ppl_card_key(measured, metrics.get("data", "?"), metrics.get("split", "test"), note)
        card[key] = f"{measured['ppl']:.2f}"
    else:
        card["Perplexity"] = "not measured for this artifact"
    base = (metrics or {}).get("base_perplexity")
    if base:
        key = _ppl_card_key(base, metrics.get("data", "?"), metrics.get("split", "test"), "; base model")
        card[key] = f"{base['ppl']:.2f}"
    return card


def _dump(data: Any) -> str:
    return json.dumps(data, indent=2, default=str) + "\n"


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(f".{path.name}.tmp")
    scratch.write_text(text, encoding="utf-8")
    os.replace(scratch, path)


def _disable_progress_bars() -> None:
    """Turn off the progress bars of transformers (weight loading) and datasets (tokenizing, packing)."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:  # pragma: no cover - datasets is only needed for training
        pass


def _set_threads(args: argparse.Namespace) -> None:
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)


# --------------------------------------------------------------------------------------------------------------
# analyze
# --------------------------------------------------------------------------------------------------------------


def cmd_analyze(args: argparse.Namespace) -> int:
    _check_model_arg(args.model)
    _check_data_arg(args.data)
    device = _device(args.device)
    if args.no_sensitivity and args.score.startswith("sensitivity"):
        raise CLIError(f"--score {args.score} needs the sensitivity, which --no-sensitivity skips")
    from .analysis import analyze, choose_share_layers
    from .training import evaluation_texts, load_sft_dataset

    model, tokenizer = _load_base(args.model)
    model.to(device)
    texts = evaluation_texts(
        load_sft_dataset(args.data, args.split, args.text_field, args.held_out_fraction), tokenizer
    )
    _log(
        f"analysing on {args.data} ({args.split}, {len(texts)} documents): up to {args.max_batches} batches of "
        f"{args.batch_size} x {args.seq_len} tokens{'' if args.no_sensitivity else ', with sensitivity'}"
    )
    started = time.monotonic()
    analysis = analyze(
        model,
        tokenizer,
        texts,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        max_batches=args.max_batches,
        sensitivity=not args.no_sensitivity,
        progress=not args.no_progress,
    )
    seconds = time.monotonic() - started
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    scratch = out / ".analysis.json.tmp"
    analysis.to_json(scratch)
    os.replace(scratch, out / "analysis.json")
    written = [out / "analysis.json"]
    try:
        written.append(Path(analysis.plot_heatmap(out / "attention_heatmap.png")))
        written.append(Path(analysis.plot_layers(out / "attention_layers.png")))
    except ImportError as error:
        _log(f"no plots: {error} (pip install matplotlib)")

    print(analysis.summary_table())
    print()
    print(
        f"{analysis.num_sequences} sequences x {analysis.seq_len} tokens, {analysis.query_rows} query rows each; "
        f"JS divergences in bits, loss rises in nats ({seconds:.0f} s)"
    )
    try:
        layers = choose_share_layers(analysis, fraction=args.fraction, keep_first=args.keep_first, score=args.score)
    except ValueError as error:
        print(f"no share_layers suggestion: {error}")
    else:
        print(
            f"suggested share_layers ({len(layers)} of {analysis.num_layers} layers, fraction {args.fraction}, "
            f"lowest {args.score}, first {args.keep_first} kept full): {','.join(map(str, layers))}"
        )
        model_flag = f" --model {shlex.quote(args.model)}" if args.model else ""
        print(
            f"train with: {PROG} train{model_flag} --analysis {shlex.quote(str(out / 'analysis.json'))} "
            f"--share-fraction {args.fraction}"
        )
    print("wrote " + ", ".join(str(path) for path in written))
    return 0


# --------------------------------------------------------------------------------------------------------------
# train
# --------------------------------------------------------------------------------------------------------------


def _find_checkpoint(resume: str, output_dir: Path) -> Path:
    from transformers.trainer_utils import get_last_checkpoint

    if resume == "latest":
        last = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
        if last is None:
            raise CLIError(f"--resume latest: no checkpoint-* directory in {output_dir}")
        return Path(last)
    path = Path(resume).expanduser()
    if not path.is_dir():
        raise CLIError(f"--resume {resume}: no such directory")
    if not (path / "trainer_state.json").is_file() or not (path / "adapter_config.json").is_file():
        raise CLIError(f"--resume {resume}: not a training checkpoint (no trainer_state.json / adapter_config.json)")
    return path


def _config_from_checkpoint(checkpoint: Path, args: argparse.Namespace) -> Any:
    """The LiSA config of the checkpoint's adapter, refusing conflicting --share-layers/--rank/--align-hidden."""
    from .tuner.config import LiSAConfig

    _, saved = check_adapter_dir(str(checkpoint), "--resume")
    for option, key, value in (
        ("--share-layers", "share_layers", args.share_layers),
        ("--rank", "rank", args.rank),
        ("--align-hidden", "align_hidden", args.align_hidden),
    ):
        if value is not None and saved.get(key) != value:
            raise CLIError(f"{option} {value} differs from the checkpoint's {key}={saved.get(key)} ({checkpoint})")
    keys = ("share_layers", "rank", "align_hidden", "align_activation", "align_init_permutations")
    keys += ("rotary_frequencies", "init_lowrank")
    return LiSAConfig(task_type="CAUSAL_LM", **{key: saved[key] for key in keys if key in saved})


def _choose_config(args: argparse.Namespace, model: Any, tokenizer: Any, train_texts: list[str], out: Path) -> tuple:
    """The LiSAConfig of a new run and a description of how its layers were chosen."""
    from .tuner.config import DEFAULT_ALIGN_HIDDEN, LiSAConfig

    align_hidden = DEFAULT_ALIGN_HIDDEN if args.align_hidden is None else args.align_hidden
    common = dict(rank=args.rank or 8, align_hidden=align_hidden, task_type="CAUSAL_LM")
    num_layers = model.config.num_hidden_layers
    analysis = args.analysis_data
    if analysis is not None and analysis.num_layers != num_layers:
        raise CLIError(f"--analysis {args.analysis} is of a model with {analysis.num_layers} layers, not {num_layers}")
    if args.share_layers is not None:
        beyond = [layer for layer in args.share_layers if layer >= num_layers]
        if beyond:
            raise CLIError(
                f"--share-layers {beyond} out of range: the model has {num_layers} layers (valid: 1..{num_layers - 1})"
            )
        permutations = None
        if analysis is not None:
            permutations = {layer: analysis.permutations[layer] for layer in args.share_layers}
            permutations = {k: v for k, v in permutations.items() if v is not None} or None
        config = LiSAConfig(share_layers=args.share_layers, align_init_permutations=permutations, **common)
        return config, {"method": "explicit", "analysis": args.analysis}
    fraction_ = 0.5 if args.share_fraction is None else args.share_fraction
    if analysis is None:
        from .analysis import analyze

        _log(f"calibration analysis for --share-fraction {fraction_} ({args.analysis_batches} batch(es) of 4 x 256)")
        analysis = analyze(
            model,
            tokenizer,
            train_texts,
            seq_len=256,
            batch_size=4,
            max_batches=args.analysis_batches,
            sensitivity=False,
            progress=not args.no_progress,
        )
        analysis_file = out / "analysis.json"
        analysis.to_json(analysis_file)  # creates the output directory
    else:
        analysis_file = Path(args.analysis)
    try:
        config = LiSAConfig.from_analysis(analysis, fraction=fraction_, keep_first=args.keep_first, **common)
    except ValueError as error:
        raise CLIError(f"--share-fraction {fraction_}: {error}") from None
    info = {"method": "analysis (js_matched)", "fraction": fraction_, "keep_first": args.keep_first}
    return config, {**info, "analysis": str(analysis_file)}


def _save_adapter_dir(
    peft_model: Any, tokenizer: Any, path: Path, card: dict[str, Any], extra_files: dict[str, str]
) -> None:
    """Adapter, model card, tokenizer and extra files, all moved into ``path`` at once (atomic)."""
    from .tuner.artifacts import atomic_directory, save_adapter

    with atomic_directory(path) as scratch:
        save_adapter(peft_model, scratch, metrics=card)
        tokenizer.save_pretrained(scratch)
        for name, text in extra_files.items():
            (scratch / name).write_text(text, encoding="utf-8")


def cmd_train(args: argparse.Namespace) -> int:
    _check_model_arg(args.model)
    _check_data_arg(args.data)
    device = _device(args.device)
    out = Path(args.output_dir)
    eval_settings = _eval_settings(args, "eval_") if args.eval else None
    checkpoint = _find_checkpoint(args.resume, out) if args.resume else None
    if checkpoint is not None and (args.share_fraction is not None or args.analysis):
        raise CLIError("--resume takes the shared layers from the checkpoint: drop --share-fraction/--analysis")
    if args.attn_kl_warmup_steps and not args.attn_kl_weight:
        raise CLIError("--attn-kl-warmup-steps needs --attn-kl-weight > 0")
    args.analysis_data = _load_analysis(args.analysis) if args.analysis else None
    resume_config = _config_from_checkpoint(checkpoint, args) if checkpoint is not None else None

    import torch

    from .resources import DEFAULT_MODEL
    from .training import (
        LiSADistillationConfig,
        LiSATrainer,
        evaluation_texts,
        is_conversational_dataset,
        keep_4bit_weights_trainable,
        lisa_sft_config,
        load_sft_dataset,
    )
    from .tuner.compression import qk_compression_report

    started = time.monotonic()
    torch.manual_seed(args.seed)
    load_kwargs: dict[str, Any] = {}
    if args.load_in_4bit:
        try:
            from transformers import BitsAndBytesConfig
        except ImportError as error:  # pragma: no cover - transformers always has it
            raise CLIError(f"--load-in-4bit: {error}") from None
        compute_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        load_kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype
        )
    model, tokenizer = _load_base(args.model, **load_kwargs)
    if args.load_in_4bit:
        keep_4bit_weights_trainable(model)
    elif device.type != "cpu":
        model.to(device)

    train_dataset = load_sft_dataset(args.data, args.split, args.text_field, args.held_out_fraction)
    chat = is_conversational_dataset(train_dataset)
    packing = {"auto": not chat, "yes": True, "no": False}[args.packing]
    _log(f"data: {args.data} ({'chat' if chat else 'plain text'}), {len(train_dataset)} training documents")
    if args.split != "train" and eval_settings is not None:
        _log(f"warning: with --split {args.split} the held-out perplexity text is part of the training data")

    if resume_config is not None:
        lisa_config = resume_config
        layer_choice: dict[str, Any] = {"method": "from checkpoint", "checkpoint": str(checkpoint)}
    else:
        train_texts = evaluation_texts(train_dataset, tokenizer)
        lisa_config, layer_choice = _choose_config(args, model, tokenizer, train_texts, out)
    _log(f"shared layers ({layer_choice['method']}): {lisa_config.share_layers}, rank {lisa_config.rank}")

    distillation = LiSADistillationConfig(
        attn_kl_weight=args.attn_kl_weight,
        attn_kl_schedule="linear_decay" if args.attn_kl_warmup_steps else "constant",
        attn_kl_warmup_steps=args.attn_kl_warmup_steps,
        output_kl_weight=args.output_kl_weight,
        temperature=args.temperature,
    )
    sft_config = lisa_sft_config(
        out,
        max_steps=args.max_steps,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        packing=packing,
        gradient_checkpointing=args.gradient_checkpointing,
        logging_steps=args.logging_steps,
        seed=args.seed,
        save_strategy="steps",
        save_steps=args.save_steps,
        save_total_limit=args.save_total_limit,
        disable_tqdm=args.no_progress,
        use_cpu=device.type == "cpu",
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
    adapter_config = peft_model.peft_config[peft_model.active_adapter]
    if args.model is None or args.model == DEFAULT_MODEL:
        adapter_config.base_model_name_or_path = DEFAULT_MODEL  # portable: resolves to the built-in copy
    elif Path(args.model).expanduser().is_dir():
        adapter_config.base_model_name_or_path = str(Path(args.model).expanduser().resolve())  # any working dir
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    _log(
        f"training {args.max_steps} steps x {args.batch_size} x {args.seq_len} tokens, lr {args.lr}; trainable "
        f"parameters {trainable:,} of {total:,} ({100 * trainable / total:.2f}%); checkpoints every "
        f"{args.save_steps} steps in {out}" + (f"; resuming from {checkpoint}" if checkpoint else "")
    )
    train_started = time.monotonic()
    train_output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    train_minutes = (time.monotonic() - train_started) / 60
    _log(f"trained to step {trainer.state.global_step} in {train_minutes:.1f} min")

    metrics: dict[str, Any] = {}
    held_out: list[str] = []
    if eval_settings is not None:
        held_out = _held_out_texts(args, tokenizer)
        metrics = {"data": args.data, "split": "test"}
        if args.load_in_4bit:
            metrics["base_quantization"] = "4-bit NF4"
        metrics["perplexity"] = _measure_perplexity(
            peft_model, tokenizer, held_out, eval_settings, not args.no_progress, "trained LiSA"
        )
        if args.eval_base:
            with peft_model.disable_adapter():
                metrics["base_perplexity"] = _measure_perplexity(
                    peft_model, tokenizer, held_out, eval_settings, not args.no_progress, "base model"
                )

    report = qk_compression_report(peft_model)
    align_hidden = lisa_config.align_hidden
    if align_hidden is None:
        align_hidden = 4 * peft_model.get_base_model().config.num_attention_heads
    adapter_dir = out / "adapter"
    _save_adapter_dir(
        peft_model,
        tokenizer,
        adapter_dir,
        _card_metrics(lisa_config.rank, align_hidden, metrics),
        {
            ADAPTER_METRICS_FILE: _dump(metrics),
            "lisa_distillation.json": _dump(distillation.to_dict()),
        },
    )
    results = {
        "command": shlex.join([PROG, *sys.argv[1:]]) if args.argv is None else shlex.join([PROG, *args.argv]),
        "model": _model_label(args.model),
        "load_in_4bit": args.load_in_4bit,
        "data": args.data,
        "data_format": "chat" if chat else "text",
        "packing": packing,
        "share_layers": list(lisa_config.share_layers),
        "layer_choice": layer_choice,
        "rank": lisa_config.rank,
        "align_hidden": align_hidden,
        "distillation": distillation.to_dict(),
        "training": {
            "max_steps": args.max_steps,
            "global_step": trainer.state.global_step,
            "resumed_from": str(checkpoint) if checkpoint else None,
            "batch_size": args.batch_size,
            "seq_len": args.seq_len,
            "learning_rate": args.lr,
            "train_loss": train_output.training_loss,
            "wall_minutes": round(train_minutes, 2),
            "trainable_parameters": trainable,
            "log_history": trainer.state.log_history,
        },
        "metrics": metrics,
        "qk_compression": {"ratio": report.ratio, "qk_params_original": report.qk_params_original},
        "adapter_dir": str(adapter_dir),
        "total_minutes": round((time.monotonic() - started) / 60, 2),
    }
    _write_atomic(out / TRAIN_RESULTS_FILE, _dump(results))

    print(f"shared layers: {list(lisa_config.share_layers)}; rank {lisa_config.rank}")
    print(f"Q/K compression of the shared layers: {report.ratio:.2f}x")
    print(
        f"trained to step {trainer.state.global_step} ({train_minutes:.1f} min, loss {train_output.training_loss:.4f})"
    )
    if "perplexity" in metrics:
        print(f"held-out perplexity: {_ppl_text(metrics['perplexity'], args.data, 'test')}")
    if "base_perplexity" in metrics:
        print(f"base model perplexity: {_ppl_text(metrics['base_perplexity'], args.data, 'test')}")
    print(f"adapter: {adapter_dir}; results: {out / TRAIN_RESULTS_FILE}")
    print(f"next: {PROG} eval --adapter {shlex.quote(str(adapter_dir))}")
    print(f"      {PROG} merge --adapter {shlex.quote(str(adapter_dir))} --output {shlex.quote(str(out / 'merged'))}")
    if metrics.get("perplexity") and not math.isfinite(metrics["perplexity"]["ppl"]):
        raise CLIError("the trained perplexity is not finite", EXIT_FAILURE)
    return 0


# --------------------------------------------------------------------------------------------------------------
# eval
# --------------------------------------------------------------------------------------------------------------


def _prompts(values: Optional[list[str]]) -> list[str]:
    from .evaluation import DEFAULT_PROMPTS

    if not values:
        return list(DEFAULT_PROMPTS)
    if len(values) == 1 and values[0].endswith(".txt"):
        path = Path(values[0]).expanduser()
        if not path.is_file():
            raise CLIError(f"--prompts {values[0]}: no such file")
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not prompts:
            raise CLIError(f"--prompts {values[0]}: the file has no prompts")
        return prompts
    return values


def _load_merged(path: Path, config: dict[str, Any], model_arg: Optional[str], dtype: Any) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .resources import resolve_model_path

    _log(f"loading the merged model {path}")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    if (path / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(path)
    else:
        base = model_arg if model_arg is not None else _base_from_hint(config["lisa"].get("base_model"))
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(base))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _load_adapter_model(adapter: Path, config: dict[str, Any], model_arg: Optional[str], dtype: Any) -> tuple:
    from peft import PeftModel

    base_name = model_arg if model_arg is not None else _base_from_hint(config.get("base_model_name_or_path"))
    base, tokenizer = _load_base(base_name, dtype=dtype)
    _log(f"applying the adapter {adapter}")
    return PeftModel.from_pretrained(base, str(adapter)), tokenizer, base_name


def cmd_eval(args: argparse.Namespace) -> int:
    _check_model_arg(args.model)
    _check_data_arg(args.data)
    device = _device(args.device)
    dtype = _dtype(args.dtype)
    settings = None if args.no_perplexity else _eval_settings(args)
    if args.compare_base and not args.adapter:
        raise CLIError("--compare-base needs --adapter (it evaluates the adapter's base model too)")
    adapter = merged = None
    if args.adapter:
        adapter, adapter_config = check_adapter_dir(args.adapter)
    if args.merged:
        merged, merged_config = check_merged_dir(args.merged)
    prompts = _prompts(args.prompts) if args.max_new_tokens else []

    from .evaluation import generate_samples
    from .tuner.compression import qk_compression_report

    base_name = args.model
    if merged is not None:
        model, tokenizer = _load_merged(merged, merged_config, args.model, dtype)
        kind = "merged LiSA model"
    elif adapter is not None:
        model, tokenizer, base_name = _load_adapter_model(adapter, adapter_config, args.model, dtype)
        kind = "LiSA adapter"
    else:
        model, tokenizer = _load_base(args.model, dtype=dtype)
        kind = "base model"
    model.to(device).eval()

    results: dict[str, Any] = {
        "model": str(merged) if merged is not None else _model_label(base_name),
        "adapter": str(adapter) if adapter is not None else None,
        "merged": str(merged) if merged is not None else None,
        "kind": kind,
        "dtype": args.dtype,
        "data": args.data,
        "split": args.split,
    }
    if kind != "base model":
        report = qk_compression_report(model)
        results["share_layers"] = [row.layer for row in report.layers]
        results["qk_compression"] = report.ratio
    progress = not args.no_progress
    if settings is not None:
        texts = _held_out_texts(args, tokenizer, args.split)
        results["perplexity"] = _measure_perplexity(model, tokenizer, texts, settings, progress, kind)
        if args.compare_base:
            with model.disable_adapter():
                results["base_perplexity"] = _measure_perplexity(
                    model, tokenizer, texts, settings, progress, "base model"
                )
    generations: dict[str, list[str]] = {}
    if prompts:
        _log(f"generating {args.max_new_tokens} tokens for {len(prompts)} prompt(s)")
        generations[kind] = generate_samples(model, tokenizer, prompts, args.max_new_tokens)
        if args.compare_base:
            with model.disable_adapter():
                generations["base model"] = generate_samples(model, tokenizer, prompts, args.max_new_tokens)
        results["generations"] = [
            {"prompt": prompt, **{key: samples[index] for key, samples in generations.items()}}
            for index, prompt in enumerate(prompts)
        ]

    print(
        f"model: {results['model']}" + (f" with the LiSA adapter {adapter}" if adapter is not None else f" ({kind})")
    )
    if "share_layers" in results:
        print(f"shared layers: {results['share_layers']}; Q/K compression {results['qk_compression']:.2f}x")
    if "perplexity" in results:
        print(f"perplexity: {_ppl_text(results['perplexity'], args.data, args.split)}")
    if "base_perplexity" in results:
        print(f"base model perplexity: {_ppl_text(results['base_perplexity'], args.data, args.split)}")
    for index, prompt in enumerate(prompts):
        print(f"\n>>> {prompt}")
        for key, samples in generations.items():
            print(f"  [{key}] {samples[index]!r}" if len(generations) > 1 else f"  {samples[index]!r}")
    if args.json:
        _write_atomic(Path(args.json), _dump(results))
        print(f"\nwrote {args.json}")
    return 0


# --------------------------------------------------------------------------------------------------------------
# merge
# --------------------------------------------------------------------------------------------------------------


_CARD_PPL_LINE = re.compile(r"^- (?P<key>[^:\n]*[Pp]erplexity[^:\n]*): (?P<value>[0-9.]+)\s*$", re.MULTILINE)


def adapter_recorded_metrics(adapter: Path) -> dict[str, Any]:
    """Perplexity lines for the merged model's card, from the adapter's lisa_metrics.json, else its README."""
    metrics_file = adapter / ADAPTER_METRICS_FILE
    if metrics_file.is_file():
        try:
            metrics = json.loads(metrics_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            metrics = {}
        if isinstance(metrics, dict) and metrics.get("perplexity"):
            return metrics
    readme = adapter / "README.md"
    if readme.is_file():
        lines = {m["key"]: m["value"] for m in _CARD_PPL_LINE.finditer(readme.read_text(encoding="utf-8"))}
        if lines:
            return {"card_lines": lines}
    return {}


def cmd_merge(args: argparse.Namespace) -> int:
    _check_model_arg(args.model)
    device = _device(args.device)
    dtype = _dtype(args.dtype)
    adapter, adapter_config = check_adapter_dir(args.adapter)
    output = Path(args.output).expanduser()
    if output.exists() and not output.is_dir():
        raise CLIError(f"--output {args.output}: exists and is not a directory")
    if output.resolve() == adapter.resolve():
        raise CLIError("--output must not be the adapter directory")
    settings = None
    if args.eval:
        _check_data_arg(args.data)
        settings = _eval_settings(args, "eval_")

    import torch
    from transformers import AutoModelForCausalLM

    from .tuner.artifacts import atomic_directory
    from .tuner.compression import qk_compression_report

    peft_model, tokenizer, _ = _load_adapter_model(adapter, adapter_config, args.model, dtype)
    params_before = sum(p.numel() for name, p in peft_model.named_parameters() if "lisa_" not in name)  # the base
    _log("merging (merge_and_unload)")
    merged = peft_model.merge_and_unload().to(device).eval()
    params_after = sum(p.numel() for p in merged.parameters())
    report = qk_compression_report(merged)
    spec = merged.config.lisa

    if settings is not None:
        texts = _held_out_texts(args, tokenizer, args.split)
        measured = _measure_perplexity(merged, tokenizer, texts, settings, not args.no_progress, "merged model")
        metrics: dict[str, Any] = {"data": args.data, "split": args.split, "perplexity": measured}
        card = _card_metrics(spec["rank"], spec["align_hidden"], metrics)
    else:
        metrics = adapter_recorded_metrics(adapter)
        if "card_lines" in metrics:
            card = _card_metrics(spec["rank"], spec["align_hidden"], None)
            card.pop("Perplexity")
            card.update({f"{key} (measured with the adapter)": value for key, value in metrics["card_lines"].items()})
        else:
            card = _card_metrics(spec["rank"], spec["align_hidden"], metrics, note="; measured with the adapter")

    _log(f"saving to {output}")
    with atomic_directory(output) as scratch:
        merged.save_pretrained(scratch, metrics=card)
        tokenizer.save_pretrained(scratch)
        (scratch / ADAPTER_METRICS_FILE).write_text(_dump(metrics), encoding="utf-8")

    if not args.no_verify:
        ids = torch.tensor([[(i * 7 + 3) % merged.config.vocab_size for i in range(16)]], device=device)
        reloaded = AutoModelForCausalLM.from_pretrained(output, dtype=dtype).to(device).eval()
        with torch.no_grad():
            expected, actual = merged(ids).logits.float(), reloaded(ids).logits.float()
        tolerance = 1e-4 if dtype == torch.float32 else 5e-2
        if type(reloaded) is not type(merged) or not torch.allclose(expected, actual, atol=tolerance, rtol=tolerance):
            raise CLIError(f"the merged model saved to {output} does not reload to the same outputs", EXIT_FAILURE)
        _log("reloaded the saved model: same outputs")

    print(report.to_markdown())
    print()
    print(
        f"parameters: {params_before:,} -> {params_after:,} ({100 * (1 - params_after / params_before):.2f}% fewer); "
        f"Q/K of the shared layers {report.ratio:.2f}x smaller"
    )
    if metrics.get("perplexity"):
        print(
            f"perplexity: {_ppl_text(metrics['perplexity'], metrics.get('data', '?'), metrics.get('split', 'test'))}"
        )
    print(f"merged model: {output} (model_type {merged.config.model_type}; load it after 'import peft_lisa')")
    return 0


# --------------------------------------------------------------------------------------------------------------
# bench
# --------------------------------------------------------------------------------------------------------------


def cmd_bench(args: argparse.Namespace) -> int:
    _check_model_arg(args.model)
    device = _device(args.device)
    merged_dir = merged_config = None
    if args.merged:
        merged_dir, merged_config = check_merged_dir(args.merged)
    if args.analysis and args.share_fraction is None:
        raise CLIError("--analysis needs --share-fraction (the fraction of layers to choose from it)")
    defaults = BENCH_QUICK if args.quick else BENCH_FULL
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    analysis = _load_analysis(args.analysis) if args.analysis else None

    import copy

    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from .benchmark import default_share_layers, run_benchmark
    from .resources import resolve_model_path
    from .tuner.config import LiSAConfig

    dtype = _dtype(args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    base_name = args.model
    if base_name is None and merged_config is not None:
        base_name = _base_from_hint(merged_config["lisa"].get("base_model"))
    path = resolve_model_path(base_name)
    _log(f"loading {_model_label(base_name)}")
    try:
        base = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    except OSError as error:
        raise CLIError(f"could not load the model {_model_label(base_name)}: {error}", EXIT_FAILURE) from None
    num_layers = base.config.num_hidden_layers
    if merged_dir is not None:
        _log(f"loading the merged model {merged_dir}")
        merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=dtype).to(device).eval()
        if merged.config.num_hidden_layers != num_layers or merged.config.hidden_size != base.config.hidden_size:
            raise CLIError(f"--merged {args.merged} is not a merged model of {_model_label(base_name)}: pass --model")
    else:
        if args.share_layers is not None:
            share_layers, how = args.share_layers, "--share-layers"
        elif analysis is not None:
            from .analysis import choose_share_layers

            try:
                share_layers = choose_share_layers(analysis, fraction=args.share_fraction)
            except ValueError as error:
                raise CLIError(f"--share-fraction {args.share_fraction}: {error}") from None
            how = f"--analysis {args.analysis}"
        else:
            share_layers = default_share_layers(num_layers, args.share_fraction or 0.5)
            how = "spread over the deeper layers (peft_lisa.benchmark.default_share_layers)"
        beyond = [layer for layer in share_layers if layer >= num_layers]
        if beyond:
            raise CLIError(
                f"--share-layers {beyond} out of range: the model has {num_layers} layers (valid: 1..{num_layers - 1})"
            )
        _log(f"untrained LiSA model (speed does not depend on the weights), shared layers {share_layers} ({how})")
        config = LiSAConfig(share_layers=share_layers, rank=args.rank, align_hidden=args.align_hidden)
        merged = get_peft_model(copy.deepcopy(base), config).merge_and_unload().to(device=device, dtype=dtype).eval()
    gib = 1024**3
    result = run_benchmark(
        base,
        merged,
        batch_sizes=tuple(args.batch_sizes),
        contexts=tuple(args.contexts),
        decode_tokens=args.decode_tokens,
        repeats=args.repeats,
        warmup=args.warmup,
        memory_budget_bytes=int(args.memory_budget_gib * gib) if args.memory_budget_gib else None,
        budget_context=args.budget_context,
        max_throughput=not args.no_max_throughput,
        memory_limit_bytes=int(args.memory_limit_gib * gib) if args.memory_limit_gib else None,
        max_prefill_tokens=args.max_prefill_tokens,
        device=device,
        progress=not args.no_progress,
    )
    argv = sys.argv[1:] if args.argv is None else args.argv
    result.settings["command"] = shlex.join([PROG, *argv])
    result.settings["model_path"] = str(path)
    if merged_dir is not None:
        result.settings["merged_model_path"] = str(merged_dir)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    result.to_json(out / "results.json")
    markdown = result.to_markdown()
    (out / "results.md").write_text(markdown, encoding="utf-8")
    written = [out / "results.json", out / "results.md"]
    try:
        written.append(result.plot(out / "benchmark.png"))
    except ImportError as error:
        _log(f"no plot: {error} (pip install matplotlib)")
    print(markdown)
    print("wrote " + ", ".join(str(path) for path in written))
    return 0


# --------------------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------------------

COMMANDS = {"analyze": cmd_analyze, "train": cmd_train, "eval": cmd_eval, "merge": cmd_merge, "bench": cmd_bench}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``peft-lisa`` with ``argv`` (default: the command line); returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version, or a usage error (already printed)
        return int(exit_.code or 0) if not isinstance(exit_.code, str) else EXIT_USAGE
    if args.command is None:
        print(
            f"{PROG}: error: choose a command: {', '.join(COMMANDS)} (see '{PROG} --help')",
            file=sys.stderr,
        )
        return EXIT_USAGE
    args.argv = None if argv is None else list(argv)
    prog = f"{PROG} {args.command}"
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    try:
        _set_threads(args)
        if args.no_progress:
            _disable_progress_bars()
        return COMMANDS[args.command](args)
    except CLIError as error:
        if args.debug:
            traceback.print_exc()
        print(f"{prog}: error: {error}", file=sys.stderr)
        return error.code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError) as error:  # bad input found while running (UnsupportedModelError too)
        if args.debug:
            traceback.print_exc()
        print(f"{prog}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as error:
        if args.debug:
            traceback.print_exc()
        hint = "" if args.debug else " (run with --debug for the traceback)"
        print(f"{prog}: error: {type(error).__name__}: {error}{hint}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    raise SystemExit(main())
