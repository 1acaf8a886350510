"""The ``peft-lisa`` command (peft_lisa.cli): help, argument errors, and the whole flow analyze -> train -> resume ->
eval -> merge -> eval --merged -> bench on a tiny random model saved to disk with a tiny word-level tokenizer.

Everything runs in-process through ``main(argv)`` (one subprocess checks the module entry point), on tiny sizes.
"""

from __future__ import annotations

import json
import math
import random
import re
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from peft_lisa.analysis import choose_share_layers
from peft_lisa.calibration_step import LiSACalibrationConfig
from peft_lisa.cli import main
from peft_lisa.generated_text import GENERIC_PROMPTS
from peft_lisa.jobs.checks import JobInputError, check_layer_choice
from peft_lisa.jobs.metrics import LICENSE_NOTE, perplexity_table
from peft_lisa.jobs.train_job import GENERATION_LABELS, TrainResult
from peft_lisa.tuner import cpu_kernel

from .conftest import REPO_ROOT, random_ids, record_decode_rows, require_cpu_kernel, run_python, tiny_model
from .test_training import WORDS, tiny_tokenizer

COMMANDS = ("analyze", "train", "calibrate", "eval", "merge", "bench")
RANK = 4
TRAIN = ["--seq-len", "32", "--batch-size", "2", "--logging-steps", "1", "--save-steps", "1"]
EVAL = ["--eval-window", "32", "--eval-stride", "16"]
WINDOW = ["--window", 32, "--stride", 16]


THREADS = torch.get_num_threads()


def setup_module():
    """One torch thread: tiny ops on the shared 2-core machines are much slower multi-threaded."""
    torch.set_num_threads(1)


def teardown_module():
    torch.set_num_threads(THREADS)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A directory with ``tiny/`` (a 5-layer llama + tokenizer), ``data.txt``, ``data.jsonl`` and ``hf/``."""
    root = tmp_path_factory.mktemp("cli")
    tiny_model("llama").save_pretrained(root / "tiny")
    tiny_tokenizer().save_pretrained(root / "tiny")
    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS[:20]) for _ in range(rng.randint(20, 80))) for _ in range(40)]
    (root / "data.txt").write_text("\n\n".join(docs))
    lines = "".join(json.dumps({"text": doc}) + "\n" for doc in docs)
    (root / "data.jsonl").write_text(lines)
    (root / "hf").mkdir()
    (root / "hf" / "train.jsonl").write_text(lines)
    return root


def tiny(work, data: str = "data.txt") -> list:
    """``--model`` the tiny model, ``--data`` one of the work files."""
    return ["--model", work / "tiny", "--data", work / data]


def analyze_at_quarter(work, data: str, batches: int, *options, output_dir) -> list:
    """An ``analyze`` command line on the tiny model: 16-token sequences, ``batches`` batches, fraction 0.25."""
    return ["analyze", *tiny(work, data), "--seq-len", "16", "--max-batches", str(batches), *options,
            "--fraction", "0.25", "--output-dir", output_dir]  # fmt: skip


def call(*argv) -> int:
    return main([str(item) for item in argv])


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(item) for item in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def ok(capsys, *argv) -> str:
    code, out, err = run(capsys, *argv)
    assert code == 0, f"exit code {code}\nstdout:\n{out}\nstderr:\n{err}"
    return out


# --------------------------------------------------------------------------------------------------------------
# Help and argument errors
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", COMMANDS)
def test_help_of_every_command(capsys, command):
    code, out, _ = run(capsys, command, "--help")
    assert code == 0
    assert out.startswith(f"usage: peft-lisa {command}")
    assert "--model" in out and "--debug" in out


def test_main_help_lists_the_commands(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0
    assert all(command in out for command in COMMANDS)


def test_no_command_is_a_usage_error(capsys):
    code, out, err = run(capsys)
    assert code == 2 and not out
    commands = "analyze, train, calibrate, eval, merge, bench"
    message = f"peft-lisa: error: choose a command: {commands} (see 'peft-lisa --help')"
    assert err.strip().splitlines() == [message]


def bad_argument_cases(work):
    lora = work / "lora"
    lora.mkdir(exist_ok=True)
    (lora / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    (work / "empty").mkdir(exist_ok=True)
    return [
        (["train", "--share-layers", "0,1"], "train", "layer 0 can never share"),
        (["train", "--share-layers", "2,x"], "train", "expected comma-separated layer indices"),
        (["train", "--share-layers", "2,2"], "train", "more than once"),
        (["train", "--share-layers", "2", "--share-fraction", "0.5"], "train", "not allowed with argument"),
        (["train", "--share-fraction", "1.5"], "train", "strictly between 0 and 1"),
        (["train", "--share-layers", "2,3", "--max-chain", "1"], "train", "drop it with --share-layers"),
        (["calibrate", "--share-layers", "2,3", "--max-chain", "1"], "calibrate", "drop it with --share-layers"),
        (["train", "--max-chain", "0"], "train", "positive"),
        (["train", "--max-chain", "2", "--resume"], "train", "drop --share-fraction/--analysis/--max-chain"),
        (["calibrate", "--adapter", lora, "--max-chain", "2"], "calibrate", "--adapter brings its own layers"),
        (["bench", "--max-chain", "2"], "bench", "--max-chain applies to the layers chosen from --analysis"),
        (["bench", "--layer-score", "js_indexed"], "bench", "--layer-score applies to the layers chosen from"),
        (
            ["bench", "--analysis", REPO_ROOT / "docs" / "analysis" / "smollm2_135m_analysis.json"]
            + ["--share-fraction", "0.5", "--layer-score", "sensitivity_calibrated"],
            "bench",
            "has no sensitivity_calibrated to choose layers by --layer-score: run 'peft-lisa analyze' with "
            "--calibrated-sensitivity",
        ),
        (["train", "--rank", "3"], "train", "must be even"),
        (["train", "--model", work / "missing"], "train", "no such directory"),
        (["train", "--data", work / "missing.jsonl"], "train", "no such file"),
        (["train", "--output-dir", work / "empty", "--resume"], "train", "no checkpoint-"),
        (["train", "--resume", work / "empty"], "train", "not a training checkpoint"),
        (["train", "--analysis", work / "missing.json"], "train", "no such file"),
        (
            ["train", "--loop-check", "40", "--max-new-tokens", "2"],
            "train",
            f"there are {len(GENERIC_PROMPTS)} everyday",
        ),
        (["train", "--loop-check", "2"], "train", "--loop-check needs generations: set --max-new-tokens > 0"),
        (
            ["train", "--self-generated", "64", "--self-generated-prompts", "20", "--loop-check", "16"]
            + ["--max-new-tokens", "2"],
            "train",
            "--self-generated-prompts 20 and --loop-check 16 overlap",
        ),
        (["train", "--self-generated", "64", "--self-generated-prompts", "33"], "train", "choose 1 to 32"),
        (["train", "--self-generated-share", "1"], "train", "strictly between 0 and 1"),
        (["analyze", "--model", work / "data.txt"], "analyze", "not a model directory"),
        (["eval", "--adapter", work / "missing"], "eval", "no such directory"),
        (["eval", "--adapter", lora], "eval", "not a LiSA adapter (its peft_type is 'LORA'"),
        (["eval", "--adapter", work / "tiny"], "eval", "no adapter_config.json"),
        (["eval", "--merged", work / "tiny"], "eval", "not a merged LiSA model"),
        (["eval", "--adapter", lora, "--merged", work / "tiny"], "eval", "not allowed with argument"),
        (["eval", "--compare-base"], "eval", "--compare-base needs --adapter"),
        (["eval", "--window", "8", "--stride", "16"], "eval", "larger than the window"),
        (["merge", "--adapter", lora, "--output", work / "out"], "merge", "not a LiSA adapter"),
        (["merge", "--adapter", lora], "merge", "required: --output"),
        (["bench", "--merged", lora], "bench", "not a model directory"),
        (["bench", "--share-layers", "0"], "bench", "layer 0 can never share"),
        (["bench", "--batch-sizes", "1,-2"], "bench", "positive integers"),
        (["frobnicate"], None, "invalid choice"),
    ]


def test_bad_arguments_give_one_line_and_exit_code_2(capsys, work):
    for argv, command, message in bad_argument_cases(work):
        code, out, err = run(capsys, *argv)
        lines = err.strip().splitlines()
        prefix = f"peft-lisa {command}: error: " if command else "peft-lisa: error: "
        assert code == 2, (argv, code, err)
        assert len(lines) == 1 and lines[0].startswith(prefix) and message in lines[0], (argv, err)
        assert "Traceback" not in err and not out


def test_layer_choice_check_refuses_a_bad_max_chain():
    """Python callers of the jobs (``TrainJob(max_chain=0)``) get the check that argparse gives the CLI."""
    for bad in (0, -2, True, 2.5):
        with pytest.raises(JobInputError, match=f"--max-chain {bad}: max_chain must be a positive integer"):
            check_layer_choice(None, 0.5, bad)
    check_layer_choice(None, 0.5, 2)  # fine: a cap on a chosen fraction


def test_share_layers_beyond_the_model_is_a_usage_error(capsys, work):
    code, _, err = run(
        capsys,
        "train",
        *tiny(work),
        "--share-layers",
        "2,7",
        "--output-dir",
        work / "never",
    )
    assert code == 2
    assert err.strip().splitlines()[-1] == (
        "peft-lisa train: error: --share-layers contains [7], but the model has 5 layers: valid indices are 1..4."
    )
    assert not (work / "never").exists()


def test_module_entry_point_and_no_traceback(work):
    """``python -m peft_lisa.cli``: help exits 0; a bad argument exits 2 with the error as last stderr line."""
    command = [sys.executable, "-m", "peft_lisa.cli"]
    done = subprocess.run([*command, "merge", "--help"], capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert done.returncode == 0 and "usage: peft-lisa merge" in done.stdout
    done = subprocess.run(
        [*command, "eval", "--adapter", str(work / "tiny")], capture_output=True, text=True, cwd=REPO_ROOT, timeout=300
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("peft-lisa eval: error: --adapter")


NO_TRAINING_EXTRAS = """
import sys

sys.modules["trl"] = None  # `import trl` fails, as where the train extras are not installed
sys.modules["datasets"] = None  # local text files need no datasets either
import peft_lisa.data
import peft_lisa.jobs
from peft_lisa.cli import main

data = ["--model", {tiny!r}, "--data", {data!r}, "--no-progress"]
analyze = ["--seq-len", "16", "--max-batches", "1", "--no-sensitivity", "--output-dir", {out!r}]
assert main(["analyze", *data, *analyze]) == 0
assert main(["eval", *data, "--window", "16", "--stride", "8", "--max-tokens", "64", "--max-new-tokens", "2"]) == 0
print("ok")
"""


def test_analyze_and_eval_need_no_training_extras(tmp_path, work):
    """``peft-lisa analyze`` and ``eval`` (and ``peft_lisa.data``, ``peft_lisa.jobs``) run where TRL and datasets
    cannot be imported."""
    code = NO_TRAINING_EXTRAS.format(tiny=str(work / "tiny"), data=str(work / "data.txt"), out=str(tmp_path / "a"))
    done = run_python(code, tmp_path)
    assert done.returncode == 0 and done.stdout.strip().splitlines()[-1] == "ok", done.stderr[-3000:]
    assert (tmp_path / "a" / "analysis.json").is_file()


# --------------------------------------------------------------------------------------------------------------
# The flow: analyze -> train -> resume -> eval -> merge -> eval --merged -> bench
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def analysis_dir(work):
    out = work / "analysis"
    assert (
        call("analyze", *tiny(work), "--seq-len", 32, "--batch-size", 2, "--max-batches", 2, "--output-dir", out) == 0
    )
    return out


@pytest.fixture(scope="module")
def run_dir(work, analysis_dir):
    """Two training steps with a checkpoint after each; layers from the analysis."""
    out = work / "run"
    layers = ["--analysis", analysis_dir / "analysis.json", "--share-fraction", 0.5, "--layer-score", "js_matched"]
    layers += ["--rank", RANK]
    assert (
        call(
            "train",
            *tiny(work),
            *layers,
            "--max-steps",
            2,
            *TRAIN,
            *EVAL,
            "--eval-base",
            "--eval-calibrated",
            "--eval-license",
            "--max-new-tokens",
            4,
            "--loop-check",
            2,
            "--output-dir",
            out,
        )
        == 0
    )
    return out


@pytest.fixture(scope="module")
def merged_dir(work, run_dir):
    out = work / "merged"
    assert call("merge", "--adapter", run_dir / "adapter", "--output", out) == 0
    return out


def test_analyze_writes_json_and_plots(capsys, work, analysis_dir):
    assert {p.name for p in analysis_dir.iterdir()} >= {
        "analysis.json",
        "attention_heatmap.png",
        "attention_layers.png",
    }
    data = json.loads((analysis_dir / "analysis.json").read_text())
    assert data["num_layers"] == 5 and data["sensitivity_direct"] is not None
    out = ok(capsys, *analyze_at_quarter(work, "data.jsonl", 1, "--no-sensitivity", output_dir=work / "analysis2"))
    assert "| layer | JS indexed |" in out
    expected = choose_share_layers(work / "analysis2" / "analysis.json", fraction=0.25)
    assert (
        f"suggested share_layers (1 of 5 layers, fraction 0.25, lowest js_matched, first 2 kept full): {expected[0]}\n"
        in out
    )


def test_layers_chosen_by_the_calibrated_score(capsys, work, analysis_dir):
    """``analyze --calibrated-sensitivity`` measures the score the jobs choose layers by; an analysis without it is
    refused by the default --layer-score, with the fix named, before anything is trained."""
    out = ok(
        capsys,
        *analyze_at_quarter(
            work,
            "data.txt",
            2,
            "--calibrated-sensitivity",
            "--score",
            "sensitivity_calibrated",
            output_dir=work / "analysis_calibrated",
        ),
    )
    data = json.loads((work / "analysis_calibrated" / "analysis.json").read_text())
    scores = data["sensitivity_calibrated"]
    assert scores[0] is None and all(value > 0 for value in scores[1:])
    best = min(range(2, 5), key=lambda layer: scores[layer])
    assert f"lowest sensitivity_calibrated, first 2 kept full): {best}\n" in out
    assert "--layer-score sensitivity_calibrated" in out
    code, _, err = run(
        capsys, "calibrate", *tiny(work), "--analysis", analysis_dir / "analysis.json", "--share-fraction", "0.5"
    )
    assert code == 2 and "has no sensitivity_calibrated" in err and "--calibrated-sensitivity" in err
    code, _, err = run(capsys, "analyze", *tiny(work), "--score", "sensitivity_calibrated")
    assert code == 2 and "only by an analysis with --calibrated-sensitivity" in err
    code, _, err = run(capsys, "analyze", *tiny(work), "--no-sensitivity", "--score", "sensitivity_direct")
    assert code == 2 and "only by an analysis without --no-sensitivity" in err


def test_train_saves_adapter_checkpoints_and_model_card(run_dir, analysis_dir):
    shared = choose_share_layers(analysis_dir / "analysis.json", fraction=0.5)
    adapter = run_dir / "adapter"
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "lisa_metrics.json"} <= {
        p.name for p in adapter.iterdir()
    }
    assert (adapter / "tokenizer_config.json").is_file()
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert not list(run_dir.parent.glob(".adapter.tmp-*"))  # atomic save cleaned up
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LISA" and config["share_layers"] == shared and config["rank"] == RANK
    assert config["base_model_name_or_path"] == str((run_dir.parent / "tiny").resolve())
    card = (adapter / "README.md").read_text()
    assert f"- Shared layers ({len(shared)}): {shared}" in card
    assert "compression" in card and f"- LiSA rank r (per head): {RANK}" in card
    metrics = json.loads((adapter / "lisa_metrics.json").read_text())
    ppl = metrics["perplexity"]
    assert ppl["window"] == 32 and ppl["stride"] == 16 and math.isfinite(ppl["ppl"])
    assert f"stride 16): {ppl['ppl']:.2f}" in card and "; base model)" in card
    results = json.loads((run_dir / "results.json").read_text())
    assert results["training"]["global_step"] == 2 and results["share_layers"] == shared
    # Calibrated before training (the default), measured before training, on both held-out texts.
    assert [row["layer"] for row in results["calibration"]["layers"]] == shared
    assert results["calibration_config"]["num_sequences"] == LiSACalibrationConfig().num_sequences
    assert {"base_perplexity", "calibrated_perplexity", "perplexity"} <= set(results["metrics"])
    assert {"base_perplexity", "calibrated_perplexity", "perplexity"} <= set(results["metrics"]["license"])
    generations = results["generations"]
    assert set(generations["loops"]) == {"base", "calibrated_lisa", "trained_lisa"}
    assert len(generations["calibrated_lisa"]) == len(generations["prompts"])
    check = results["loop_check"]  # --loop-check 2: the last two everyday prompts, answered by every model
    assert check["prompts"] == list(GENERIC_PROMPTS[-2:])
    assert {key: len(check[key]) for key in check["loops"]} == {"base": 2, "calibrated_lisa": 2, "trained_lisa": 2}
    counts = ", ".join(f"{label} {sum(map(bool, check['loops'][key]))}/2" for key, label in GENERATION_LABELS.items())
    summary = TrainResult(results, adapter, run_dir / "results.json").summary()
    assert f"looping on 2 more everyday prompts: {counts}" in summary
    assert "capped" not in summary  # the layer choice's cap on chains, when it had one
    capped = {**results, "layer_choice": {**results["layer_choice"], "max_chain": 2}}
    capped_summary = TrainResult(capped, adapter, run_dir / "results.json").summary()
    assert f"rank {RANK}; runs of adjacent shared layers capped at 2" in capped_summary
    # The perplexity table: both texts side by side, with the note on what the license text's gap means.
    heading, note, columns = summary.split("perplexity on the held-out part of", 1)[1].splitlines()[:3]
    assert "and on the license text" in heading and note == LICENSE_NOTE
    assert columns.split() == ["held-out", "vs", "base", "license", "text", "vs", "base"]
    without_license = {k: v for k, v in results["metrics"].items() if k != "license"}
    assert LICENSE_NOTE not in "\n".join(perplexity_table(without_license, "data.txt"))


def test_resume_continues_from_the_checkpoint(capsys, work, run_dir):
    # From an explicit checkpoint with no steps left: the saved adapter is exactly the checkpoint's weights.
    out = work / "resumed-explicit"
    ok(
        capsys,
        "train",
        *tiny(work),
        "--max-steps",
        "2",
        *TRAIN,
        "--no-eval",
        "--resume",
        run_dir / "checkpoint-2",
        "--output-dir",
        out,
    )
    expected = load_file(run_dir / "checkpoint-2" / "adapter_model.safetensors")
    actual = load_file(out / "adapter" / "adapter_model.safetensors")
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[key], actual[key]) for key in expected)
    # A conflicting layer choice is refused.
    conflicting = ["--share-layers", 1, "--resume", run_dir / "checkpoint-2", "--output-dir", out]
    code, _, err = run(capsys, "train", *tiny(work), *conflicting)
    assert code == 2 and "differs from the checkpoint's share_layers" in err.strip().splitlines()[-1]
    # --resume latest continues the run to step 3.
    resumed = work / "resumed-latest"
    for checkpoint in run_dir.glob("checkpoint-*"):
        shutil.copytree(checkpoint, resumed / checkpoint.name)
    printed = ok(
        capsys, "train", *tiny(work), "--max-steps", 3, *TRAIN, "--no-eval", "--output-dir", resumed, "--resume"
    )
    results = json.loads((resumed / "results.json").read_text())
    assert results["training"]["global_step"] == 3
    assert results["calibration"] is None  # a resumed run does not calibrate again
    assert results["training"]["resumed_from"] == str(resumed / "checkpoint-2")
    assert "trained to step 3" in printed
    assert (resumed / "checkpoint-3").is_dir()
    assert "Perplexity: not measured for this artifact" in (resumed / "adapter" / "README.md").read_text()


def test_calibrate_creates_or_loads_an_adapter_and_saves_the_report(capsys, work, run_dir):
    budget = ["--seq-len", 32, "--batch-size", 2, "--calibration-sequences", 4, "--calibration-steps", 5, *EVAL]
    out = work / "calibrated"
    printed = ok(
        capsys, "calibrate", *tiny(work), "--share-layers", "2,3", "--rank", RANK, *budget, "--output-dir", out
    )
    assert "| layer | source | KL before |" in printed and "held-out perplexity calibrated:" in printed
    results = json.loads((out / "results.json").read_text())
    report = json.loads((out / "adapter" / "lisa_calibration.json").read_text())
    assert [row["layer"] for row in report["layers"]] == [2, 3] == results["share_layers"]
    assert all(row["kl_after"] <= row["kl_before"] for row in report["layers"])
    assert (out / "calibration.md").is_file() and (out / "adapter" / "adapter_model.safetensors").is_file()
    # An existing adapter: its own layers, calibrated further, saved elsewhere.
    again = work / "recalibrated"
    ok(
        capsys,
        "calibrate",
        "--adapter",
        run_dir / "adapter",
        "--data",
        work / "data.txt",
        *budget,
        "--calibration-copy-blocks",
        2,
        "--output-dir",
        again,
    )
    recalibrated = json.loads((again / "adapter" / "lisa_calibration.json").read_text())
    assert (recalibrated["num_sequences"], recalibrated["copy_blocks"], report["copy_blocks"]) == (6, 2, 0)
    trained = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert json.loads((again / "results.json").read_text())["share_layers"] == trained["share_layers"]
    before = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    after = load_file(again / "adapter" / "adapter_model.safetensors")
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)
    code, _, err = run(capsys, "calibrate", "--adapter", run_dir / "adapter", "--rank", RANK)
    assert code == 2 and "--adapter brings its own layers" in err


def source_of_each_block(blocks: torch.Tensor, vocabularies: list[set[int]]) -> list[int]:
    """Which of ``vocabularies`` (token-id sets, disjoint) each block's tokens come from; -1 for a mixed block."""
    owners = []
    for row in blocks.tolist():
        found = [i for i, vocab in enumerate(vocabularies) if set(row) - {1} <= vocab]  # 1: EOS between documents
        owners.append(found[0] if len(found) == 1 else -1)
    return owners


@pytest.fixture(scope="module")
def domain_files(work):
    """Two text files of disjoint words (w20-w39, w40-w59) and the token ids of each."""
    rng, tokenizer, vocabularies = random.Random(1), tiny_tokenizer(), []
    for name, words in (("domain_a.txt", WORDS[20:40]), ("domain_b.txt", WORDS[40:60])):
        docs = [" ".join(rng.choice(words) for _ in range(rng.randint(20, 60))) for _ in range(30)]
        (work / name).write_text("\n\n".join(docs))
        vocabularies.append(set(tokenizer.convert_tokens_to_ids(words)))
    return [work / "domain_a.txt", work / "domain_b.txt"], vocabularies


def test_calibration_data_sources_are_calibrated_on_in_equal_shares(capsys, work, domain_files, monkeypatch):
    """``--calibration-data A B`` (calibrate and train): the calibration reads the two sources' blocks in turn instead
    of --data, and the results record them; a missing source, or calibration data without calibration, is refused."""
    from peft_lisa import calibration_step
    from peft_lisa.jobs import calibrate_job

    (a, b), vocabularies = domain_files
    given = []

    def recording(real):
        def calibrate(peft_model, tokenizer, texts, **kwargs):
            given.append(texts)
            return real(peft_model, tokenizer, texts, **kwargs)

        return calibrate

    monkeypatch.setattr(calibrate_job, "calibrate_layers", recording(calibrate_job.calibrate_layers))
    monkeypatch.setattr(calibration_step, "calibrate", recording(calibration_step.calibrate))
    layers = ["--share-layers", "2,3", "--rank", RANK, "--calibration-sequences", 5, "--calibration-steps", 2]
    out = work / "calibrated_domains"
    printed = ok(capsys, "calibrate", *tiny(work), *layers, "--seq-len", 16, "--no-eval", "--calibration-data", a, b,
                 "--output-dir", out)  # fmt: skip
    assert f"calibrated on {a}, {b}\n" in printed
    assert given[-1].shape == (5, 16)
    assert source_of_each_block(given[-1], vocabularies) == [0, 1, 0, 1, 0]
    assert json.loads((out / "results.json").read_text())["calibration_data"] == [str(a), str(b)]

    trained = work / "train_domains"
    ok(capsys, "train", *tiny(work), *layers, "--max-steps", 1, *TRAIN, "--no-eval", "--calibration-data", b, a,
       "--output-dir", trained)  # fmt: skip
    assert given[-1].shape == (5, 32)  # the training's sequence length (--seq-len 32)
    assert source_of_each_block(given[-1], vocabularies) == [1, 0, 1, 0, 1]
    results = json.loads((trained / "results.json").read_text())
    assert results["calibration_data"] == [str(b), str(a)] and results["calibration"]["num_sequences"] == 5

    code, _, err = run(capsys, "calibrate", *tiny(work), *layers, "--calibration-data", a, work / "missing.txt")
    assert code == 2 and "--calibration-data" in err and "missing.txt: no such file" in err
    code, _, err = run(capsys, "train", *tiny(work), *layers, "--no-calibrate", "--calibration-data", a)
    assert code == 2 and "--calibration-data needs calibration" in err
    code, _, err = run(
        capsys, "train", *tiny(work), "--resume", "latest", "--output-dir", trained, "--calibration-data", a
    )
    assert code == 2 and "drop --calibration-data" in err
    code, _, err = run(
        capsys, "train", *tiny(work), *layers[:4], "--calibration-sequences", 1, "--calibration-data", a, b
    )
    assert code == 2 and "2 sources for --calibration-sequences 1" in err
    # a source too short for its share: refused before the layers are chosen or anything is trained
    (work / "short.txt").write_text("w20 w21 w22")
    code, _, err = run(
        capsys,
        "calibrate",
        *tiny(work),
        *layers,
        "--no-eval",
        "--calibration-data",
        a,
        work / "short.txt",
        "--output-dir",
        work / "short",
    )
    assert code == 2 and f"calibration {work / 'short.txt'} gives 0 of the 2 blocks" in err


def test_eval_adapter_prints_perplexity_and_generations(capsys, work, run_dir):
    report = work / "eval.json"
    adapter = ["--adapter", run_dir / "adapter", "--data", work / "data.txt", *WINDOW, "--compare-base"]
    code, out, err = run(capsys, "eval", *adapter, "--max-new-tokens", 4, "--prompts", "w1 w2", "w3", "--json", report)
    assert code == 0, err
    # Progress lines go to stderr through the peft_lisa logger.
    assert f"[peft-lisa] applying the adapter {run_dir / 'adapter'}\n" in err
    results = json.loads(report.read_text())
    trained = json.loads((run_dir / "adapter" / "lisa_metrics.json").read_text())["perplexity"]
    assert results["perplexity"]["ppl"] == pytest.approx(trained["ppl"], rel=1e-6)
    assert results["base_perplexity"]["num_tokens"] == results["perplexity"]["num_tokens"]
    assert f"perplexity: {trained['ppl']:.2f} (" in out and "window 32, stride 16" in out
    assert [g["prompt"] for g in results["generations"]] == ["w1 w2", "w3"]
    assert ">>> w1 w2" in out and "[LiSA adapter]" in out and "[base model]" in out


@pytest.mark.parametrize("data", ["data.jsonl", "hf"])
def test_eval_base_model_on_jsonl_and_dataset_inputs(capsys, work, data):
    out = ok(
        capsys, "eval", *tiny(work, data), "--split", "all", "--window", 32, "--stride", 32, "--max-new-tokens", 0
    )
    assert re.search(r"perplexity: [0-9.]+ \(\S+ all, [0-9,]+ tokens, window 32, stride 32\)", out)
    assert ">>>" not in out


def test_merge_writes_a_compact_model_that_reloads(work, run_dir, merged_dir):
    from peft import PeftModel

    assert {"config.json", "model.safetensors", "README.md", "tokenizer_config.json"} <= {
        p.name for p in merged_dir.iterdir()
    }
    config = json.loads((merged_dir / "config.json").read_text())
    adapter_config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert config["model_type"] == "lisa_llama"
    assert config["lisa"]["share_layers"] == adapter_config["share_layers"] and config["lisa"]["rank"] == RANK
    card = (merged_dir / "README.md").read_text()
    assert f"- Shared layers ({len(adapter_config['share_layers'])}): {adapter_config['share_layers']}" in card
    assert "compression" in card and "measured with the adapter" in card
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(work / "tiny"), run_dir / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(merged(random_ids()).logits, reference.eval()(random_ids()).logits)
    for layer in adapter_config["share_layers"]:
        assert not hasattr(merged.model.layers[layer].self_attn, "q_proj")


def test_model_card_one_liners_load_in_a_fresh_process(tmp_path, run_dir, merged_dir):
    """The ``## Load`` snippet of each model card, with PATH filled in, runs in a fresh interpreter."""
    snippets = []
    for directory in (run_dir / "adapter", merged_dir):
        card = (directory / "README.md").read_text()
        snippets.append(card.split("```python\n")[1].split("```")[0].replace("PATH", str(directory)))
    code = "\n".join(snippets) + "\nprint(type(model).__name__)\n"
    done = run_python(code, tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "LiSALlamaForCausalLM"


def test_eval_merged_matches_the_adapter(capsys, work, run_dir, merged_dir):
    report = work / "eval-merged.json"
    merged = ["--merged", merged_dir, "--data", work / "data.txt", *WINDOW]
    ok(capsys, "eval", *merged, "--max-new-tokens", 3, "--prompts", "w1 w2", "--json", report)
    results = json.loads(report.read_text())
    trained = json.loads((run_dir / "adapter" / "lisa_metrics.json").read_text())["perplexity"]
    assert results["kind"] == "merged LiSA model"
    assert results["perplexity"]["ppl"] == pytest.approx(trained["ppl"], rel=1e-4)


def test_bench_on_the_control_base(capsys, work, monkeypatch):
    """``--base-on-rows`` benchmarks the merged model against the control (the base with every layer on the CPU
    kernel's decode rows): the base's decode steps take the rows, the results say so; where the rows do not run it
    is refused with the reason."""
    require_cpu_kernel(monkeypatch)
    calls = record_decode_rows(monkeypatch, cpu_kernel.load_cpu_kernel())

    def by_handed() -> tuple[int, int]:  # calls without handed logits, calls with them
        handed = [call[1] for call in calls]
        return handed.count(False), handed.count(True)

    out = work / "bench-control"
    grid = ["--quick", "--batch-sizes", 1, "--contexts", 16, "--repeats", 1, "--warmup", 0, "--no-max-throughput"]
    model = ["--model", work / "tiny", "--share-layers", "3", "--rank", 4]
    printed = ok(capsys, "bench", *model, *grid, "--output-dir", out)
    assert "peft-lisa bench --base-on-rows times a base whose every layer decodes by the rows" in printed
    merged_only = by_handed()  # the merged model's layers; the sdpa base's take no rows
    assert merged_only[0] > 0 and merged_only[1] > 0  # its full and source layers', its shared layer's
    calls.clear()
    printed = ok(capsys, "bench", *model, *grid, "--base-on-rows", "--output-dir", out)
    # the base's 5 layers take as many calls as the merged model's 5, all without handed logits
    assert by_handed() == (merged_only[0] + sum(merged_only), merged_only[1])
    results = json.loads((out / "results.json").read_text())
    assert results["models"]["base"]["attn_implementation"] == "sdpa, decode steps on the CPU kernel's rows"
    assert results["models"]["merged"]["attn_implementation"] == "sdpa"
    assert "| base on rows |" in (out / "results.md").read_text()  # the tables (and the plot) name the control
    assert "every layer of the base model decodes through them here" in printed and "LiSA's share alone" in printed
    assert "--base-on-rows" in results["settings"]["command"]
    monkeypatch.setenv(cpu_kernel.SETTING_VARIABLE, "off")
    code, _, err = run(capsys, "bench", *model, *grid, "--base-on-rows", "--output-dir", out)
    assert code == 2 and "base_on_rows: the control decodes through the CPU kernel's decode rows" in err
    monkeypatch.delenv(cpu_kernel.SETTING_VARIABLE)
    code, _, err = run(capsys, "bench", *model, *grid, "--base-on-rows", "--dtype", "float16", "--output-dir", out)
    assert code == 2 and "take float32 or bfloat16 values, not torch.float16" in err


def test_merge_with_eval_and_bench_quick(capsys, work, run_dir, merged_dir):
    out_dir = work / "merged-eval"
    merge = ["--adapter", run_dir / "adapter", "--output", out_dir, "--eval", "--data", work / "data.txt", *EVAL]
    printed = ok(capsys, "merge", *merge, "--no-verify")
    assert "Q/K of the shared layers" in printed and "| **shared layers** |" in printed
    assert "measured with the adapter" not in (out_dir / "README.md").read_text()

    bench = work / "bench"
    quick = ["--quick", "--no-max-throughput", "--output-dir", bench]
    code, _, err = run(capsys, "bench", "--merged", merged_dir, *quick)
    assert code == 0, err
    # Each grid point's progress line is printed once (tqdm's logging redirect once gave the root logger a handler
    # too, and every line came twice).
    assert [line.split("B=1 T=32:")[0] for line in err.splitlines() if "B=1 T=32:" in line] == ["[peft-lisa] "], err
    results = json.loads((bench / "results.json").read_text())
    assert {run["model"] for run in results["runs"]} == {"base", "merged"}
    assert results["settings"]["command"].startswith("peft-lisa bench --merged")
    assert results["settings"]["cache"] == "dynamic"
    assert (bench / "results.md").is_file()

    bench2 = work / "bench-untrained"
    untrained = ["--model", work / "tiny", "--share-layers", "3,4", "--rank", 4]
    grid = ["--quick", "--batch-sizes", 1, "--contexts", 16, "--no-max-throughput", "--cache", "static"]
    ok(capsys, "bench", *untrained, *grid, "--output-dir", bench2)
    results = json.loads((bench2 / "results.json").read_text())
    assert results["settings"]["cache"] == "static"
    assert results["models"]["merged"]["share_layers"] == [3, 4]
