"""QLoRA end to end: train a LiSA adapter on a 4-bit NF4 base (bitsandbytes on CPU), then merge.

``merge_and_unload()`` on the quantized base refuses with the two ways that work; ``merge_dequantized`` (dequantize
to a stated dtype, then merge) gives a merged model that saves, reloads without bitsandbytes and matches the adapter
on the 4-bit base: float32 to 1e-5 (measured: 0, the CPU 4-bit path computes with the dequantized weights), bfloat16
to 0.1 in the logits (bf16 weights); reloading the base in float32 and merging there (``peft-lisa merge``) differs
from the 4-bit adapter by the NF4 rounding of the base weights."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from peft_lisa import merge_dequantized
from peft_lisa.data import text_dataset
from peft_lisa.training import LiSATrainer, keep_4bit_weights_trainable

from .conftest import random_ids, tiny_model
from .test_training import lisa_config, random_texts, sft_args, tiny_tokenizer

pytest.importorskip("bitsandbytes")

FLOAT32_ATOL = 1e-5
BF16_ATOL = 0.1  # logits of order 1-5; bf16 weights carry ~3 significant digits


def load_4bit(directory):
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    return AutoModelForCausalLM.from_pretrained(directory, quantization_config=quantization)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny checkpoint and a LiSA adapter trained 3 steps on its 4-bit NF4 load (saved in ``adapter/``)."""
    root = tmp_path_factory.mktemp("qlora")
    tiny_model(intermediate_size=128).save_pretrained(root / "tiny")  # whole 64-blocks for bitsandbytes on CPU
    trainer = LiSATrainer(
        model=load_4bit(root / "tiny"),
        args=sft_args(root),
        train_dataset=text_dataset(random_texts()),
        processing_class=tiny_tokenizer(),
        peft_config=lisa_config(),
    )
    trainer.train()
    trainer.model.save_pretrained(root / "adapter")
    return root


def adapter_on_4bit(root):
    return PeftModel.from_pretrained(load_4bit(root / "tiny"), str(root / "adapter")).eval()


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def test_merge_and_unload_on_a_4bit_base_is_a_clear_error(trained):
    with pytest.raises(ValueError, match="merge_dequantized.*reload the base model in bfloat16/float32"):
        adapter_on_4bit(trained).merge_and_unload()


@pytest.mark.parametrize(("dtype", "atol"), [(torch.float32, FLOAT32_ATOL), (torch.bfloat16, BF16_ATOL)])
def test_merge_dequantized_saves_reloads_and_matches_the_adapter(trained, tmp_path, dtype, atol):
    ids = random_ids(2, 16)
    # The reference: the adapter on the 4-bit base on bitsandbytes' float path. Newer stacks (bitsandbytes 0.50.2 with
    # transformers 5.25) repack the weights for a CPU inference kernel while loading on AVX512-BF16 CPUs, and that
    # path's logits were up to 0.7 off the float path's here: unpack them for the reference.
    unpacked = adapter_on_4bit(trained)
    keep_4bit_weights_trainable(unpacked)
    reference = logits(unpacked, ids)
    model = adapter_on_4bit(trained)  # as a user loads it (dequantize() reads repacked weights correctly)
    assert model.get_base_model().is_loaded_in_4bit
    merged = merge_dequantized(model, dtype=dtype)
    assert type(merged).__name__ == "LiSALlamaForCausalLM"
    assert {p.dtype for p in merged.parameters()} == {dtype}
    assert not any("4bit" in type(m).__name__ for m in merged.modules())
    merged.save_pretrained(tmp_path / "merged")
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "lisa_llama"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert type(reloaded).__name__ == "LiSALlamaForCausalLM" and reloaded.dtype == dtype
    assert not any("4bit" in type(m).__name__ for m in reloaded.modules())
    difference = (logits(reloaded, ids) - reference).abs().max().item()
    assert difference <= atol, difference
    # save + reload changes nothing beyond kernel rounding (bf16 matmuls of other memory layouts)
    assert (logits(reloaded, ids) - logits(merged, ids)).abs().max() <= atol / 2
    print(f"{dtype}: merged-and-reloaded vs adapter on the 4-bit base, max |logit difference| {difference:.3g}")
    # The adapter is not a no-op: its base model alone gives other logits.
    base = load_4bit(trained / "tiny").eval()
    adapter_effect = (logits(base, ids) - reference).abs().max().item()
    assert adapter_effect > max(10 * difference, 1e-3), (adapter_effect, difference)


def test_the_alternative_merge_on_a_float32_base(trained):
    """Reload the base without quantization, apply the adapter, merge: works, off by the NF4 rounding only."""
    ids = random_ids(2, 16)
    reference = logits(adapter_on_4bit(trained), ids)
    base = AutoModelForCausalLM.from_pretrained(trained / "tiny", dtype=torch.float32)
    on_float = PeftModel.from_pretrained(base, str(trained / "adapter")).eval()
    float_reference = logits(on_float, ids)
    merged = on_float.merge_and_unload()
    assert torch.allclose(logits(merged, ids), float_reference, atol=FLOAT32_ATOL)
    nf4_rounding = (float_reference - reference).abs().max().item()
    print(f"merged on the float32 base vs adapter on the 4-bit base, max |logit difference| {nf4_rounding:.3g}")
    assert nf4_rounding > FLOAT32_ATOL  # NF4 rounding of the base weights
