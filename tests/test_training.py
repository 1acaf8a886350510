"""Training LiSA adapters through TRL's SFTTrainer (plain text with packing, chat data, 4-bit base), the optional
distillation losses of ``peft_lisa.training``, the datasets of ``peft_lisa.data``, and examples/train_lisa.py (the
main job, a thin wrapper of ``peft-lisa train``). Tiny random models and a tiny word-level tokenizer: no downloads."""

from __future__ import annotations

import json
import random

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, TrainerCallback

from peft_lisa import LiSAConfig
from peft_lisa.calibration_step import LiSACalibrationConfig, dataset_texts
from peft_lisa.data import chat_dataset, evaluation_texts, load_evaluation_texts, load_sft_dataset, text_dataset
from peft_lisa.training import (
    AttentionDistiller,
    LiSADistillationConfig,
    LiSATrainer,
    adapter_parameters,
    attention_kl,
    lisa_sft_config,
    lm_and_output_kl,
    output_kl,
)
from peft_lisa.tuner.layer_choice import choose_layers

from .conftest import random_ids, randomize_adapter, tiny_model

WORDS = [f"w{i}" for i in range(100)]
CHAT_TEMPLATE = (
    "{% for m in messages %}<s> {{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<s> assistant : {% endif %}"
)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``w0 .. w99`` (ids < 128, the tiny models' vocabulary) with a chat template.

    Special ids match ``tests.conftest.tiny_config``: pad 0, eos 1, bos 2.
    """
    vocab = {"<pad>": 0, "</s>": 1, "<s>": 2, "<unk>": 3, "user": 4, "assistant": 5, "system": 6, ":": 7}
    vocab.update({word: len(vocab) + i for i, word in enumerate(WORDS)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", bos_token="<s>", unk_token="<unk>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def random_texts(count: int = 40, seed: int = 0, words: int = 20) -> list[str]:
    """Documents of 20-80 words drawn from a small vocabulary (learnable: the LM loss can fall)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS[:words]) for _ in range(rng.randint(20, 80))) for _ in range(count)]


def random_conversations(count: int = 16, seed: int = 0) -> list[list[dict[str, str]]]:
    rng = random.Random(seed)
    return [
        [
            {"role": "user", "content": " ".join(rng.choice(WORDS[:20]) for _ in range(rng.randint(3, 10)))},
            {"role": "assistant", "content": " ".join(rng.choice(WORDS[20:40]) for _ in range(rng.randint(3, 12)))},
        ]
        for _ in range(count)
    ]


def lisa_config(**kwargs) -> LiSAConfig:
    return LiSAConfig(share_layers=[2, 3], rank=4, task_type="CAUSAL_LM", **kwargs)


def sft_args(tmp_path, **overrides):
    settings = dict(max_steps=3, seq_len=32, batch_size=2, learning_rate=1e-2, logging_steps=1, warmup_steps=0)
    settings.update(overrides)
    return lisa_sft_config(tmp_path / "out", **settings)


def base_snapshot(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def check_only_adapter_changed(peft_model, before: dict[str, torch.Tensor], initial: dict[str, torch.Tensor]) -> None:
    """``before``: the base model's parameters before get_peft_model; ``initial``: the adapter's before training."""
    changed_adapter = 0
    for name, param in peft_model.named_parameters():
        if "lisa_" in name:
            assert param.requires_grad, name
            changed_adapter += int(not torch.equal(param.detach(), initial[name]))
            continue
        assert not param.requires_grad, name
        base_name = name.replace("base_model.model.", "", 1).replace(".base_layer", "")
        assert torch.equal(param.detach(), before[base_name]), f"base weight {name} changed"
    assert changed_adapter > 0, "no adapter weight changed"


def train_and_check(trainer, before: dict[str, torch.Tensor]) -> None:
    initial = adapter_parameters(trainer.model)
    trainer.train()
    assert trainer.state.global_step == trainer.args.max_steps
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    check_only_adapter_changed(trainer.model, before, initial)


# --------------------------------------------------------------------------------------------------------------
# SFTTrainer with a LiSAConfig
# --------------------------------------------------------------------------------------------------------------


def test_plain_sft_trainer_with_lisa_config_plain_text_packing(tmp_path):
    """trl.SFTTrainer itself (no subclass) wraps the model with get_peft_model(LiSAConfig), packs plain text and
    trains only the adapter; gradient checkpointing on (non-reentrant, set by lisa_sft_config)."""
    from trl import SFTTrainer

    model = tiny_model()
    before = base_snapshot(model)
    args = sft_args(tmp_path, gradient_checkpointing=True)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=text_dataset(random_texts()),
        processing_class=tiny_tokenizer(),
        peft_config=lisa_config(),
    )
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape == (2, 32)  # wrapped packing: full blocks, no padding
    assert bool(batch["attention_mask"].all())
    train_and_check(trainer, before)


def test_lisa_trainer_chat_data(tmp_path):
    model = tiny_model()
    before = base_snapshot(model)
    trainer = LiSATrainer(
        model=model,
        args=sft_args(tmp_path, packing=False),
        train_dataset=chat_dataset(random_conversations()),
        processing_class=tiny_tokenizer(),
        peft_config=lisa_config(),
    )
    batch = next(iter(trainer.get_train_dataloader()))
    assert (batch["input_ids"] == 4).any()  # the chat template's "user" token: the conversation was rendered
    train_and_check(trainer, before)


def test_lisa_trainer_refuses_reentrant_checkpointing(tmp_path):
    args = sft_args(tmp_path, gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(ValueError, match="use_reentrant"):
        LiSATrainer(
            model=tiny_model(),
            args=args,
            train_dataset=text_dataset(random_texts()),
            processing_class=tiny_tokenizer(),
            peft_config=lisa_config(),
        )


def test_lisa_trainer_4bit_nf4_base_on_cpu(tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_model(intermediate_size=128).save_pretrained(tmp_path / "tiny")  # whole 64-blocks, see tiny_checkpoint
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny", quantization_config=quantization)
    assert model.is_loaded_in_4bit
    assert type(model.model.layers[2].self_attn.q_proj).__name__ == "Linear4bit"
    packed_before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = LiSATrainer(
        model=model,
        args=sft_args(tmp_path),
        train_dataset=text_dataset(random_texts()),
        processing_class=tiny_tokenizer(),
        peft_config=lisa_config(),
        distillation=LiSADistillationConfig(attn_kl_weight=0.1),  # teacher Q/K are 4-bit layers
    )
    # SFTTrainer casts trainable parameters of a quantized model to bf16; LiSATrainer keeps the adapter in fp32.
    assert {p.dtype for n, p in trainer.model.named_parameters() if "lisa_" in n} == {torch.float32}
    initial = adapter_parameters(trainer.model)
    trainer.train()
    final = adapter_parameters(trainer.model)
    assert any(not torch.equal(initial[name], final[name]) for name in initial)
    for name, param in trainer.model.named_parameters():
        if "lisa_" not in name:
            base_name = name.replace("base_model.model.", "", 1).replace(".base_layer", "")
            assert torch.equal(param.detach(), packed_before[base_name]), name
    assert any("attn_kl" in entry for entry in trainer.state.log_history)
    report = trainer.calibration_report  # calibration (the default first step) runs on the 4-bit base too
    assert report is not None and [row.layer for row in report.layers] == [2, 3]


# --------------------------------------------------------------------------------------------------------------
# Calibration before training
# --------------------------------------------------------------------------------------------------------------


class AdapterAtTrainBegin(TrainerCallback):
    """Records the adapter's parameters when the training loop starts (after any calibration)."""

    def __init__(self) -> None:
        self.params: dict[str, torch.Tensor] = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.params = adapter_parameters(model)


def calibration_trainer(tmp_path, data=None, **kwargs):
    return LiSATrainer(
        model=tiny_model(),
        args=sft_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2),
        train_dataset=data if data is not None else text_dataset(random_texts()),
        processing_class=tiny_tokenizer(),
        peft_config=lisa_config(),
        calibration=LiSACalibrationConfig(num_sequences=4, adam_steps=10),
        **kwargs,
    )


@pytest.mark.parametrize("chat", [False, True])
def test_lisa_trainer_calibrates_before_the_first_step(tmp_path, chat):
    data = chat_dataset(random_conversations()) if chat else None
    trainer = calibration_trainer(tmp_path, data)
    at_begin = AdapterAtTrainBegin()
    trainer.add_callback(at_begin)
    initial = adapter_parameters(trainer.model)
    trainer.train()
    report = trainer.calibration_report
    assert report is not None and [row.layer for row in report.layers] == [2, 3]
    assert report.seq_len == 32 and report.num_sequences == 4  # the training's max_length, the configured budget
    assert report.mean_kl_after < report.mean_kl_before
    assert any(not torch.equal(at_begin.params[name], initial[name]) for name in initial)  # calibrated before step 1
    assert trainer.calibrate_adapter() is report  # once only


def test_no_calibrate_and_resume_do_not_calibrate(tmp_path):
    trainer = calibration_trainer(tmp_path, calibrate=False)
    at_begin = AdapterAtTrainBegin()
    trainer.add_callback(at_begin)
    initial = adapter_parameters(trainer.model)
    trainer.train()
    assert trainer.calibration_report is None
    assert all(torch.equal(at_begin.params[name], initial[name]) for name in initial)
    resumed = calibration_trainer(tmp_path)
    resumed.args.max_steps = 3
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    assert resumed.calibration_report is None and resumed.state.global_step == 3


def test_calibration_needs_texts(tmp_path):
    trainer = calibration_trainer(tmp_path, calibration_texts=["w1 w2"])  # shorter than one sequence: skipped
    assert trainer.calibrate_adapter() is None
    with pytest.raises(ValueError, match="calibration_texts"):
        dataset_texts(text_dataset(random_texts()).rename_column("text", "body"))
    with pytest.raises(ValueError, match="num_sequences"):
        LiSACalibrationConfig(num_sequences=0)


# --------------------------------------------------------------------------------------------------------------
# Distillation
# --------------------------------------------------------------------------------------------------------------


def test_attention_kl_properties():
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(2, 4, 6, 6, generator=generator)
    teacher = torch.randn(2, 4, 6, 6, generator=generator)
    assert attention_kl(student, teacher, None).item() > 0
    assert attention_kl(teacher, teacher, None).item() == pytest.approx(0.0, abs=1e-6)
    # Entries above the diagonal (future keys) are masked: changing them changes nothing.
    future = torch.triu(torch.ones(6, 6, dtype=torch.bool), diagonal=1)
    assert attention_kl(student.masked_fill(future, 50.0), teacher, None).item() == pytest.approx(
        attention_kl(student, teacher, None).item(), rel=1e-6
    )
    # Padding query rows (query_mask False) do not count; a fully masked row is skipped, not NaN.
    query_mask = torch.ones(2, 6, dtype=torch.bool)
    query_mask[1, :3] = False
    bool_mask = ~future[None, None].expand(2, 1, 6, 6).clone()
    bool_mask[1, :, :3, :] = False
    value = attention_kl(student, teacher, bool_mask, query_mask)
    assert torch.isfinite(value) and value.item() > 0
    # A query_mask drops rows that do see keys: the mean runs over the kept rows only (by hand).
    causal = ~future[None, None]
    p = torch.softmax(teacher.masked_fill(~causal, float("-inf")), -1)
    log_q = torch.log_softmax(student.masked_fill(~causal, float("-inf")), -1)
    row_kl = (p * (p.clamp(min=1e-30).log() - log_q)).masked_fill(~causal, 0.0).sum(-1)  # B x H x T_q
    kept = query_mask[:, None, :].expand_as(row_kl)
    by_hand = row_kl[kept].mean().item()
    assert attention_kl(student, teacher, None, query_mask).item() == pytest.approx(by_hand, rel=1e-5)
    assert abs(by_hand - row_kl.mean().item()) > 1e-3  # the dropped rows matter


def test_attention_distillation_decreases_kl_when_optimised_alone():
    torch.manual_seed(0)
    peft_model = get_peft_model(tiny_model(), lisa_config()).train()
    distiller = AttentionDistiller(peft_model)
    ids = random_ids(2, 16)
    params = [p for n, p in peft_model.named_parameters() if "lisa_" in n]
    optimizer = torch.optim.Adam(params, lr=3e-2)
    values = []
    for _ in range(12):
        with distiller.collect():
            peft_model(input_ids=ids)
        assert sorted(distiller.calls) == [2, 3]
        loss = distiller.loss()
        assert loss.item() >= 0
        values.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert values[-1] < 0.7 * values[0], values
    # Outside collect() the observer records nothing (generation, evaluation).
    with distiller.collect():
        pass
    peft_model(input_ids=ids)
    assert distiller.calls == {}
    distiller.remove()
    assert not peft_model.base_model.logits_carrier.observers


def test_layer_reduction_mean_and_sum():
    peft_model = get_peft_model(tiny_model(), lisa_config())
    means, sums = AttentionDistiller(peft_model, "mean"), AttentionDistiller(peft_model, "sum")
    with means.collect(), sums.collect():
        peft_model(input_ids=random_ids(2, 10))
    per_layer = torch.stack(list(means.layer_losses().values()))
    assert means.loss().item() == pytest.approx(per_layer.mean().item())
    assert sums.loss().item() == pytest.approx(per_layer.sum().item())


def test_output_kl_properties():
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 11, generator=generator), torch.randn(5, 11, generator=generator)
    assert output_kl(a, a).item() == pytest.approx(0.0, abs=1e-6)
    assert output_kl(a, b).item() > 0
    manual = (torch.softmax(b / 2, -1) * (torch.log_softmax(b / 2, -1) - torch.log_softmax(a / 2, -1))).sum(-1)
    assert output_kl(a, b, temperature=2.0).item() == pytest.approx(4 * manual.mean().item(), rel=1e-5)


def test_distillation_config_schedule_and_validation():
    config = LiSADistillationConfig(attn_kl_weight=0.4, attn_kl_schedule="linear_decay", attn_kl_warmup_steps=10)
    assert [config.attn_kl_weight_at(s) for s in (0, 5, 10, 20)] == pytest.approx([0.4, 0.2, 0.0, 0.0])
    assert LiSADistillationConfig(attn_kl_weight=0.3).attn_kl_weight_at(1000) == 0.3
    assert not LiSADistillationConfig().enabled
    with pytest.raises(ValueError, match="warmup"):
        LiSADistillationConfig(attn_kl_weight=1.0, attn_kl_schedule="linear_decay")
    with pytest.raises(ValueError, match="schedule"):
        LiSADistillationConfig(attn_kl_schedule="cosine")
    with pytest.raises(ValueError, match="temperature"):
        LiSADistillationConfig(temperature=0.0)


def make_trainer(tmp_path, distillation=None, **args):
    return LiSATrainer(
        model=tiny_model(),
        args=sft_args(tmp_path, **args),
        train_dataset=text_dataset(random_texts()),
        processing_class=tiny_tokenizer(),
        peft_config=lisa_config(),
        distillation=distillation,
    )


def make_sft_trainer(tmp_path):
    """TRL's own SFTTrainer on the same model, data and adapter as make_trainer: the reference for LiSATrainer."""
    from trl import SFTTrainer

    return SFTTrainer(
        model=tiny_model(),
        args=sft_args(tmp_path),
        train_dataset=text_dataset(random_texts()),
        processing_class=tiny_tokenizer(),
        peft_config=lisa_config(),
    )


def first_batch(trainer):
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


def test_zero_weights_give_exactly_the_sft_trainer_loss(tmp_path):
    sft = make_sft_trainer(tmp_path)
    lisa = make_trainer(tmp_path, LiSADistillationConfig(attn_kl_weight=0.0, output_kl_weight=0.0))
    for trainer in (sft, lisa):
        randomize_adapter(trainer.model, seed=3)
        trainer.model.train()
    batch = first_batch(sft)
    assert torch.equal(batch["input_ids"], first_batch(lisa)["input_ids"])
    expected = sft.compute_loss(sft.model, dict(batch))
    assert torch.equal(lisa.compute_loss(lisa.model, dict(batch)), expected)
    assert "attn_kl" not in lisa._metrics["train"] and "output_kl" not in lisa._metrics["train"]

    # Non-zero weights add exactly weight * term to that loss, and log the terms.
    weighted = make_trainer(tmp_path, LiSADistillationConfig(attn_kl_weight=0.5, output_kl_weight=0.25))
    randomize_adapter(weighted.model, seed=3)
    weighted.model.train()
    loss = weighted.compute_loss(weighted.model, dict(batch))
    metrics = weighted._metrics["train"]
    assert metrics["lm_loss"][-1] == pytest.approx(expected.item(), rel=1e-6)
    assert metrics["attn_kl"][-1] > 0 and metrics["output_kl"][-1] > 0
    total = expected.item() + 0.5 * metrics["attn_kl"][-1] + 0.25 * metrics["output_kl"][-1]
    assert loss.item() == pytest.approx(total, rel=1e-5)


def test_output_kl_is_zero_when_the_student_is_the_teacher(tmp_path):
    trainer = make_trainer(tmp_path, LiSADistillationConfig(output_kl_weight=1.0))
    randomize_adapter(trainer.model, seed=1)
    batch = first_batch(trainer)
    trainer.compute_loss(trainer.model, dict(batch))
    assert trainer._metrics["train"]["output_kl"][-1] > 1e-4  # a random adapter differs from the base
    with trainer.model.disable_adapter():
        trainer.compute_loss(trainer.model, dict(batch))
    assert trainer._metrics["train"]["output_kl"][-1] == pytest.approx(0.0, abs=1e-6)


def test_output_kl_loss_equals_sft_trainer_loss_plus_a_hand_computed_kl(tmp_path):
    """With the output KL on, LiSATrainer computes the LM loss itself, from the logits it shares with the KL: loss,
    gradients and SFTTrainer's metrics must equal SFTTrainer's own loss plus the KL computed by hand."""
    sft = make_sft_trainer(tmp_path)
    lisa = make_trainer(tmp_path, LiSADistillationConfig(output_kl_weight=0.5))
    for trainer in (sft, lisa):
        randomize_adapter(trainer.model, seed=4)
        trainer.model.train()
    batch = first_batch(sft)
    batch["labels"][0, :5] = -100  # positions that are not scored (a prompt, padding)

    loss = lisa.compute_loss(lisa.model, dict(batch))
    loss.backward()
    expected_lm = sft.compute_loss(sft.model, dict(batch))
    student = sft.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    with torch.no_grad(), sft.model.disable_adapter():
        teacher = sft.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    scored = batch["labels"][:, 1:] != -100
    expected_kl = output_kl(student[:, :-1][scored], teacher[:, :-1][scored])
    (expected_lm + 0.5 * expected_kl).backward()

    assert loss.item() == pytest.approx((expected_lm + 0.5 * expected_kl).item(), rel=1e-5)
    assert lisa._metrics["train"]["output_kl"][-1] == pytest.approx(expected_kl.item(), rel=1e-5)
    for name in ("entropy", "mean_token_accuracy", "num_tokens"):
        assert lisa._metrics["train"][name][-1] == pytest.approx(sft._metrics["train"][name][-1], rel=1e-5), name
    grads = {name: p.grad for name, p in lisa.model.named_parameters() if p.requires_grad}
    reference = {name: p.grad for name, p in sft.model.named_parameters() if p.requires_grad}
    assert grads.keys() == reference.keys() and len(grads) > 0
    for name, grad in grads.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(grad, reference[name], rtol=1e-4, atol=1e-6, msg=name)


def test_lm_and_output_kl_by_hand():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 7, 11), torch.randn(2, 7, 11)
    labels = torch.randint(0, 11, (2, 7))
    labels[1, :3] = -100
    rows, targets = student[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1)
    nll = F.cross_entropy(rows, targets, ignore_index=-100, reduction="none")
    scored = targets != -100
    terms = lm_and_output_kl(student, teacher, labels)
    assert terms.lm_loss.item() == pytest.approx(nll[scored].mean().item(), rel=1e-6)
    assert terms.num_scored.item() == scored.sum().item() == 10
    assert terms.output_kl.item() == pytest.approx(
        output_kl(rows[scored], teacher[:, :-1].reshape(-1, 11)[scored]).item(), rel=1e-6
    )
    dft = lm_and_output_kl(student, teacher, labels, loss_type="dft", num_items_in_batch=torch.tensor(20))
    assert dft.lm_loss.item() == pytest.approx((nll[scored] * (-nll[scored]).exp()).sum().item() / 20, rel=1e-6)
    with pytest.raises(ValueError, match="loss_type"):
        lm_and_output_kl(student, teacher, labels, loss_type="chunked")


def test_output_kl_refuses_label_smoothing(tmp_path):
    with pytest.raises(ValueError, match="label_smoothing_factor"):
        make_trainer(tmp_path, LiSADistillationConfig(output_kl_weight=1.0), label_smoothing_factor=0.1)


def test_lm_weight_scales_the_lm_loss(tmp_path):
    """lm_weight=0 with the output KL: the loss is the output KL alone (training towards the base model's outputs)."""
    trainer = make_trainer(tmp_path, LiSADistillationConfig(output_kl_weight=1.0, lm_weight=0.0))
    randomize_adapter(trainer.model, seed=1)
    batch = first_batch(trainer)
    loss = trainer.compute_loss(trainer.model, dict(batch))
    metrics = trainer._metrics["train"]
    assert loss.item() == pytest.approx(metrics["output_kl"][-1], rel=1e-5) and metrics["lm_loss"][-1] > 1.0
    half = make_trainer(tmp_path, LiSADistillationConfig(lm_weight=0.5))
    randomize_adapter(half.model, seed=1)
    assert half.compute_loss(half.model, dict(batch)).item() == pytest.approx(0.5 * metrics["lm_loss"][-1], rel=1e-5)
    with pytest.raises(ValueError, match="lm_weight=0"):
        LiSADistillationConfig(lm_weight=0.0)


def test_attention_kl_training_with_checkpointing_and_schedule(tmp_path):
    """Recomputation by (non-reentrant) gradient checkpointing does not record extra layers; the schedule logs."""
    distillation = LiSADistillationConfig(attn_kl_weight=1.0, attn_kl_schedule="linear_decay", attn_kl_warmup_steps=2)
    trainer = make_trainer(tmp_path, distillation, gradient_checkpointing=True)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry.get("attn_kl_weight") for entry in logged] == [1.0, 0.5, None]
    assert all(entry["attn_kl"] >= 0 for entry in logged[:2])
    assert sorted(trainer.attention_distiller.last_layer_kls) == [2, 3]


# --------------------------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------------------------


def test_dataset_helpers(tmp_path):
    text_file = tmp_path / "docs.txt"
    text_file.write_text("\n\n".join(random_texts(20)))
    train, test = load_sft_dataset(text_file, "train"), load_sft_dataset(text_file, "test")
    assert train.column_names == ["text"] and len(train) + len(test) == 20
    assert not set(train["text"]) & set(test["text"])

    chat_file = tmp_path / "chat.jsonl"
    conversations = random_conversations(20)
    chat_file.write_text("\n".join(json.dumps({"messages": messages}) for messages in conversations))
    chat_train, chat_test = load_sft_dataset(chat_file, "train"), load_sft_dataset(chat_file, "test")
    assert chat_train.column_names == ["messages"] and len(chat_train) + len(chat_test) == 20
    rendered = evaluation_texts(chat_test, tiny_tokenizer())
    assert rendered[0].startswith("<s> user :")
    assert evaluation_texts(test) == test["text"]
    # The evaluation texts without a datasets.Dataset are the same texts.
    assert load_evaluation_texts(chat_file, "test", tokenizer=tiny_tokenizer()) == rendered
    assert load_evaluation_texts(chat_file, "test") == evaluation_texts(chat_test)
    assert load_evaluation_texts(text_file, "train") == train["text"]
    (tmp_path / "blank.txt").write_text("\n\n  \n")
    with pytest.raises(ValueError, match="no non-empty text"):
        load_evaluation_texts(tmp_path / "blank.txt", "all")

    with pytest.raises(ValueError, match="role"):
        chat_dataset([[{"content": "w1"}]])
    with pytest.raises(ValueError, match="no non-empty"):
        text_dataset(["", "  "])


# --------------------------------------------------------------------------------------------------------------
# examples/train_lisa.py
# --------------------------------------------------------------------------------------------------------------


def load_script():
    import importlib.util

    from .conftest import REPO_ROOT

    spec = importlib.util.spec_from_file_location("train_lisa_script", REPO_ROOT / "examples" / "train_lisa.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def tiny_checkpoint(tmp_path):
    directory = tmp_path / "tiny"
    # in_features multiple of 64: bitsandbytes' CPU inference kernel (avx512-bf16 CPUs, eval mode) needs whole blocks.
    tiny_model(intermediate_size=128).save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory


SCRIPT_FAST = ["--max-steps", "2", "--seq-len", "32", "--batch-size", "2", "--logging-steps", "1"]
SCRIPT_FAST += ["--threads", str(torch.get_num_threads())]  # main() sets the thread count of this process
SCRIPT_EVAL = ["--eval-window", "32", "--eval-stride", "16", "--eval-max-tokens", "200", "--max-new-tokens", "4"]


def test_script_plain_text_with_analysis_and_distillation(tiny_checkpoint, tmp_path, capsys):
    """The main job's defaults on a tiny run: base, untrained, calibrated and trained perplexity on the held-out text
    and the license text, side by side; generations with the loop check; results.json."""
    data = tmp_path / "docs.txt"
    data.write_text("\n\n".join(random_texts(60)))
    out = tmp_path / "run"
    args = ["--model", str(tiny_checkpoint), "--data", str(data), "--share-fraction", "0.4", "--rank", "4"]
    args += [
        "--analysis-batches",
        "1",
        "--attn-kl-weight",
        "0.1",
        "--output-kl-weight",
        "0.1",
        "--self-generated",
        "40",
        "--output-dir",
        str(out),
    ]
    assert load_script().main(args + SCRIPT_FAST + SCRIPT_EVAL) == 0
    printed = capsys.readouterr().out
    saved = json.loads((out / "results.json").read_text())
    assert len(saved["share_layers"]) == 2 and min(saved["share_layers"]) >= 2  # --keep-first 2
    assert saved["layer_choice"]["method"] == "analysis (sensitivity_calibrated)"  # the default --layer-score
    assert (
        saved["layer_choice"]["analysis_minutes"] >= 0
        and "layers chosen by analysis (sensitivity_calibrated) (" in printed
    )
    analysis = json.loads((out / "analysis.json").read_text())
    assert saved["share_layers"] == choose_layers(
        analysis["sensitivity_calibrated"], analysis["num_layers"], fraction=0.4, score="sensitivity_calibrated"
    )
    metrics = saved["metrics"]
    keys = ("base_perplexity", "untrained_perplexity", "calibrated_perplexity", "perplexity")
    assert set(keys) <= set(metrics) and set(keys) <= set(metrics["license"])
    assert metrics["perplexity"]["window"] == 32 and metrics["base_perplexity"]["num_tokens"] == 199
    assert saved["calibration"]["layers"]
    assert saved["calibration_config"]["num_sequences"] == LiSACalibrationConfig().num_sequences
    assert saved["training"]["tokens_seen"] == 2 * 2 * 32
    # --self-generated 40: the base model's answers to the first 16 everyday prompts are half the training tokens;
    # the calibration fits on the data alone.
    mix = saved["self_generated"]
    assert mix["prompts"] == 16 and mix["answers"] >= 1 and mix["share"] == 0.5
    train_documents = len(load_sft_dataset(str(data), "train"))
    assert saved["training"]["documents"] > train_documents + mix["answers"]  # answers cycled through the data
    assert "trained on the data mixed with" in printed
    assert any("attn_kl" in entry and "output_kl" in entry for entry in saved["training"]["log_history"])
    generations = saved["generations"]
    assert len(generations["prompts"]) == 4 and len(generations["base"]) == len(generations["trained_lisa"]) == 4
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "analysis.json").is_file()
    assert set(generations["loops"]) == {"base", "calibrated_lisa", "trained_lisa"}
    assert len(saved["loop_check"]["prompts"]) == 16 and "looping on 16 more everyday prompts: base model " in printed
    # The printed table: one line per model, in this order, with the values of results.json for both texts.
    labels = ("base model", "untrained LiSA", "calibrated LiSA", "trained LiSA")
    for label, key in zip(labels, keys, strict=True):
        own, other = metrics[key]["ppl"], metrics["license"][key]["ppl"]
        vs_base = "" if key == "base_perplexity" else f"{own / metrics['base_perplexity']['ppl'] - 1:>+9.1%}"
        assert f"  {label:<16}{own:>16.2f}{vs_base or '':>9}{other:>16.2f}" in printed, label
    positions = [printed.index(f"  {label}  ") for label in labels]
    assert positions == sorted(positions)
    assert f">>> {generations['prompts'][0]}\n  [base model] " in printed and "[calibrated LiSA]" in printed


def test_script_chat_data_on_4bit_base(tiny_checkpoint, tmp_path):
    pytest.importorskip("bitsandbytes")
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(json.dumps({"messages": m}) for m in random_conversations(30)))
    out = tmp_path / "run"
    args = ["--model", str(tiny_checkpoint), "--data", str(data), "--share-layers", "2,3", "--rank", "4"]
    args += ["--load-in-4bit", "--output-dir", str(out)]
    assert load_script().main(args + SCRIPT_FAST + SCRIPT_EVAL) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["data_format"] == "chat" and results["packing"] is False and results["load_in_4bit"]
    metrics = results["metrics"]
    assert {"base_perplexity", "untrained_perplexity", "perplexity"} <= set(metrics)
    assert metrics["perplexity"]["ppl"] != metrics["untrained_perplexity"]["ppl"]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_script_is_peft_lisa_train_with_the_main_job_defaults(capsys):
    """--help is peft-lisa train's; --skip-base-eval turns off the base and untrained measurements."""
    script = load_script()
    assert script.main(["--help"]) == 0
    help_text = capsys.readouterr().out
    assert help_text.startswith("usage: peft-lisa train")
    for option in ("--share-fraction", "--load-in-4bit", "--attn-kl-weight", "--output-kl-weight", "--eval-stride"):
        assert option in help_text
    parsed = {}

    def fake_main(argv):
        from peft_lisa.cli import build_parser

        parsed["args"] = build_parser().parse_args(argv)
        return 0

    script.peft_lisa_main = fake_main
    assert script.main(["--skip-base-eval", "--max-steps", "3"]) == 0
    args = parsed["args"]
    assert args.command == "train" and args.output_dir == "runs/train_lisa" and args.max_steps == 3
    assert not args.eval_base and not args.eval_untrained and args.max_new_tokens == 40 and args.threads >= 1
    script.main(["--threads", "2"])
    assert parsed["args"].eval_base and parsed["args"].eval_untrained and parsed["args"].threads == 2
    # The main job mixes 4,096 tokens of the base model's own answers into its training data; 0 turns it off.
    assert parsed["args"].self_generated == 4096 and parsed["args"].loop_check == 16
    script.main(["--self-generated", "0"])
    assert parsed["args"].self_generated == 0


def test_4bit_training_after_an_evaluation_still_gets_gradients(tmp_path):
    """bitsandbytes repacks 4-bit CPU weights for inference on the first no-grad eval forward (on AVX512-BF16
    CPUs), after which gradients stop flowing; keep_4bit_weights_trainable prevents that, and undoes it."""
    pytest.importorskip("bitsandbytes")
    from bitsandbytes.nn import Linear4bit
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from peft_lisa.training import keep_4bit_weights_trainable

    tiny_model(intermediate_size=128).save_pretrained(tmp_path / "tiny")
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    ids = random_ids(2, 12)

    def load():
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny", quantization_config=quantization)
        torch.manual_seed(0)  # the same adapter initialisation every time
        peft_model = get_peft_model(model, lisa_config())
        randomize_adapter(peft_model)  # a zero-initialised low-rank query would give the key factor no gradient
        return peft_model

    def evaluate(peft_model):
        peft_model.eval()
        with torch.no_grad():
            peft_model(input_ids=ids)  # repacks the 4-bit weights on CPUs with AVX512-BF16
        peft_model.train()

    def check_gradients(peft_model):
        peft_model.zero_grad()
        peft_model(input_ids=ids).logits.float().pow(2).mean().backward()
        grads = [p.grad for n, p in peft_model.named_parameters() if "lisa_" in n]
        assert all(g is not None and g.abs().sum() > 0 for g in grads)

    # Prevented: called before any evaluation, the weights are never repacked and compute exactly as before.
    peft_model = load().train()
    layers = [m for m in peft_model.modules() if isinstance(m, Linear4bit)]
    if any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers):
        # Newer stacks (bitsandbytes 0.50.2 with transformers 5.25) repack while loading: unpack, then take the
        # float path's logits as the reference.
        keep_4bit_weights_trainable(peft_model)
    reference = peft_model(input_ids=ids).logits.detach()
    keep_4bit_weights_trainable(peft_model)
    evaluate(peft_model)
    layers = [m for m in peft_model.modules() if isinstance(m, Linear4bit)]
    assert layers and not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    assert torch.equal(peft_model(input_ids=ids).logits.detach(), reference)
    check_gradients(peft_model)

    # Undone: after a repacking, the weights are unpacked again (bitsandbytes rounded their scales to bf16).
    peft_model = load()
    evaluate(peft_model)
    keep_4bit_weights_trainable(peft_model)
    layers = [m for m in peft_model.modules() if isinstance(m, Linear4bit)]
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    difference = peft_model(input_ids=ids).logits.detach() - reference
    assert difference.norm() < 0.02 * reference.norm()
    check_gradients(peft_model)
