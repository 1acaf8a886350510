"""Bad input gets a clear error naming the problem and the fix, and leaves the model untouched."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model

from peft_lisa import LiSAConfig, LiSALayer

from .conftest import random_ids, tiny_model


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(share_layers=[0, 2]), "layer 0 can never share"),
        (dict(share_layers=[2, 2]), r"lists layers \[2\] more than once"),
        (dict(share_layers=[]), "share_layers is empty"),
        (dict(share_layers=[-1]), "indices must be positive"),
        (dict(share_layers=["2"]), "list of layer indices"),
        (dict(share_layers=[2], rank=3), "even integer"),
        (dict(share_layers=[2], rank=0), "even integer"),
        (dict(share_layers=[2], align_hidden=-1), "align_hidden"),
        (dict(share_layers=[2], align_activation="softmax"), "align_activation must be one of"),
        (dict(share_layers=[2], align_init_permutations={3: [0, 1, 2, 3]}), "not in share_layers"),
        (dict(share_layers=[2], align_init_permutations={2: [0, 0, 1, 2]}), "not a permutation"),
    ],
)
def test_invalid_config_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LiSAConfig(**kwargs)


def assert_untouched(model, reference_logits):
    assert not any(isinstance(m, LiSALayer) for m in model.modules())
    assert not hasattr(model, "peft_config")
    with torch.no_grad():
        assert torch.equal(model(random_ids()).logits, reference_logits)


@pytest.mark.parametrize(
    "config, message",
    [
        (LiSAConfig(share_layers=[2, 5]), r"contains \[5\], but the model has 5 layers: valid indices are 1..4"),
        (LiSAConfig(share_layers=[2], rank=32), "rank=32 is larger than the head size 16"),
        (LiSAConfig(share_layers=[2], align_init_permutations={2: [1, 0]}), "has 2 entries.*4 attention heads"),
    ],
)
def test_config_that_does_not_fit_the_model(config, message):
    model = tiny_model("llama")
    with torch.no_grad():
        reference = model(random_ids()).logits
    with pytest.raises(ValueError, match=message):
        get_peft_model(model, config)
    assert_untouched(model, reference)


def test_adapter_for_another_base_is_refused(tmp_path):
    get_peft_model(tiny_model("llama"), LiSAConfig(share_layers=[2], rank=4)).save_pretrained(tmp_path)
    other = tiny_model("llama", num_attention_heads=8, num_key_value_heads=4)
    with torch.no_grad():
        reference = other(random_ids()).logits
    with pytest.raises(ValueError, match="different base model: num_attention_heads is 8 here but 4 in the adapter"):
        PeftModel.from_pretrained(other, tmp_path)
    assert_untouched(other, reference)


def test_adapter_for_another_architecture_is_refused(tmp_path):
    get_peft_model(tiny_model("llama"), LiSAConfig(share_layers=[2], rank=4)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="model_type is qwen2 here but llama in the adapter"):
        PeftModel.from_pretrained(tiny_model("qwen2"), tmp_path)


def test_missing_weights_file(tmp_path):
    get_peft_model(tiny_model("llama"), LiSAConfig(share_layers=[2], rank=4)).save_pretrained(tmp_path)
    (tmp_path / "adapter_model.safetensors").unlink()
    model = tiny_model("llama")
    with pytest.raises(FileNotFoundError, match="no adapter_model.safetensors: it is incomplete"):
        PeftModel.from_pretrained(model, tmp_path)
    assert not any(isinstance(m, LiSALayer) for m in model.modules())


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_weights_file(tmp_path, damage):
    get_peft_model(tiny_model("llama"), LiSAConfig(share_layers=[2], rank=4)).save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"not a safetensors file" * 4)
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="corrupt or truncated"):
        PeftModel.from_pretrained(model, tmp_path)
    assert not any(isinstance(m, LiSALayer) for m in model.modules())


def test_weights_of_another_adapter(tmp_path):
    get_peft_model(tiny_model("llama"), LiSAConfig(share_layers=[2], rank=4)).save_pretrained(tmp_path / "a")
    get_peft_model(tiny_model("llama"), LiSAConfig(share_layers=[3], rank=4)).save_pretrained(tmp_path / "b")
    (tmp_path / "b" / "adapter_model.safetensors").replace(tmp_path / "a" / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"no weights for shared layers \[2\]"):
        PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "a")


def test_config_only_directory_can_be_read(tmp_path):
    LiSAConfig(share_layers=[2], rank=4).save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError):
        LiSAConfig.from_pretrained(tmp_path)
    assert LiSAConfig.from_pretrained(tmp_path, check_weights=False).share_layers == [2]


def test_merged_model_switched_to_an_unsupported_attention_kernel_is_refused():
    """Shared layers read the eager/sdpa mask format: a merged model switched to flex attention must not run."""
    from peft_lisa import UnsupportedModelError

    model = get_peft_model(tiny_model("llama"), LiSAConfig(share_layers=[2], rank=4)).merge_and_unload()
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(UnsupportedModelError, match="set_attn_implementation"):
        model(random_ids())


def test_attention_weights_are_refused_while_lisa_layers_run():
    """transformers records attention weights only from the family's own attention modules: a LiSA model asked for
    them (the argument, or the config) is refused with the fix rather than returning the other layers' alone; with
    the adapter disabled the base's come back, one per layer."""
    model = tiny_model("llama", attn_implementation="eager")
    peft_model = get_peft_model(model, LiSAConfig(share_layers=[2, 3], rank=4)).eval()
    ids = random_ids()
    with torch.no_grad():
        with pytest.raises(ValueError, match="disable_adapter"):
            peft_model(ids, output_attentions=True)
        with peft_model.disable_adapter():
            weights = peft_model(ids, output_attentions=True).attentions
        assert len(weights) == model.config.num_hidden_layers
        assert peft_model(ids, output_attentions=False).attentions is None
        merged = peft_model.merge_and_unload()
        with pytest.raises(ValueError, match="Ask the base model"):
            merged(ids, output_attentions=True)
        merged.config.output_attentions = True
        with pytest.raises(ValueError, match="no attention weights"):
            merged(ids)
        merged.config.output_attentions = False
        assert torch.isfinite(merged(ids).logits).all()
