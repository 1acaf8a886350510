"""LiSATrainer on a tiny local model, run by ``accelerate launch`` (DDP / FSDP2) or by plain ``python`` (one
process) from tests/test_distributed.py. Writes the trained adapter (saved by the trainer: once, from rank 0, gathered
from shards under FSDP2) and, on rank 0, ``adapter_params.pt`` (the full adapter parameters after training).

Usage: python train_lisa_dist.py MODEL_DIR OUTPUT_DIR PER_DEVICE_BATCH MAX_STEPS [--resume] [--save-steps N]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from pathlib import Path

import torch
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository (the worktree under test)

from peft_lisa import LiSAConfig  # noqa: E402
from peft_lisa.data import text_dataset  # noqa: E402
from peft_lisa.distributed import end_process_group, gather_adapter_state_dict  # noqa: E402
from peft_lisa.training import LiSACalibrationConfig, LiSATrainer, lisa_sft_config  # noqa: E402


def texts() -> list[str]:
    rng = random.Random(0)
    words = [f"w{i}" for i in range(20)]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(20, 80))) for _ in range(40)]


class StepCounter(TrainerCallback):
    def __init__(self, steps: list[int]) -> None:
        self.steps = steps

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


def allow_fsdp_on_cpu() -> None:
    """accelerate 1.16 enables FSDP only for accelerator devices (its FSDP switch lives in the MULTI_GPU branch of
    ``AcceleratorState``; on CPU it silently falls back to no distribution). torch's FSDP2 itself runs on CPU with
    gloo, so for the CPU test let accelerate take its multi-GPU path with gloo and the CPU device
    (``ACCELERATE_TORCH_DEVICE=cpu``). Only when ``LISA_TEST_FSDP_ON_CPU=1``; GPU runs do not need it."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    def prepare_backend(self, cpu=False, sagemaker_dp=False, backend=None):
        return "gloo", DistributedType.MULTI_GPU

    os.environ["ACCELERATE_TORCH_DEVICE"] = "cpu"
    PartialState._prepare_backend = prepare_backend


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("output_dir")
    parser.add_argument("batch_size", type=int)
    parser.add_argument("max_steps", type=int)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--save-steps", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    fsdp_on_cpu = os.environ.get("LISA_TEST_FSDP_ON_CPU") == "1"
    if fsdp_on_cpu:
        allow_fsdp_on_cpu()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    sft = lisa_sft_config(
        args.output_dir,
        max_steps=args.max_steps,
        seq_len=32,
        batch_size=args.batch_size,
        learning_rate=1e-2,
        warmup_steps=0,
        lr_scheduler_type="constant",
        logging_steps=1,
        train_sampling_strategy="sequential",  # the same global batches in every layout
        save_strategy="steps" if args.save_steps else "no",
        save_steps=args.save_steps or 500,
        # DDP on CPU: use_cpu makes accelerate's state MULTI_CPU (gloo). FSDP: use_cpu would make accelerate ignore
        # the FSDP config (plain DDP), so not with allow_fsdp_on_cpu (the tests hide CUDA: CUDA_VISIBLE_DEVICES="").
        use_cpu=not fsdp_on_cpu,
        disable_tqdm=True,
    )
    trainer = LiSATrainer(
        model=model,
        args=sft,
        train_dataset=text_dataset(texts()),
        processing_class=tokenizer,
        peft_config=LiSAConfig(share_layers=[2, 3], rank=4, task_type="CAUSAL_LM"),
        calibration=LiSACalibrationConfig(num_sequences=4, adam_steps=10),  # every process, before DDP/FSDP wraps
    )
    steps_here = []  # optimizer steps taken by this process (a resumed run takes only the remaining ones)
    trainer.add_callback(StepCounter(steps_here))
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    # Under FSDP2 the trained parameters are DTensor shards: each rank holds a slice of every adapter parameter.
    local = {name: p for name, p in trainer.model_wrapped.named_parameters() if "lisa_" in name}
    sharded = all(type(p).__name__ == "DTensor" for p in local.values())
    trainer.save_model(os.path.join(args.output_dir, "adapter"))
    state = gather_adapter_state_dict(trainer)  # collective: every rank calls it
    if trainer.accelerator.is_main_process:
        torch.save(
            {
                "params": state,
                "world_size": trainer.accelerator.num_processes,
                "distributed_type": str(trainer.accelerator.distributed_type),
                "sharded": sharded,
                "local_names": sorted(local),
                "step": trainer.state.global_step,
                "steps_this_run": len(steps_here),
                "calibration_kl": trainer.calibration_report.mean_kl_after if trainer.calibration_report else None,
                "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
            },
            os.path.join(args.output_dir, "adapter_params.pt"),
        )
    end_process_group()


if __name__ == "__main__":
    main()
