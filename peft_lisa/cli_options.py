"""The options of ``peft-lisa``: argument types, the option groups the commands share, and the ``analyze``, ``train``,
``calibrate``, ``eval`` and ``merge`` subcommand parsers (``peft_lisa.cli.build_parser`` adds ``bench``)."""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable
from typing import Any, Optional

from .calibration_step import LiSACalibrationConfig
from .jobs.checks import DTYPE_NAMES, JobInputError, check_share_layers
from .jobs.train_setup import DEFAULT_LAYER_SCORE
from .tuner.layer_choice import SCORES

# --------------------------------------------------------------------------------------------------------------
# Argument types
# --------------------------------------------------------------------------------------------------------------


def layer_list(text: str) -> list[int]:
    """``"4,5,6"`` (or ``"4 5 6"``) -> ``[4, 5, 6]``, checked by :func:`peft_lisa.jobs.checks.check_share_layers`
    (no layer 0, no negative or repeated indices)."""
    items = [item for item in re.split(r"[,\s]+", text.strip()) if item]
    try:
        layers = [int(item) for item in items]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated layer indices such as 4,5,6, got {text!r}"
        ) from None
    if not layers:
        raise argparse.ArgumentTypeError("no layer indices given (expected e.g. 4,5,6)")
    try:
        return check_share_layers(layers, option=repr(text))
    except JobInputError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def int_list(text: str) -> list[int]:
    """``"1,8,32"`` -> ``[1, 8, 32]`` (positive integers)."""
    try:
        values = [int(item) for item in re.split(r"[,\s]+", text.strip()) if item]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}") from None
    if not values or any(value <= 0 for value in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def number(convert: Callable[[str], Any], accept: Callable[[Any], bool], expected: str) -> Callable[[str], Any]:
    """An argument type: ``convert(text)``, refused (``expected a ..., got '...'``) unless ``accept`` holds."""

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not accept(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    parse.__doc__ = f"{expected} (an argument type)"
    return parse


positive_int = number(int, lambda value: value > 0, "a positive integer")
non_negative_int = number(int, lambda value: value >= 0, "an integer >= 0")
non_negative_float = number(float, lambda value: math.isfinite(value) and value >= 0, "a number >= 0")
positive_float = number(float, lambda value: math.isfinite(value) and value > 0, "a number > 0")
fraction = number(float, lambda value: 0.0 < value < 1.0, "a number strictly between 0 and 1")
held_out = number(float, lambda value: 0.0 <= value < 1.0, "a number in [0, 1)")


def even_rank(text: str) -> int:
    """A positive even integer (the LiSA rank)."""
    value = positive_int(text)
    if value % 2:
        raise argparse.ArgumentTypeError(f"the rank must be even (rotary embeddings rotate pairs), got {value}")
    return value


# --------------------------------------------------------------------------------------------------------------
# Option groups
# --------------------------------------------------------------------------------------------------------------

_DATA_HELP = (
    "'pydoc' (built-in Python documentation, the default), a .txt file (documents separated by blank lines), a "
    ".jsonl/.json file (a text field, or chat 'messages'), or a datasets name/directory"
)
_MODEL_HELP = "base model: a local directory or a hub id (default: the built-in SmolLM2-135M-Instruct)"


def common_parent() -> argparse.ArgumentParser:
    """Options of every command: device, threads, progress bars, tracebacks."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("general")
    group.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    group.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    group.add_argument("--no-progress", action="store_true", help="no progress bars")
    group.add_argument("--debug", action="store_true", help="print the Python traceback of a failure")
    return parent


def data_parent(default_split: str) -> argparse.ArgumentParser:
    """The ``--data`` options (see :mod:`peft_lisa.data`) of a command that reads text."""
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


def option(group: Any, flag: str, kind: Any, default: Any, help: str) -> None:
    """Add ``flag`` to ``group``: ``kind`` is the argument type (a function), or a tuple of the allowed choices."""
    if isinstance(kind, tuple):
        group.add_argument(flag, choices=kind, default=default, help=help)
    else:
        group.add_argument(flag, type=kind, default=default, help=help)


def switch(group: Any, flag: str, default: Optional[bool], help: str) -> None:
    """Add an on/off ``flag``: ``--x`` only (``default`` None: off), or ``--x``/``--no-x`` (``default`` a bool)."""
    if default is None:
        group.add_argument(flag, action="store_true", help=help)
    else:
        group.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help)


def add_eval_options(group: Any, prefix: str = "") -> None:
    """Perplexity options; ``prefix="eval-"`` gives the ``train``/``merge`` spelling (``--eval-window``...)."""
    option(group, f"--{prefix}window", positive_int, 256, "perplexity window (default: 256)")
    option(group, f"--{prefix}stride", positive_int, 128, "perplexity stride (default: 128)")
    tokens_help = "evaluate on the first N tokens of the held-out text (default: 4096; 0 = all)"
    option(group, f"--{prefix}max-tokens", non_negative_int, 4096, tokens_help)
    option(group, f"--{prefix}batch-size", positive_int, 8, "perplexity windows per forward (default: 8)")


def add_calibration_options(group: Any) -> None:
    """The layer-wise calibration (``peft_lisa.calibrate``): its budget (sequences, Adam steps, learning rate), copy
    blocks, and the sources it reads."""
    default = LiSACalibrationConfig()  # the library's defaults, stated once
    sequences, steps, lr = default.num_sequences, default.adam_steps, default.lr
    option(group, "--calibration-sequences", positive_int, sequences, f"calibration sequences (default: {sequences})")
    option(group, "--calibration-steps", non_negative_int, steps, f"Adam steps per shared layer (default: {steps})")
    option(group, "--calibration-lr", positive_float, lr, f"Adam learning rate, cosine (default: {lr:g})")
    copies_help = (
        "add N blocks of repeated random-token runs to the calibration sequences: keeps more of the base model's "
        "in-context copying, at a small perplexity cost (docs/calibration/copying.md; default: 0)"
    )
    option(group, "--calibration-copy-blocks", non_negative_int, default.copy_blocks, copies_help)
    group.add_argument(
        "--calibration-data",
        nargs="+",
        metavar="SOURCE",
        help="calibrate on these sources (each as --data takes it: pydoc, a .txt/.jsonl/.json file, a datasets name "
        "or directory; their --split part) in equal shares instead of --data: include every domain the model will "
        "serve (docs/calibration/domain.md; default: --data)",
    )


def add_generation_options(group: Any, default_tokens: int) -> None:
    """Greedy sample generation options: ``--prompts`` and ``--max-new-tokens``."""
    prompts_help = (
        "prompts for greedy generation, or one .txt file with a prompt per line (default: four built-in ones)"
    )
    group.add_argument("--prompts", nargs="+", default=None, metavar="PROMPT", help=prompts_help)
    tokens_help = f"tokens per generation (default: {default_tokens}; 0 = none)"
    option(group, "--max-new-tokens", non_negative_int, default_tokens, tokens_help)


# --------------------------------------------------------------------------------------------------------------
# Subcommands
# --------------------------------------------------------------------------------------------------------------

ANALYZE_TEXTS = (
    "calibration analysis: attention similarity of adjacent layers, suggested share_layers",
    """Measure how similar every layer's attention is to its predecessor's (Jensen-Shannon divergence with the best
    head matching) and, optionally, how much the loss rises when each layer alone shares. Writes
    OUTPUT_DIR/analysis.json, OUTPUT_DIR/attention_heatmap.png and OUTPUT_DIR/attention_layers.png, prints a table per
    layer and the share_layers suggested for --fraction.""",
    """\
example:
  peft-lisa analyze --max-batches 2 --output-dir lisa-analysis
  peft-lisa train --analysis lisa-analysis/analysis.json --share-fraction 0.5""",
)
TRAIN_TEXTS = (
    "train a LiSA adapter (TRL SFTTrainer, checkpoints, resume)",
    """Train a LiSA adapter with TRL's SFTTrainer (only the LiSA modules train): plain text is packed into blocks of
    --seq-len tokens, chat data uses the chat template. Checkpoints go to OUTPUT_DIR/checkpoint-STEP every --save-steps
    steps; --resume continues from one. At the end the held-out perplexity is measured (--no-eval to skip; --eval-base
    and --eval-untrained add the base model and the untrained adapter, measured before training; --max-new-tokens adds
    greedy generations) and the adapter is saved atomically to OUTPUT_DIR/adapter with a model card, the tokenizer and
    lisa_metrics.json; OUTPUT_DIR/results.json holds the run's summary. --data selects the training text; perplexity
    uses its held-out part (--split only applies to training).""",
    """\
examples:
  peft-lisa train --share-layers 4,5,6,7,8 --max-steps 120 --output-dir lisa-run
  peft-lisa train --share-fraction 0.5 --analysis lisa-analysis/analysis.json --output-dir lisa-run
  peft-lisa train --output-dir lisa-run --max-steps 240 --resume latest
  peft-lisa train --data chat.jsonl --load-in-4bit --attn-kl-weight 0.1""",
)
EVAL_TEXTS = (
    "held-out perplexity and greedy sample generations",
    """Sliding-window perplexity on held-out text and greedy generations of a base model, a LiSA adapter on its base
    model (--adapter), or a merged LiSA model (--merged).""",
    """\
examples:
  peft-lisa eval --adapter lisa-run/adapter --compare-base
  peft-lisa eval --merged lisa-merged --json eval.json
  peft-lisa eval --model HuggingFaceTB/SmolLM2-360M-Instruct --data notes.txt --prompts 'Hello!'""",
)
MERGE_TEXTS = (
    "merge a LiSA adapter into a standalone compact model directory",
    """Load the base model and a LiSA adapter, merge_and_unload() (the shared layers lose q_proj/k_proj), and save the
    merged model and tokenizer atomically to OUTPUT with a model card. The card carries the perplexity recorded with
    the adapter (lisa_metrics.json or its README), or the one measured with --eval. The saved model is reloaded and
    checked against the in-memory one.""",
    """\
example:
  peft-lisa merge --adapter lisa-run/adapter --output lisa-merged
  python -c "import peft_lisa, transformers; transformers.AutoModelForCausalLM.from_pretrained('lisa-merged')\"""",
)
CALIBRATE_TEXTS = (
    "fit a LiSA adapter layer by layer to its base model (no training of the LM)",
    """Create a LiSA adapter (the layer options of 'train') or load one (--adapter), and fit each shared layer, in
    layer order, to its own base layer's attention on --calibration-sequences sequences of the training text
    (peft_lisa.calibrate: no backpropagation through the model). Prints the per-layer report (attention KL before and
    after, seconds) and the held-out perplexity before and after (--no-eval to skip). Saves the adapter atomically to
    OUTPUT_DIR/adapter (with lisa_calibration.json), OUTPUT_DIR/calibration.md and OUTPUT_DIR/results.json.""",
    """\
examples:
  peft-lisa calibrate --share-fraction 0.5 --output-dir lisa-calibrated
  peft-lisa calibrate --adapter lisa-run/adapter --calibration-steps 200 --output-dir lisa-recalibrated
  peft-lisa train --no-calibrate ...   # train without calibrating first""",
)
_RECORDED_MODEL_HELP = "base model: a local directory or a hub id (default: the one recorded in {})"


def subcommand(
    commands: Any, name: str, parents: list[argparse.ArgumentParser], texts: tuple[str, str, str]
) -> argparse.ArgumentParser:
    """Add the subcommand ``name`` with its ``(help, description, epilog)`` (the epilog's examples keep their lines;
    ``build_parser`` rewraps the descriptions)."""
    help_, description, epilog = texts
    formatter = argparse.RawDescriptionHelpFormatter
    description = " ".join(description.split())
    return commands.add_parser(
        name, parents=parents, help=help_, description=description, epilog=epilog, formatter_class=formatter
    )


def add_analyze_parser(commands: Any, common: argparse.ArgumentParser) -> None:
    """``peft-lisa analyze``: its parser, added to ``commands``."""
    analyze = subcommand(commands, "analyze", [common, data_parent("train")], ANALYZE_TEXTS)
    analyze.add_argument("--model", default=None, help=_MODEL_HELP)
    group = analyze.add_argument_group("analysis")
    option(group, "--seq-len", positive_int, 256, "tokens per sequence (default: 256)")
    option(group, "--batch-size", positive_int, 4, "sequences per forward (default: 4)")
    option(group, "--max-batches", positive_int, 8, "calibration batches (default: 8)")
    switch(group, "--no-sensitivity", None, "skip the per-layer sensitivity (one extra forward pass per layer)")
    calibrated_help = "also score each layer calibrated alone (the sensitivity_calibrated score; minutes, not seconds)"
    switch(group, "--calibrated-sensitivity", None, calibrated_help)
    option(group, "--fraction", fraction, 0.5, "fraction of all layers to suggest for sharing (default: 0.5)")
    option(group, "--keep-first", non_negative_int, 2, "first layers kept full (default: 2)")
    option(
        group, "--score", SCORES, "js_matched", "score ranking the layers (lower shares first; default: js_matched)"
    )
    analyze.add_argument("--output-dir", "--output", default="lisa-analysis", help="default: lisa-analysis")


def add_layer_options(lisa: Any) -> None:
    """The options that choose a new adapter's layers and shape (``train`` and ``calibrate``)."""
    choice = lisa.add_mutually_exclusive_group()
    option(choice, "--share-layers", layer_list, None, "layers to share, e.g. 4,5,6,7")
    fraction_help = "share this fraction of all layers, chosen by the calibration analysis (default: 0.5)"
    option(choice, "--share-fraction", fraction, None, fraction_help)
    analysis_help = (
        "analysis.json from 'peft-lisa analyze' to choose the layers from (else an analysis is run first and saved to "
        "OUTPUT_DIR/analysis.json); with --share-layers it gives their initial head permutations"
    )
    lisa.add_argument("--analysis", default=None, help=analysis_help)
    score_help = (
        "how --share-fraction ranks the layers: sensitivity_calibrated (each layer calibrated alone, scored by the "
        "output KL to the base; the analysis takes minutes), js_matched (attention similarity to the previous layer; "
        f"seconds) or another score of 'peft-lisa analyze' (default: {DEFAULT_LAYER_SCORE})"
    )
    option(lisa, "--layer-score", SCORES, DEFAULT_LAYER_SCORE, score_help)
    option(lisa, "--keep-first", non_negative_int, 2, "first layers kept full (default: 2)")
    chain_help = "longest run of adjacent shared layers --share-fraction may choose (default: no cap)"
    option(lisa, "--max-chain", positive_int, None, chain_help)
    batches_help = "batches of 4 x 256 tokens for the analysis run by train (default: 2)"
    option(lisa, "--analysis-batches", positive_int, 2, batches_help)
    option(lisa, "--rank", even_rank, None, "per-head rank of the low-rank Q/K (default: 8)")
    align_help = "hidden size of the head-alignment FFN (default: 0 = linear only; 4 x heads is the widest tested)"
    option(lisa, "--align-hidden", non_negative_int, None, align_help)
    mixing_help = "source heads the alignment mixes: full or kv_group (LiSAConfig.head_mixing; default: the library's)"
    option(lisa, "--head-mixing", ("full", "kv_group"), None, mixing_help)


def add_train_parser(commands: Any, common: argparse.ArgumentParser) -> None:
    """``peft-lisa train``: its parser, added to ``commands``."""
    train = subcommand(commands, "train", [common, data_parent("train")], TRAIN_TEXTS)
    train.add_argument("--model", default=None, help=_MODEL_HELP)
    switch(train, "--load-in-4bit", None, "load the base model in 4-bit NF4 (bitsandbytes)")

    add_layer_options(train.add_argument_group("LiSA adapter"))

    group = train.add_argument_group("training")
    option(group, "--max-steps", positive_int, 120, "optimizer steps (default: 120)")
    option(group, "--seq-len", positive_int, 256, "tokens per sequence (default: 256)")
    option(group, "--batch-size", positive_int, 2, "sequences per step (default: 2)")
    option(group, "--lr", positive_float, 2e-3, "peak learning rate, cosine (default: 2e-3)")
    packing_help = "pack texts into full blocks (auto: yes for plain text, no for chat data)"
    option(group, "--packing", ("auto", "yes", "no"), "auto", packing_help)
    switch(group, "--gradient-checkpointing", None, "non-reentrant activation checkpointing (less memory)")
    option(group, "--seed", int, 0, "random seed (default: 0)")
    option(group, "--logging-steps", positive_int, 10, "log every N steps (default: 10)")
    option(group, "--save-steps", positive_int, 50, "checkpoint every N steps (default: 50)")
    option(group, "--save-total-limit", positive_int, 2, "checkpoints kept, oldest deleted (default: 2)")
    generated_help = (
        "mix the base model's own sampled answers to everyday prompts into the training data, at least N tokens of "
        "them, cycled (0: off; the main job uses 4096): keeps a model trained on one domain answering without loops"
    )
    option(group, "--self-generated", non_negative_int, 0, generated_help)
    prompts_help = "sample them from the first K everyday prompts (default: 16; --loop-check counts on the last ones)"
    option(group, "--self-generated-prompts", positive_int, 16, prompts_help)
    share_help = "share of the training tokens they make, cycled (default: 0.5)"
    option(group, "--self-generated-share", fraction, 0.5, share_help)
    resume_help = (
        "continue from a checkpoint directory, or from the last one in OUTPUT_DIR ('latest', also the value of a bare "
        "--resume); the adapter's layers and shape come from the checkpoint"
    )
    group.add_argument("--resume", nargs="?", const="latest", default=None, metavar="PATH|latest", help=resume_help)

    calibration = train.add_argument_group("calibration before training (not when resuming)")
    switch(calibration, "--calibrate", True, "fit the adapter layer by layer to the base model first (default: on)")
    add_calibration_options(calibration)

    distill = train.add_argument_group("distillation (off by default)")
    option(distill, "--attn-kl-weight", non_negative_float, 0.0, "attention KL weight")
    warmup_help = "decay the attention KL weight linearly to 0 over this many steps (0: constant weight)"
    option(distill, "--attn-kl-warmup-steps", non_negative_int, 0, warmup_help)
    output_help = "weight of the KL to the base model's output"
    option(distill, "--output-kl-weight", non_negative_float, 0.0, output_help)
    reduction_help = "combine the per-layer attention KLs by mean (default) or sum"
    option(distill, "--attn-kl-layer-reduction", ("mean", "sum"), "mean", reduction_help)
    option(distill, "--temperature", positive_float, 1.0, "output KL temperature (default 1)")
    option(distill, "--lm-weight", non_negative_float, 1.0, "weight of the causal-LM loss (default: 1)")

    group = train.add_argument_group("evaluation after training")
    switch(group, "--eval", True, "measure the held-out perplexity of the trained adapter (default: on)")
    base_help = "also measure the base model's perplexity (and generations), before training (default: off)"
    switch(group, "--eval-base", False, base_help)
    untrained_help = "also measure the untrained adapter's perplexity (direct sharing), before training (default: off)"
    switch(group, "--eval-untrained", False, untrained_help)
    calibrated_help = (
        "also measure the calibrated adapter's perplexity (and generations), before training (default: off)"
    )
    switch(group, "--eval-calibrated", False, calibrated_help)
    license_help = (
        "also measure every perplexity on a second held-out text from another domain: a license text shipped with an "
        "installed package (default: off)"
    )
    switch(group, "--eval-license", False, license_help)
    add_eval_options(group, "eval-")
    add_generation_options(group, default_tokens=0)
    loop_help = (
        "also answer the last N of the library's everyday prompts (peft_lisa.generated_text.GENERIC_PROMPTS) with "
        "every generating model and print how many loop (default: 0)"
    )
    option(group, "--loop-check", non_negative_int, 0, loop_help)
    train.add_argument("--output-dir", "--output", default="lisa-run", help="default: lisa-run")


def add_calibrate_parser(commands: Any, common: argparse.ArgumentParser) -> None:
    """``peft-lisa calibrate``: its parser, added to ``commands``."""
    calibrate = subcommand(commands, "calibrate", [common, data_parent("train")], CALIBRATE_TEXTS)
    calibrate.add_argument("--model", default=None, help=_RECORDED_MODEL_HELP.format("--adapter, else the built-in"))
    switch(calibrate, "--load-in-4bit", None, "load the base model in 4-bit NF4 (bitsandbytes)")
    calibrate.add_argument("--adapter", default=None, help="an existing LiSA adapter directory to calibrate")
    add_layer_options(calibrate.add_argument_group("new LiSA adapter (without --adapter)"))
    group = calibrate.add_argument_group("calibration")
    add_calibration_options(group)
    option(group, "--seq-len", positive_int, 256, "tokens per calibration sequence (default: 256)")
    option(group, "--batch-size", positive_int, 4, "sequences per forward and per Adam step (default: 4)")
    option(group, "--seed", int, 0, "random seed (default: 0)")
    group = calibrate.add_argument_group("evaluation")
    switch(group, "--eval", True, "held-out perplexity before and after calibration (default: on)")
    add_eval_options(group, "eval-")
    calibrate.add_argument("--output-dir", "--output", default="lisa-calibrated", help="default: lisa-calibrated")


def _comma_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected one or more comma-separated names")
    return names


def add_eval_parser(commands: Any, common: argparse.ArgumentParser) -> None:
    """``peft-lisa eval``: its parser, added to ``commands``."""
    evaluate = subcommand(commands, "eval", [common, data_parent("test")], EVAL_TEXTS)
    model_help = _RECORDED_MODEL_HELP.format("--adapter/--merged, else the built-in SmolLM2-135M-Instruct")
    evaluate.add_argument("--model", default=None, help=model_help)
    which = evaluate.add_mutually_exclusive_group()
    which.add_argument("--adapter", default=None, help="a LiSA adapter directory (applied to --model)")
    which.add_argument("--merged", default=None, help="a merged LiSA model directory ('peft-lisa merge')")
    compare_help = "with --adapter: also evaluate the base model (adapter disabled)"
    switch(evaluate, "--compare-base", None, compare_help)
    option(evaluate, "--dtype", DTYPE_NAMES, "float32", "weights dtype (default: float32)")
    group = evaluate.add_argument_group("perplexity")
    switch(group, "--no-perplexity", None, "skip the perplexity")
    add_eval_options(group)
    add_generation_options(evaluate.add_argument_group("generation"), default_tokens=40)
    harness_title = "lm-evaluation-harness (needs the eval extra: pip install 'peft-lisa[eval]')"
    harness = evaluate.add_argument_group(harness_title)
    tasks_help = "comma-separated lm-eval tasks, e.g. hellaswag,arc_easy (hub data) or local ones from --task-dir"
    harness.add_argument("--tasks", type=_comma_list, default=None, metavar="NAME[,NAME]", help=tasks_help)
    harness.add_argument("--task-dir", default=None, metavar="DIR", help="a folder of local lm-eval task YAMLs")
    harness.add_argument("--task-batch-size", type=int, default=1, metavar="N", help="lm-eval batch size (default: 1)")
    limit_help = "documents per task (an integer), or a fraction < 1 (default: all)"
    harness.add_argument("--task-limit", type=float, default=None, metavar="N", help=limit_help)
    fewshot_help = "few-shot examples (default: the task's)"
    harness.add_argument("--num-fewshot", type=int, default=None, metavar="K", help=fewshot_help)
    evaluate.add_argument("--json", default=None, metavar="FILE", help="also write the results to this JSON file")


def add_merge_parser(commands: Any, common: argparse.ArgumentParser) -> None:
    """``peft-lisa merge``: its parser, added to ``commands``."""
    merge = subcommand(commands, "merge", [common, data_parent("test")], MERGE_TEXTS)
    merge.add_argument("--adapter", required=True, help="the LiSA adapter directory")
    merge.add_argument("--output", "--output-dir", required=True, help="directory for the merged model")
    merge.add_argument("--model", default=None, help=_RECORDED_MODEL_HELP.format("the adapter"))
    option(merge, "--dtype", DTYPE_NAMES, "float32", "saved dtype (default: float32)")
    switch(merge, "--no-verify", None, "skip reloading the saved model to check it")
    group = merge.add_argument_group("evaluation (with --eval)")
    switch(group, "--eval", None, "measure the merged model's held-out perplexity")
    add_eval_options(group, "eval-")
