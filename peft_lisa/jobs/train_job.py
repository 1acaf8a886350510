"""The training job (``peft-lisa train``, ``examples/train_lisa.py``): train a LiSA adapter with TRL's SFTTrainer,
measure it, save it with its model card, and write ``results.json``."""

from __future__ import annotations

import logging
import math
import os
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from ..calibration import DEFAULT_ADAM_STEPS, DEFAULT_LR, DEFAULT_NUM_SEQUENCES
from ..calibration_step import calibration_seq_len
from ..data import (
    evaluation_texts,
    is_conversational_dataset,
    license_text,
    load_evaluation_texts,
    load_sft_dataset,
)
from ..distributed import end_process_group
from ..evaluation import repeated_ngram
from ..generated_text import GENERIC_PROMPTS, mixed_dataset, sample_answers
from ..tuner.artifacts import atomic_directory, save_adapter
from ..tuner.compression import qk_compression_report
from .checks import (
    HeldOutPerplexityOptions,
    JobFailedError,
    JobInputError,
    JobOptions,
    check_data_source,
    check_layer_choice,
    check_model_name,
    load_analysis_file,
    load_prompts,
    model_label,
    resolve_device,
)
from .metrics import (
    ADAPTER_METRICS_FILE,
    LICENSE_KEY,
    PERPLEXITY_LABELS,
    card_metrics,
    measure_perplexity,
    perplexity_table,
    sample_generations,
    to_json,
    write_text_atomic,
)
from .train_setup import (
    DEFAULT_LAYER_SCORE,
    NEW_ADAPTER_OPTIONS,
    calibration_data_blocks,
    check_calibration_data,
    choose_lisa_config,
    config_from_checkpoint,
    find_checkpoint,
    load_training_model,
    portable_base_name,
)

logger = logging.getLogger("peft_lisa")

TRAIN_RESULTS_FILE = "results.json"
GENERATION_LABELS = {"base": "base model", "calibrated_lisa": "calibrated LiSA", "trained_lisa": "trained LiSA"}
# TrainJob fields passed on under their own names to choose_lisa_config, lisa_sft_config, LiSADistillationConfig.
LAYER_OPTIONS = (*NEW_ADAPTER_OPTIONS, "progress")
SFT_OPTIONS = (
    "max_steps",
    "seq_len",
    "batch_size",
    "learning_rate",
    "gradient_checkpointing",
    "logging_steps",
    "seed",
)
SFT_OPTIONS += ("save_steps", "save_total_limit")
DISTILLATION_OPTIONS = ("attn_kl_weight", "attn_kl_warmup_steps", "attn_kl_layer_reduction", "output_kl_weight")
DISTILLATION_OPTIONS += ("temperature", "lm_weight")


@dataclass(kw_only=True)
class TrainJob(JobOptions, HeldOutPerplexityOptions):
    """What :func:`train` does; the fields are the options of ``peft-lisa train`` (``--help`` explains each).

    Model and data (:class:`~.checks.JobOptions`): ``model``, ``load_in_4bit``; ``data``, ``text_field``, ``split``
    (what to train on; the perplexity uses the held-out part), ``held_out_fraction``; ``device``, ``progress``.
    Layers (see :func:`~.train_setup.choose_lisa_config`): ``share_layers`` or ``share_fraction``, ``layer_score``,
    ``analysis`` (an analysis.json path), ``keep_first``, ``max_chain``, ``analysis_batches``, ``rank``,
    ``align_hidden``;
    ``resume`` (a checkpoint directory or ``"latest"``) takes them from the checkpoint instead.
    Training: ``max_steps``, ``seq_len``, ``batch_size``, ``learning_rate``, ``packing`` (auto/yes/no),
    ``gradient_checkpointing``, ``seed``, ``logging_steps``, ``save_steps``, ``save_total_limit``;
    ``self_generated`` (tokens, 0: off): the base model's sampled answers to the first ``self_generated_prompts``
    everyday prompts (:func:`peft_lisa.generated_text.sample_answers`), mixed into the training data to make
    ``self_generated_share`` of its tokens (:func:`peft_lisa.generated_text.mixed_dataset`); calibration still uses
    the data alone.
    Calibration before training (:class:`peft_lisa.training.LiSATrainer`; not when resuming): ``calibrate``,
    ``calibration_sequences``, ``calibration_steps`` (Adam steps per shared layer), ``calibration_lr``,
    ``calibration_copy_blocks`` (blocks of repeated random-token runs added, :func:`peft_lisa.calibrate`),
    ``calibration_data`` (sources calibrated on in equal shares instead of the data, read as ``data`` is).
    Objective (:class:`peft_lisa.training.LiSADistillationConfig`): ``lm_weight`` (the LM loss), ``attn_kl_weight``,
    ``attn_kl_warmup_steps`` (linear decay to 0 over them), ``attn_kl_layer_reduction``, ``output_kl_weight``,
    ``temperature``.
    Evaluation on the held-out text: ``evaluate`` (trained perplexity), ``eval_base`` (base model, before training),
    ``eval_untrained`` (the untrained adapter), ``eval_calibrated`` (the calibrated adapter, before training), with
    :class:`~.checks.HeldOutPerplexityOptions`; ``eval_license`` measures each of them on a second held-out text from
    another domain too (:func:`peft_lisa.data.license_text`); greedy generations of ``max_new_tokens`` tokens (0:
    none) for ``prompts`` (None: the built-in ones) by the trained adapter, by the base model with ``eval_base`` and
    by the calibrated adapter with ``eval_calibrated``, each checked for loops
    (:func:`peft_lisa.evaluation.repeated_ngram`); ``loop_check`` more everyday prompts answered by the same models,
    of which only the loop counts are printed (:func:`loop_check_prompts`).
    ``output_dir`` receives the checkpoints, ``adapter/`` and ``results.json``; ``command`` is recorded in it.
    """

    load_in_4bit: bool = False
    share_layers: Optional[list[int]] = None
    share_fraction: Optional[float] = None
    layer_score: str = DEFAULT_LAYER_SCORE
    analysis: Optional[str] = None
    keep_first: int = 2
    max_chain: Optional[int] = None
    analysis_batches: int = 2
    rank: Optional[int] = None
    align_hidden: Optional[int] = None
    head_mixing: Optional[str] = None
    max_steps: int = 120
    seq_len: int = 256
    batch_size: int = 2
    learning_rate: float = 2e-3
    packing: str = "auto"
    self_generated: int = 0
    self_generated_prompts: int = 16
    self_generated_share: float = 0.5
    gradient_checkpointing: bool = False
    seed: int = 0
    logging_steps: int = 10
    save_steps: int = 50
    save_total_limit: int = 2
    resume: Optional[str] = None
    calibrate: bool = True
    calibration_sequences: int = DEFAULT_NUM_SEQUENCES
    calibration_steps: int = DEFAULT_ADAM_STEPS
    calibration_lr: float = DEFAULT_LR
    calibration_copy_blocks: int = 0
    calibration_data: Optional[list[str]] = None
    attn_kl_weight: float = 0.0
    attn_kl_warmup_steps: int = 0
    attn_kl_layer_reduction: str = "mean"
    output_kl_weight: float = 0.0
    temperature: float = 1.0
    lm_weight: float = 1.0
    evaluate: bool = True
    eval_base: bool = False
    eval_untrained: bool = False
    eval_calibrated: bool = False
    eval_license: bool = False
    max_new_tokens: int = 0
    prompts: Optional[list[str]] = None
    loop_check: int = 0
    output_dir: str | os.PathLike = "lisa-run"
    command: Optional[str] = None


def loop_check_prompts(count: int) -> list[str]:
    """The last ``count`` everyday prompts of :data:`peft_lisa.generated_text.GENERIC_PROMPTS` (the first ones are
    those ``--self-generated`` samples training text from)."""
    if count < 0:
        raise JobInputError(f"--loop-check {count}: give a number of prompts >= 0")
    if count > len(GENERIC_PROMPTS):
        raise JobInputError(f"--loop-check {count}: there are {len(GENERIC_PROMPTS)} everyday prompts; ask for fewer")
    return list(GENERIC_PROMPTS[len(GENERIC_PROMPTS) - count :])


def check_self_generated(job: TrainJob) -> None:
    """Refuse self-generated settings that cannot work, or that would count loops on the prompts it trains on."""
    total = len(GENERIC_PROMPTS)
    if not 1 <= job.self_generated_prompts <= total:
        raise JobInputError(f"--self-generated-prompts {job.self_generated_prompts}: choose 1 to {total}")
    if not 0 < job.self_generated_share < 1:
        raise JobInputError(f"--self-generated-share {job.self_generated_share}: choose a number between 0 and 1")
    if job.self_generated_prompts + job.loop_check > total and job.max_new_tokens:
        raise JobInputError(
            f"--self-generated-prompts {job.self_generated_prompts} and --loop-check {job.loop_check} overlap: the "
            f"loop check would count prompts the adapter was trained to answer; together they may use {total}"
        )


def loop_counts(loops: dict[str, list[Optional[str]]]) -> str:
    """``base model 1/16, trained LiSA 5/16``: how many generations of each model loop."""
    return ", ".join(
        f"{GENERATION_LABELS[key]} {sum(1 for x in value if x)}/{len(value)}" for key, value in loops.items()
    )


@dataclass
class TrainResult:
    """What :func:`train` produced: ``results`` is what ``results.json`` holds; the adapter is in ``adapter_dir``."""

    results: dict[str, Any]
    adapter_dir: Path
    results_file: Path

    @property
    def metrics(self) -> dict[str, Any]:
        """The measured perplexities (also in the adapter's ``lisa_metrics.json``)."""
        return self.results.get("metrics", {})

    def summary(self) -> str:
        """The report ``peft-lisa train`` prints: layers, compression, training, perplexities, generations."""
        if "training" not in self.results:  # a non-main process of a multi-process run
            return f"process {self.results.get('rank')}: trained; the main process measures, saves and reports"
        results, training = self.results, self.results["training"]
        choice = results.get("layer_choice") or {}
        cap = f"; runs of adjacent shared layers capped at {choice['max_chain']}" if choice.get("max_chain") else ""
        lines = [
            f"shared layers: {results['share_layers']}; rank {results['rank']}{cap}",
            f"Q/K compression of the shared layers: {results['qk_compression']['ratio']:.2f}x",
            f"trained to step {training['global_step']} ({training['wall_minutes']:.1f} min, loss "
            f"{training['train_loss']:.4f}, {training['tokens_seen']:,} tokens seen); total {results['total_minutes']}"
            " min",
        ]
        if choice.get("analysis_minutes") is not None:
            lines.append(f"layers chosen by {choice['method']} ({choice['analysis_minutes']:.1f} min)")
        if results.get("self_generated"):
            mix = results["self_generated"]
            lines.append(
                f"trained on the data mixed with {mix['answers']} of the base model's own answers to {mix['prompts']} "
                f"everyday prompts ({mix['share']:.0%} of the tokens; {mix['minutes']:.1f} min to sample)"
            )
        if "calibration" in results and results["calibration"]:
            calibration = results["calibration"]
            lines.append(
                f"calibrated {len(calibration['layers'])} layers: mean attention KL"
                f" {calibration['mean_kl_before']:.3f}"
                f" -> {calibration['mean_kl_after']:.3f} ({calibration['seconds'] / 60:.1f} min)"
            )
        lines += perplexity_table(self.metrics, results["data"])
        generations = results.get("generations", {})
        prompts = generations.get("prompts", [])
        loops = generations.get("loops", {})
        for index, prompt in enumerate(prompts):
            lines.append(f"\n>>> {prompt}")
            for key, label in GENERATION_LABELS.items():
                if key in generations:
                    loop = loops.get(key, [None] * len(prompts))[index]
                    lines.append(
                        f"  [{label}] {generations[key][index]!r}" + (f"  <- LOOPS: {loop!r}" if loop else "")
                    )
        if loops:
            lines.append(f"\nlooping generations (a phrase repeated 3 times): {loop_counts(loops)}")
        check = results.get("loop_check")
        if check:
            lines.append(f"looping on {len(check['prompts'])} more everyday prompts: {loop_counts(check['loops'])}")
        adapter = str(self.adapter_dir)
        merged = str(self.results_file.parent / "merged")
        lines += [
            ("\n" if prompts else "") + f"adapter: {adapter}; results: {self.results_file}",
            f"next: peft-lisa eval --adapter {shlex.quote(adapter)}",
            f"      peft-lisa merge --adapter {shlex.quote(adapter)} --output {shlex.quote(merged)}",
        ]
        return "\n".join(lines)

    def check(self) -> None:
        """Raise :class:`~.checks.JobFailedError` if the trained perplexity was measured and is not finite."""
        measured = self.metrics.get("perplexity")
        if measured and not math.isfinite(measured["ppl"]):
            raise JobFailedError("the trained perplexity is not finite")


def _check(job: TrainJob) -> Optional[dict[str, Any]]:
    """Everything about ``job`` that can be refused before loading anything; the perplexity settings (or None)."""
    check_model_name(job.model)
    check_data_source(job.data)
    if job.packing not in ("auto", "yes", "no"):
        raise JobInputError(f"--packing {job.packing}: expected auto, yes or no")
    check_layer_choice(job.share_layers, job.share_fraction, job.max_chain)
    if job.resume and (job.share_fraction is not None or job.analysis or job.max_chain is not None):
        raise JobInputError(
            "--resume takes the shared layers from the checkpoint: drop --share-fraction/--analysis/--max-chain"
        )
    if job.eval_calibrated and not job.calibrate:
        raise JobInputError("--eval-calibrated needs calibration: drop --no-calibrate")
    if job.calibration_data and not job.calibrate:
        raise JobInputError("--calibration-data needs calibration: drop --no-calibrate")
    if job.calibration_data and job.resume:
        raise JobInputError("--resume continues from the checkpoint's adapter, uncalibrated: drop --calibration-data")
    check_calibration_data(job.calibration_data, job.calibration_sequences)
    if job.calibration_sequences < 1 or job.calibration_steps < 0 or job.calibration_lr <= 0:
        raise JobInputError("--calibration-sequences must be >= 1, --calibration-steps >= 0, --calibration-lr > 0")
    if job.lm_weight == 0 and not (job.output_kl_weight or job.attn_kl_weight):
        raise JobInputError("--lm-weight 0 needs --output-kl-weight or --attn-kl-weight > 0 (something to train on)")
    if job.self_generated:
        check_self_generated(job)
    if job.attn_kl_warmup_steps and not job.attn_kl_weight:
        raise JobInputError("--attn-kl-warmup-steps needs --attn-kl-weight > 0")
    return job.perplexity_settings() if job.evaluate else None


def _license_text() -> Optional[tuple[str, str]]:
    try:
        return license_text()
    except FileNotFoundError as error:
        logger.warning(f"--eval-license: skipped ({error})")
        return None


def _mix_self_generated(job: TrainJob, model: Any, tokenizer: Any, dataset: Any) -> tuple[Any, dict[str, Any]]:
    """The training dataset with the base model's own answers mixed in (``job.self_generated``), and what was mixed."""
    started = time.monotonic()
    prompts = GENERIC_PROMPTS[: job.self_generated_prompts]
    logger.info(f"sampling the base model's answers to {len(prompts)} everyday prompts ({job.self_generated} tokens)")
    pairs = sample_answers(model, tokenizer, job.self_generated, prompts, progress=job.progress)
    mixed = mixed_dataset(dataset, tokenizer, pairs, job.self_generated_share)
    info = {
        "min_tokens": job.self_generated,
        "answers": len(pairs),
        "prompts": len(prompts),
        "share": job.self_generated_share,
        "looping_answers": sum(1 for _, answer in pairs if repeated_ngram(answer)),
        "minutes": round((time.monotonic() - started) / 60, 2),
    }
    logger.info(
        f"mixed {len(pairs)} self-generated answers into the training data ({job.self_generated_share:.0%} of its "
        f"tokens) in {info['minutes']:.1f} min"
    )
    return mixed, info


def train(job: TrainJob) -> TrainResult:
    """Train a LiSA adapter as ``job`` says (see :class:`TrainJob`) and save it to ``job.output_dir/adapter``.

    In order: check the inputs (before loading anything), load the model and the training data, choose the shared
    layers (or take them from the checkpoint to resume), measure the base model / untrained adapter if asked, train
    with :class:`peft_lisa.training.LiSATrainer` (checkpoints every ``save_steps``), measure the trained adapter on
    the held-out text, save the adapter atomically with its model card, tokenizer, ``lisa_metrics.json`` and
    ``lisa_distillation.json``, and write ``results.json``. Returns the results; :meth:`TrainResult.check` refuses a
    non-finite perplexity. Needs the ``train`` extras (TRL, datasets).
    """
    settings = _check(job)
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        raise JobInputError(
            "peft-lisa train does not run under FSDP yet (its evaluation and saving read the whole model on one "
            "process): launch it with DDP, or train with LiSATrainer under FSDP2 and save with trainer.save_model "
            "(README, 'Scaling out')"
        )
    device = resolve_device(job.device)
    out = Path(job.output_dir)
    checkpoint = find_checkpoint(job.resume, out) if job.resume else None
    prompts = load_prompts(job.prompts) if job.max_new_tokens else []
    if job.loop_check and not job.max_new_tokens:
        raise JobInputError("--loop-check needs generations: set --max-new-tokens > 0")
    check_prompts = loop_check_prompts(job.loop_check) if job.max_new_tokens else []
    loop_check: dict[str, list[str]] = {}
    analysis = load_analysis_file(job.analysis) if job.analysis else None
    resume_config = None
    if checkpoint is not None:
        resume_config = config_from_checkpoint(
            checkpoint, share_layers=job.share_layers, rank=job.rank, align_hidden=job.align_hidden
        )

    from ..training import LiSACalibrationConfig, LiSADistillationConfig, LiSATrainer, lisa_sft_config

    schedule = "linear_decay" if job.attn_kl_warmup_steps else "constant"
    distill = LiSADistillationConfig(
        attn_kl_schedule=schedule, **{name: getattr(job, name) for name in DISTILLATION_OPTIONS}
    )
    calibrate = job.calibrate and checkpoint is None  # a resumed run continues from the checkpoint's adapter
    calibration = LiSACalibrationConfig(
        num_sequences=job.calibration_sequences,
        adam_steps=job.calibration_steps,
        lr=job.calibration_lr,
        copy_blocks=job.calibration_copy_blocks,
        seed=job.seed,
    )
    started = time.monotonic()
    torch.manual_seed(job.seed)
    model, tokenizer = load_training_model(job.model, device, job.load_in_4bit)
    dataset = load_sft_dataset(job.data, job.split, job.text_field, job.held_out_fraction)
    # Read (and checked) before the long steps; with a tensor LiSATrainer calibrates on these blocks as they are.
    calibration_blocks = None
    if calibrate:
        seq_len = calibration_seq_len(calibration, job.seq_len)
        calibration_blocks = calibration_data_blocks(
            job, job.calibration_data, tokenizer, calibration.num_sequences, seq_len
        )
    chat = is_conversational_dataset(dataset)
    packing = {"auto": not chat, "yes": True, "no": False}[job.packing]
    logger.info(f"data: {job.data} ({'chat' if chat else 'plain text'}), {len(dataset)} training documents")
    if job.split != "train" and settings is not None:
        logger.warning(f"warning: with --split {job.split} the held-out perplexity text is part of the training data")

    if resume_config is not None:
        config = resume_config
        layer_choice: dict[str, Any] = {"method": "from checkpoint", "checkpoint": str(checkpoint)}
    else:
        layer_options = {name: getattr(job, name) for name in LAYER_OPTIONS}
        texts = evaluation_texts(dataset, tokenizer)
        config, layer_choice = choose_lisa_config(
            model, tokenizer, texts, analysis=analysis, analysis_file=job.analysis, output_dir=out, **layer_options
        )
    logger.info(f"shared layers ({layer_choice['method']}): {config.share_layers}, rank {config.rank}")

    held_out: list[str] = []
    metrics: dict[str, Any] = {}
    generations: dict[str, list[str]] = {}
    if settings is not None:
        held_out = load_evaluation_texts(job.data, "test", job.text_field, job.held_out_fraction, tokenizer)
        metrics = {"data": job.data, "split": "test"}
        if job.load_in_4bit:
            metrics["base_quantization"] = "4-bit NF4"
    license = _license_text() if settings is not None and job.eval_license else None
    if license is not None:
        metrics[LICENSE_KEY] = {"text": license[0]}

    def measure(key: str, model_: Any) -> None:
        if settings is not None:
            label = PERPLEXITY_LABELS[key]
            metrics[key] = measure_perplexity(
                model_, tokenizer, held_out, settings, progress=job.progress, label=label
            )
            if license is not None:
                metrics[LICENSE_KEY][key] = measure_perplexity(
                    model_, tokenizer, [license[1]], settings, progress=job.progress, label=f"{label} (license text)"
                )

    def generate(key: str, model_: Any) -> None:
        if not prompts and not check_prompts:
            return
        # One batch for the shown and the loop-check prompts: a batch costs its number of decode steps.
        texts = sample_generations(
            model_, tokenizer, [*prompts, *check_prompts], job.max_new_tokens, GENERATION_LABELS[key]
        )
        if prompts:
            generations[key] = texts[: len(prompts)]
        if check_prompts:
            loop_check[key] = texts[len(prompts) :]

    if job.eval_base:
        measure("base_perplexity", model)
        generate("base", model)

    train_dataset, self_generated = dataset, None
    if job.self_generated:
        train_dataset, self_generated = _mix_self_generated(job, model, tokenizer, dataset)

    sft_options = {name: getattr(job, name) for name in SFT_OPTIONS}
    sft_config = lisa_sft_config(
        out,
        packing=packing,
        save_strategy="steps",
        disable_tqdm=not job.progress,
        use_cpu=device.type == "cpu",
        **sft_options,
    )
    # Calibration reads the --calibration-data blocks, or else the data alone (self-generated text mixed in was
    # measured worse there; None: the training dataset itself).
    calibration_texts = calibration_blocks
    if calibration_texts is None and self_generated:
        calibration_texts = evaluation_texts(dataset, tokenizer)
    trainer = LiSATrainer(
        model,
        sft_config,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        calibration_texts=calibration_texts,
        peft_config=config,
        distillation=distill,
        calibrate=calibrate,
        calibration=calibration,
    )
    peft_model = trainer.model
    base_name = portable_base_name(job.model)
    if base_name is not None:
        peft_model.peft_config[peft_model.active_adapter].base_model_name_or_path = base_name
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    if job.eval_untrained:
        measure("untrained_perplexity", peft_model)
    calibration_minutes = 0.0
    if calibrate:
        calibration_started = time.monotonic()
        trainer.calibrate_adapter()  # LiSATrainer.train would do it; here first, to measure the calibrated adapter
        calibration_minutes = (time.monotonic() - calibration_started) / 60
        if job.eval_calibrated:
            measure("calibrated_perplexity", peft_model)
            generate("calibrated_lisa", peft_model)
    logger.info(
        f"training {job.max_steps} steps x {job.batch_size} x {job.seq_len} tokens, lr {job.learning_rate}; trainable "
        f"parameters {trainable:,} of {total:,} ({100 * trainable / total:.2f}%); checkpoints every "
        f"{job.save_steps} steps in {out}" + (f"; resuming from {checkpoint}" if checkpoint else "")
    )
    train_started = time.monotonic()
    train_output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    train_minutes = (time.monotonic() - train_started) / 60
    tokens_seen = int(getattr(trainer, "_total_train_tokens", 0) or 0)
    tokens_seen = tokens_seen or trainer.state.global_step * job.batch_size * job.seq_len
    logger.info(f"trained to step {trainer.state.global_step} in {train_minutes:.1f} min")
    if not trainer.accelerator.is_main_process:
        # Under accelerate launch (DDP) every process holds the same trained adapter: the main process measures and
        # saves it; the others stop here (saving from every rank would race on one directory).
        end_process_group()
        return TrainResult({"rank": trainer.accelerator.process_index}, out / "adapter", out / TRAIN_RESULTS_FILE)

    measure("perplexity", peft_model)
    generate("trained_lisa", peft_model)

    report = qk_compression_report(peft_model)
    align_hidden = config.resolved_align_hidden(peft_model.get_base_model().config.num_attention_heads)
    adapter_dir = out / "adapter"
    with atomic_directory(adapter_dir) as scratch:
        save_adapter(peft_model, scratch, metrics=card_metrics(config.rank, align_hidden, metrics))
        tokenizer.save_pretrained(scratch)
        (scratch / ADAPTER_METRICS_FILE).write_text(to_json(metrics), encoding="utf-8")
        (scratch / "lisa_distillation.json").write_text(to_json(distill.to_dict()), encoding="utf-8")

    results: dict[str, Any] = {
        "command": job.command,
        "model": model_label(job.model),
        "load_in_4bit": job.load_in_4bit,
        "torch_threads": torch.get_num_threads(),
        "data": job.data,
        "data_format": "chat" if chat else "text",
        "packing": packing,
        "share_layers": list(config.share_layers),
        "layer_choice": layer_choice,
        "rank": config.rank,
        "align_hidden": align_hidden,
        "distillation": distill.to_dict(),
        "self_generated": self_generated,
        "calibration_config": calibration.to_dict() if calibrate else None,
        "calibration_data": (job.calibration_data or [job.data]) if calibrate else None,
        "calibration": trainer.calibration_report.to_dict() if trainer.calibration_report else None,
        "calibration_minutes": round(calibration_minutes, 2),
        "training": {
            "max_steps": job.max_steps,
            "global_step": trainer.state.global_step,
            "resumed_from": str(checkpoint) if checkpoint else None,
            "documents": len(train_dataset),  # before packing; with self-generated answers mixed in
            "batch_size": job.batch_size,
            "seq_len": job.seq_len,
            "learning_rate": job.learning_rate,
            "tokens_seen": tokens_seen,
            "train_loss": train_output.training_loss,
            "wall_minutes": round(train_minutes, 2),
            "trainable_parameters": trainable,
            "log_history": trainer.state.log_history,
        },
        "metrics": metrics,
        "eval": None if settings is None else {**settings, "held_out_documents": len(held_out)},
        "qk_compression": {"ratio": report.ratio, "qk_params_original": report.qk_params_original},
        "adapter_dir": str(adapter_dir),
        "total_minutes": round((time.monotonic() - started) / 60, 2),
    }
    if prompts:
        loops = {key: [repeated_ngram(text) for text in texts] for key, texts in generations.items()}
        results["generations"] = {"prompts": prompts, **generations, "loops": loops}
    if check_prompts:
        loops = {key: [repeated_ngram(text) for text in texts] for key, texts in loop_check.items()}
        results["loop_check"] = {"prompts": check_prompts, **loop_check, "loops": loops}
    write_text_atomic(out / TRAIN_RESULTS_FILE, to_json(results))
    end_process_group()  # under accelerate launch (a no-op otherwise)
    return TrainResult(results, adapter_dir, out / TRAIN_RESULTS_FILE)
