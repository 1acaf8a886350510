"""The ``peft-lisa`` command: calibration analysis, training, evaluation, merging and the speed benchmark.

Every subcommand takes ``--model`` (a local directory or a hub id; default: the built-in SmolLM2-135M-Instruct, see
:mod:`peft_lisa.resources`) and, where it reads text, ``--data`` (``pydoc``, the built-in default; a ``.txt`` file;
a ``.jsonl``/``.json`` file with a text field or chat ``messages``; or a ``datasets`` name or directory)::

    peft-lisa analyze --output-dir lisa-analysis
    peft-lisa train --analysis lisa-analysis/analysis.json --share-fraction 0.5 --output-dir lisa-run
    peft-lisa train --output-dir lisa-run --resume latest          # continue from the last checkpoint
    peft-lisa calibrate --share-fraction 0.5 --output-dir lisa-calibrated
    peft-lisa eval --adapter lisa-run/adapter --compare-base
    peft-lisa merge --adapter lisa-run/adapter --output lisa-merged
    peft-lisa eval --merged lisa-merged
    peft-lisa bench --merged lisa-merged --quick

Each subcommand parses its options (:mod:`peft_lisa.cli_options`) and calls one library function:
:func:`peft_lisa.jobs.analyze`, :func:`~peft_lisa.jobs.train`, :func:`~peft_lisa.jobs.calibrate`,
:func:`~peft_lisa.jobs.evaluate`,
:func:`~peft_lisa.jobs.merge` and :func:`peft_lisa.benchmark.benchmark_model`; it prints the result's report to stdout.
Progress lines go to stderr through the ``peft_lisa`` logger (``[peft-lisa] ...``).

Bad arguments end with one line ``peft-lisa <command>: error: ...`` on stderr and exit code 2; failures while
running exit with code 1 (``--debug`` prints the Python traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import shlex
import sys
import textwrap
import traceback
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, Optional

from .benchmark.results import CACHE_KINDS
from .cli_options import (
    add_analyze_parser,
    add_calibrate_parser,
    add_eval_parser,
    add_merge_parser,
    add_train_parser,
    common_parent,
    even_rank,
    fraction,
    int_list,
    layer_list,
    non_negative_int,
    positive_float,
    positive_int,
)
from .jobs import (
    AnalyzeJob,
    CalibrateJob,
    EvalJob,
    JobError,
    JobFailedError,
    MergeJob,
    TrainJob,
    analyze,
    calibrate,
    evaluate,
    merge,
    train,
)
from .jobs.checks import (
    DTYPE_NAMES,
    base_model_from_hint,
    check_analysis_score,
    check_merged_dir,
    check_model_name,
    load_analysis_file,
    resolve_device,
    resolve_dtype,
)
from .tuner.layer_choice import SCORES

PROG = "peft-lisa"
EXIT_USAGE, EXIT_FAILURE = 2, 1
logger = logging.getLogger("peft_lisa")

# The benchmark grids (same as examples/benchmark.py).
BENCH_FULL = {"batch_sizes": [1, 8], "contexts": [128, 512, 2048], "decode_tokens": 32, "repeats": 3, "warmup": 1}
BENCH_QUICK = {"batch_sizes": [1, 2], "contexts": [32, 64], "decode_tokens": 4, "repeats": 1, "warmup": 0}

# The input checks of peft_lisa.jobs.checks under the names cmd_bench calls them by.
_check_model_arg = check_model_name
_device = resolve_device
_dtype = resolve_dtype
_load_analysis = load_analysis_file
_base_from_hint = base_model_from_hint


class CLIError(JobError):
    """An expected failure: reported as one line ``peft-lisa <command>: error: <message>``, no traceback."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (with a pointer to ``--help``) and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


_MAIN_EPILOG = """\
examples:
  peft-lisa analyze --output-dir lisa-analysis
  peft-lisa train --analysis lisa-analysis/analysis.json --share-fraction 0.5 --output-dir lisa-run
  peft-lisa train --output-dir lisa-run --resume latest
  peft-lisa calibrate --share-fraction 0.5 --output-dir lisa-calibrated
  peft-lisa eval --adapter lisa-run/adapter --compare-base
  peft-lisa merge --adapter lisa-run/adapter --output lisa-merged
  peft-lisa eval --merged lisa-merged
  peft-lisa bench --merged lisa-merged --quick

Run 'peft-lisa <command> --help' for the options of a command. Bad arguments exit with code 2 and one line
'peft-lisa <command>: error: ...'; failures while running exit with code 1 (--debug prints the traceback)."""


def build_parser() -> argparse.ArgumentParser:
    """The ``peft-lisa`` argument parser with its six subcommands."""
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
    common = common_parent()
    raw = argparse.RawDescriptionHelpFormatter
    add_analyze_parser(commands, common)
    add_train_parser(commands, common)
    add_calibrate_parser(commands, common)
    add_eval_parser(commands, common)
    add_merge_parser(commands, common)

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
    bench.add_argument(
        "--max-chain",
        type=positive_int,
        default=None,
        help="with --analysis: the longest run of adjacent shared layers to choose (default: no cap)",
    )
    bench.add_argument(
        "--layer-score",
        choices=SCORES,
        default=None,
        help="with --analysis: the score that ranks the layers (default: js_matched; sensitivity_calibrated, the "
        "default of train, needs an analysis run with --calibrated-sensitivity)",
    )
    bench.add_argument("--rank", type=even_rank, default=8, help="LiSA rank r (default: 8)")
    bench.add_argument(
        "--align-hidden", type=non_negative_int, default=0, help="alignment FFN size (default: 0 = linear only)"
    )
    bench.add_argument(
        "--head-mixing",
        choices=("full", "kv_group"),
        default="full",
        help="source heads the alignment mixes (LiSAConfig.head_mixing; default: full)",
    )
    group = bench.add_argument_group("grid")
    group.add_argument("--quick", action="store_true", help="CI size: batches 1,2; contexts 32,64; 4 decode steps")
    group.add_argument("--batch-sizes", type=int_list, default=None, help="default: 1,8")
    group.add_argument("--contexts", type=int_list, default=None, help="prompt lengths (default: 128,512,2048)")
    group.add_argument("--decode-tokens", type=positive_int, default=None, help="decode steps timed (default: 32)")
    group.add_argument("--repeats", type=positive_int, default=None, help="timed repetitions, median (default: 3)")
    group.add_argument("--warmup", type=non_negative_int, default=None, help="untimed repetitions (default: 1)")
    group.add_argument("--dtype", choices=DTYPE_NAMES, default=None, help="default: bfloat16 on GPU, float32 on CPU")
    group.add_argument("--memory-budget-gib", type=positive_float, default=None, help="max-throughput memory budget")
    group.add_argument("--budget-context", type=positive_int, default=None, help="context of the max-throughput run")
    group.add_argument("--no-max-throughput", action="store_true", help="skip the max-throughput measure")
    group.add_argument(
        "--base-on-rows",
        action="store_true",
        help="time the control instead of the base as loaded: the base with every layer decoding through the CPU "
        "kernel's decode rows, as the merged model's layers do, so that the decode ratios are LiSA's share alone "
        "(CPU, the kernel built)",
    )
    group.add_argument(
        "--cache",
        choices=CACHE_KINDS,
        default="dynamic",
        help="KV cache decoded on: dynamic (transformers' default, grown by torch.cat every step), static "
        "(StaticCache, written in place, as generate(cache_implementation='static') does) or compiled (static, the "
        "decode steps compiled by torch.compile as generate compiles them: one graph per shape); default: dynamic",
    )
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
# Commands: parse, call one library function, print its report
# --------------------------------------------------------------------------------------------------------------


def _job(cls: type, args: argparse.Namespace, **values: Any) -> Any:
    """A job (dataclass) from the parsed options: every field named like an option takes its value; ``values``
    give the others."""
    options = {field.name: getattr(args, field.name) for field in dataclasses.fields(cls) if hasattr(args, field.name)}
    return cls(**{**options, "progress": not args.no_progress, **values})


def _command_line(args: argparse.Namespace) -> str:
    return shlex.join([PROG, *(sys.argv[1:] if args.argv is None else args.argv)])


def cmd_analyze(args: argparse.Namespace) -> int:
    """``peft-lisa analyze``: :func:`peft_lisa.jobs.analyze`."""
    print(analyze(_job(AnalyzeJob, args, sensitivity=not args.no_sensitivity)).summary())
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """``peft-lisa train``: :func:`peft_lisa.jobs.train`; exit code 1 if the trained perplexity is not finite."""
    result = train(_job(TrainJob, args, learning_rate=args.lr, evaluate=args.eval, command=_command_line(args)))
    print(result.summary())
    result.check()
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    """``peft-lisa calibrate``: :func:`peft_lisa.jobs.calibrate`."""
    print(calibrate(_job(CalibrateJob, args, evaluate=args.eval, command=_command_line(args))).summary())
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """``peft-lisa eval``: :func:`peft_lisa.jobs.evaluate`."""
    window = {f"eval_{name}": getattr(args, name) for name in ("window", "stride", "max_tokens", "batch_size")}
    print(evaluate(_job(EvalJob, args, perplexity=not args.no_perplexity, **window)).summary())
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    """``peft-lisa merge``: :func:`peft_lisa.jobs.merge`."""
    print(merge(_job(MergeJob, args, verify=not args.no_verify, evaluate=args.eval)).summary())
    return 0


# --------------------------------------------------------------------------------------------------------------
# bench
# --------------------------------------------------------------------------------------------------------------


def cmd_bench(args: argparse.Namespace) -> int:
    """``peft-lisa bench``: check the arguments, run :func:`peft_lisa.benchmark.benchmark_model`, print its report."""
    _check_model_arg(args.model)
    device = _device(args.device)
    merged_dir, merged_config = check_merged_dir(args.merged) if args.merged else (None, None)
    if args.analysis and args.share_fraction is None:
        raise CLIError("--analysis needs --share-fraction (the fraction of layers to choose from it)")
    for name, value in (("--max-chain", args.max_chain), ("--layer-score", args.layer_score)):
        if value is not None and not args.analysis:
            raise CLIError(
                f"{name} applies to the layers chosen from --analysis: give --analysis and --share-fraction"
            )
    grid = dict(BENCH_QUICK if args.quick else BENCH_FULL)
    grid.update({name: getattr(args, name) for name in grid if getattr(args, name) is not None})
    analysis = _load_analysis(args.analysis) if args.analysis else None
    if args.layer_score is not None:
        check_analysis_score(analysis, args.analysis, args.layer_score)
    model = args.model
    if model is None and merged_config is not None:
        model = _base_from_hint(merged_config["lisa"].get("base_model"))
    gib = 1024**3
    from .benchmark import benchmark_model

    try:
        outputs = benchmark_model(
            model,
            merged=merged_dir,
            share_layers=args.share_layers,
            share_fraction=args.share_fraction,
            analysis=analysis,
            max_chain=args.max_chain,
            layer_score=args.layer_score,
            base_on_rows=args.base_on_rows,
            rank=args.rank,
            align_hidden=args.align_hidden,
            head_mixing=args.head_mixing,
            dtype=_dtype(args.dtype) if args.dtype else None,
            device=device,
            output_dir=args.output_dir,
            command=shlex.join([PROG, *(sys.argv[1:] if args.argv is None else args.argv)]),
            batch_sizes=tuple(grid["batch_sizes"]),
            contexts=tuple(grid["contexts"]),
            decode_tokens=grid["decode_tokens"],
            repeats=grid["repeats"],
            warmup=grid["warmup"],
            memory_budget_bytes=int(args.memory_budget_gib * gib) if args.memory_budget_gib else None,
            budget_context=args.budget_context,
            max_throughput=not args.no_max_throughput,
            memory_limit_bytes=int(args.memory_limit_gib * gib) if args.memory_limit_gib else None,
            max_prefill_tokens=args.max_prefill_tokens,
            cache=args.cache,
            progress=not args.no_progress,
        )
    except OSError as error:  # a model that does not load
        raise CLIError(str(error), EXIT_FAILURE) from None
    print(outputs.markdown)
    print("wrote " + ", ".join(str(path) for path in outputs.files))
    return 0


# --------------------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------------------

COMMANDS = {
    "analyze": cmd_analyze,
    "train": cmd_train,
    "calibrate": cmd_calibrate,
    "eval": cmd_eval,
    "merge": cmd_merge,
    "bench": cmd_bench,
}


@contextlib.contextmanager
def _progress_to_stderr(debug: bool) -> Iterator[None]:
    """Show the ``peft_lisa`` logger's records on stderr as ``[peft-lisa] message`` while a command runs."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"[{PROG}] %(message)s"))
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if debug else logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _disable_progress_bars() -> None:
    """Turn off the progress bars of transformers (weight loading) and datasets (tokenizing, packing)."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:  # datasets is only needed for training
        pass


def _exit_code(error: JobError) -> int:
    if isinstance(error, CLIError):
        return error.code
    return EXIT_FAILURE if isinstance(error, JobFailedError) else EXIT_USAGE


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
        with _progress_to_stderr(args.debug):
            if args.threads:
                import torch

                torch.set_num_threads(args.threads)
            if args.no_progress:
                _disable_progress_bars()
            return COMMANDS[args.command](args)
    except JobError as error:  # CLIError too
        if args.debug:
            traceback.print_exc()
        print(f"{prog}: error: {error}", file=sys.stderr)
        return _exit_code(error)
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
