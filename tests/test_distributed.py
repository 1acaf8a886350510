"""LiSATrainer under ``accelerate launch`` with 2 CPU processes (gloo): DDP and FSDP2 (``fully_shard``).

The same global batches (sequential sampling, packed rows of 32 tokens, constant learning rate) are trained for 3
steps by one process with batch 2 and by 2 processes with batch 1 each; the adapters must agree within
``ATOL`` (float32 gradients reduced across processes in another order: measured difference ~1e-6). The adapter
saved by ``trainer.save_model`` (rank 0; gathered from the shards under FSDP2) must reload to the same values, and
an FSDP2 run resumed from its step-2 checkpoint must end where the uninterrupted run ends.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .conftest import REPO_ROOT, tiny_model
from .test_training import tiny_tokenizer

SCRIPT = REPO_ROOT / "tests" / "distributed" / "train_lisa_dist.py"
CONFIGS = REPO_ROOT / "tests" / "distributed"
ATOL = 1e-5
STEPS = 3


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", **extra)
    return env


def _run(command: list[str], env: dict[str, str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]


def _launch(config: str, model_dir: Path, out: Path, *extra: str, **env: str) -> dict:
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config)]
    _run(accelerate + [str(SCRIPT), str(model_dir), str(out), "1", str(STEPS), *extra], _env(**env))
    return torch.load(out / "adapter_params.pt")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tiny")
    tiny_model(intermediate_size=128).save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def single(model_dir, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("single")
    _run([sys.executable, str(SCRIPT), str(model_dir), str(out), "2", str(STEPS)], _env())
    return torch.load(out / "adapter_params.pt")


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b) and len(a) == 6  # 2 shared layers x (align, q_lowrank, k_lowrank)
    return max((a[name] - b[name]).abs().max().item() for name in a)


def _saved(out: Path) -> dict[str, torch.Tensor]:
    """The saved adapter's tensors under the names of the trained parameters (PEFT drops the adapter name)."""
    return {
        name.replace("lisa_substitute.", "lisa_substitute.default."): tensor
        for name, tensor in load_file(out / "adapter" / "adapter_model.safetensors").items()
    }


def test_ddp_two_processes_match_one_process(model_dir, single, tmp_path):
    out = tmp_path / "ddp"
    run = _launch("ddp_cpu.yaml", model_dir, out)
    assert run["world_size"] == 2 and run["distributed_type"] == "DistributedType.MULTI_CPU"  # DDP, gloo
    assert single["world_size"] == 1 and run["step"] == single["step"] == STEPS
    # Calibrated before training in both layouts (every process, the same texts and seed), to the same result.
    assert run["calibration_kl"] is not None and run["calibration_kl"] == pytest.approx(single["calibration_kl"])
    assert run["losses"] == pytest.approx(single["losses"], abs=ATOL)
    trained = {name.removeprefix("module."): value for name, value in run["params"].items()}  # DDP's wrapper
    assert _max_difference(trained, single["params"]) < ATOL
    assert _max_difference(_saved(out), single["params"]) < ATOL
    # The adapter moved: a run that trained nothing would also "match".
    assert max((single["params"][name] - trained[name]).abs().max().item() for name in trained) > 0


def test_fsdp2_two_processes_match_one_process_save_and_resume(model_dir, single, tmp_path):
    out = tmp_path / "fsdp2"
    run = _launch("fsdp2_cpu.yaml", model_dir, out, "--save-steps", "2", LISA_TEST_FSDP_ON_CPU="1")
    assert run["world_size"] == 2 and run["distributed_type"] == "DistributedType.FSDP"
    assert run["sharded"], "the adapter parameters were not sharded: FSDP2 did not wrap the model"
    assert run["losses"] == pytest.approx(single["losses"], abs=ATOL)
    assert _max_difference(run["params"], single["params"]) < ATOL  # gathered from the shards
    assert _max_difference(_saved(out), single["params"]) < ATOL  # saved once, full tensors
    # Resume from checkpoint-2: only step 3 is trained again, and it ends where the uninterrupted run ended.
    assert (out / "checkpoint-2").is_dir()
    shutil.rmtree(out / "adapter")
    (out / "adapter_params.pt").unlink()
    for later in out.glob("checkpoint-3"):
        shutil.rmtree(later)
    resumed = _launch("fsdp2_cpu.yaml", model_dir, out, "--resume", "--save-steps", "2", LISA_TEST_FSDP_ON_CPU="1")
    assert resumed["steps_this_run"] == 1 and resumed["step"] == STEPS
    assert resumed["calibration_kl"] is None  # a resumed run does not calibrate again
    assert _max_difference(resumed["params"], single["params"]) < ATOL
    assert _max_difference(_saved(out), single["params"]) < ATOL


def test_peft_lisa_train_under_ddp_saves_once_and_matches_one_process(tmp_path):
    """``accelerate launch -m peft_lisa.cli train`` with DDP: the main process saves the adapter and results.json,
    which equal a one-process ``peft-lisa train`` on the same global batches (batch 1 x 2 processes vs 2 x 1)."""
    import random

    from safetensors.torch import load_file as load

    model_dir = tmp_path / "tiny"
    tiny_model(intermediate_size=128).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    rng = random.Random(0)
    words = [f"w{i}" for i in range(20)]
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(20, 80))) for _ in range(60)]
    (tmp_path / "docs.txt").write_text("\n\n".join(docs))
    common = ["train", "--model", str(model_dir), "--data", str(tmp_path / "docs.txt"), "--share-layers", "2,3"]
    common += ["--rank", "4", "--max-steps", "2", "--seq-len", "32", "--logging-steps", "1", "--no-eval"]
    common += ["--lr", "1e-2", "--threads", "1", "--no-progress"]
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "ddp_cpu.yaml")]
    _run(
        accelerate + ["-m", "peft_lisa.cli", *common, "--batch-size", "1", "--output-dir", str(tmp_path / "ddp")],
        _env(),
    )
    _run(
        [sys.executable, "-m", "peft_lisa.cli", *common, "--batch-size", "2", "--output-dir", str(tmp_path / "one")],
        _env(),
    )
    ddp, one = (load(tmp_path / run / "adapter" / "adapter_model.safetensors") for run in ("ddp", "one"))
    assert set(ddp) == set(one) and len(ddp) == 6
    assert max((ddp[name] - one[name]).abs().max().item() for name in ddp) < ATOL
    results, single = (json.loads((tmp_path / run / "results.json").read_text()) for run in ("ddp", "one"))
    assert results["training"]["global_step"] == 2
    assert results["training"]["train_loss"] == pytest.approx(single["training"]["train_loss"], abs=ATOL)
    # The adapter moved (a step with a non-zero learning rate and gradient), so matching is not trivial.
    assert any(e.get("learning_rate", 0) > 0 and e.get("grad_norm", 0) > 0 for e in results["training"]["log_history"])
