"""PEFT behaviours of the LiSA tuner: training, save/load, disable, several adapters, unload, checkpointing."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.utils import PeftType

from peft_lisa import LiSAConfig, LiSALayer

from .conftest import random_ids, randomize_adapter, run_python, tiny_model


def lm_loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


def test_peft_type_registered_and_round_trips(tmp_path):
    assert PeftType("LISA") is PeftType.LISA
    config = LiSAConfig(share_layers=[3, 2], rank=4, align_init_permutations={3: [1, 0, 3, 2]})
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LISA"
    loaded = LiSAConfig.from_pretrained(tmp_path, check_weights=False)
    assert loaded.peft_type == PeftType.LISA and loaded.share_layers == [2, 3]
    assert loaded.align_init_permutations == {3: [1, 0, 3, 2]}


def test_only_adapter_trains_and_base_is_untouched():
    model = tiny_model("llama")
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    peft_model = get_peft_model(model, LiSAConfig(share_layers=[2, 3], rank=4, align_hidden=None))  # FFN too
    peft_model.train()
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all(".lisa_" in n for n in trainable)
    adapter_before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    ids = random_ids(2, 16)
    loss = lm_loss(peft_model, ids)
    loss.backward()
    grads = {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    # With the query factor and W2 zero-initialised, these receive gradient from the first step on.
    for key in (
        "lisa_substitute.default.align.permute",
        "lisa_substitute.default.align.down.weight",
        "lisa_substitute.default.q_lowrank.weight",
    ):
        for layer in (2, 3):
            name = next(n for n in grads if f"layers.{layer}." in n and n.endswith(key))
            assert grads[name] is not None and grads[name].abs().sum() > 0, name
    optimizer.step()
    for name, param in peft_model.named_parameters():
        if param.requires_grad:
            assert not torch.equal(param, adapter_before[name]), name
    for key, value in peft_model.get_base_model().state_dict().items():
        if ".lisa_" not in key:
            assert torch.equal(value, base_state[key.replace(".base_layer", "")]), key


def test_save_load_round_trip(tmp_path):
    peft_model = get_peft_model(tiny_model("llama"), LiSAConfig(share_layers=[2, 3], rank=4))
    randomize_adapter(peft_model)
    peft_model.eval()
    ids = random_ids()
    with torch.no_grad():
        expected = peft_model(ids).logits
    peft_model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a missing-keys warning would fail here
        loaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path).eval()
    saved_state = {k: v for k, v in peft_model.state_dict().items() if ".lisa_" in k}
    loaded_state = {k: v for k, v in loaded.state_dict().items() if ".lisa_" in k}
    assert saved_state.keys() == loaded_state.keys() and saved_state
    assert all(torch.equal(saved_state[k], loaded_state[k]) for k in saved_state)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected)
    torch.save({"ids": ids, "logits": expected}, tmp_path / "expected.pt")
    result = run_python(
        f"""
import torch, peft_lisa
from peft import PeftModel
from tests.conftest import tiny_model
expected = torch.load({str(tmp_path / "expected.pt")!r})
model = PeftModel.from_pretrained(tiny_model("llama"), {str(tmp_path)!r}).eval()
with torch.no_grad():
    assert torch.equal(model(expected["ids"]).logits, expected["logits"])
print("FRESH-OK")
""",
        tmp_path,
    )
    assert "FRESH-OK" in result.stdout, result.stderr


def test_loading_without_import_names_the_fix(tmp_path):
    get_peft_model(tiny_model("llama"), LiSAConfig(share_layers=[2], rank=4)).save_pretrained(tmp_path)
    result = run_python(
        f"""
from peft import PeftModel
from tests.conftest import VOCAB
from transformers import AutoModelForCausalLM, LlamaConfig
model = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
    num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2))
PeftModel.from_pretrained(model, {str(tmp_path)!r})
""".replace("from tests.conftest import VOCAB", "VOCAB = 128"),
        tmp_path,
    )
    assert result.returncode != 0
    assert "LISA" in result.stderr


def test_disable_adapter_gives_base_logits_exactly():
    model = tiny_model("qwen2")
    ids = random_ids()
    with torch.no_grad():
        base = model(ids).logits
    peft_model = get_peft_model(model, LiSAConfig(share_layers=[1, 2, 4], rank=4))
    randomize_adapter(peft_model)
    with torch.no_grad():
        assert not torch.equal(peft_model(ids).logits, base)
        with peft_model.disable_adapter():
            assert torch.equal(peft_model(ids).logits, base)
        assert not torch.equal(peft_model(ids).logits, base)


def test_several_adapters_switch_and_delete():
    ids = random_ids()
    config_b = LiSAConfig(share_layers=[1, 3], rank=2)
    alone_b = get_peft_model(tiny_model("llama"), config_b)
    randomize_adapter(alone_b, seed=5)
    peft_model = get_peft_model(tiny_model("llama"), LiSAConfig(share_layers=[2, 3], rank=4))
    randomize_adapter(peft_model, seed=4)
    with torch.no_grad():
        logits_a = peft_model(ids).logits
    peft_model.add_adapter("b", config_b)
    peft_model.load_state_dict(
        {k.replace(".default", ".b"): v for k, v in alone_b.state_dict().items() if ".lisa_" in k}, strict=False
    )
    with torch.no_grad():
        assert torch.equal(peft_model(ids).logits, logits_a)  # "b" was added inactive
        peft_model.set_adapter("b")
        torch.testing.assert_close(peft_model(ids).logits, alone_b(ids).logits, atol=1e-6, rtol=1e-6)
        with pytest.raises(ValueError, match="only one can be active"):
            peft_model.base_model.set_adapter(["default", "b"])
        peft_model.set_adapter("default")
        assert torch.equal(peft_model(ids).logits, logits_a)
    peft_model.delete_adapter("b")
    assert "b" not in peft_model.peft_config
    assert all("b" not in m.lisa_role for m in peft_model.modules() if isinstance(m, LiSALayer))
    with torch.no_grad():
        assert torch.equal(peft_model(ids).logits, logits_a)


def test_unload_returns_untouched_base():
    model = tiny_model("mistral")
    ids = random_ids()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        base = model(ids).logits
    peft_model = get_peft_model(model, LiSAConfig(share_layers=[2, 3], rank=4))
    randomize_adapter(peft_model)
    unloaded = peft_model.unload()
    assert not any(isinstance(m, LiSALayer) for m in unloaded.modules())
    assert unloaded.state_dict().keys() == state.keys()
    assert all(torch.equal(unloaded.state_dict()[k], v) for k, v in state.items())
    with torch.no_grad():
        assert torch.equal(unloaded(ids).logits, base)


def test_gradient_checkpointing_gives_same_gradients():
    ids = random_ids(2, 16)

    def grads(checkpointing: bool):
        peft_model = get_peft_model(tiny_model("llama"), LiSAConfig(share_layers=[2, 3], rank=4))
        randomize_adapter(peft_model)
        if checkpointing:
            peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            peft_model.enable_input_require_grads()
        peft_model.train()
        lm_loss(peft_model, ids).backward()
        return {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-5, rtol=1e-4)


def test_reentrant_gradient_checkpointing_is_refused():
    peft_model = get_peft_model(tiny_model("llama"), LiSAConfig(share_layers=[2, 3], rank=4))
    peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    peft_model.train()
    with pytest.raises(ValueError, match="use_reentrant"):
        lm_loss(peft_model, random_ids())


@pytest.mark.parametrize(("align_hidden", "m"), [(None, 16), (0, 0), (5, 5)])
def test_trainable_parameter_count_is_reported(align_hidden, m):
    config = LiSAConfig(share_layers=[2, 3], rank=4, align_hidden=align_hidden)
    peft_model = get_peft_model(tiny_model("llama"), config)
    trainable, total = peft_model.get_nb_trainable_parameters()
    heads, hidden, kv_heads = 4, 64, 2
    # P, then (FFN only) W1, b1, W2 and b2, then the rank-4 Q/K: the linear alignment has no b2.
    align = heads * heads + ((heads * m + m) + m * heads + heads if m else 0)
    per_layer = align + hidden * heads * 4 + hidden * kv_heads * 4
    assert trainable == 2 * per_layer
    assert total == sum(p.numel() for p in tiny_model("llama").parameters()) + trainable


def test_config_unknown_newer_keys(tmp_path):
    config = LiSAConfig(share_layers=[2], rank=4)
    config.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    data["lisa_format_version"] = 99
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="format version 99.*Upgrade peft_lisa"):
        LiSAConfig.from_pretrained(tmp_path, check_weights=False)
