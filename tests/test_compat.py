"""Artifacts saved by peft-lisa 0.1.0 (adapter format 1, ``tests/fixtures/release_0_1``) still load and compute the
same logits: adapters through ``PeftModel.from_pretrained``, merged models through ``AutoModelForCausalLM``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from peft_lisa import LiSAConfig

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "release_0_1"
KINDS = ("linear", "ffn")


@pytest.fixture(scope="module")
def expected() -> dict[str, torch.Tensor]:
    return load_file(FIXTURE / "expected.safetensors")


def base_model() -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(FIXTURE / "base").eval()


def logits_of(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> torch.Tensor:
    """The logits of the real tokens. Those of left-padding positions are not defined by any attention: a padding
    query sees no key; 0.1.0's shared layers gave it a uniform average of the values, the fused attention a zero."""
    with torch.no_grad():
        logits = model(input_ids=expected["input_ids"], attention_mask=expected["attention_mask"]).logits
    return logits[expected["attention_mask"].bool()]


def saved_logits(expected: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """The saved logits ``name`` of the real tokens."""
    return expected[name][expected["attention_mask"].bool()]


def test_fixture_is_format_1():
    for kind in KINDS:
        saved = json.loads((FIXTURE / f"adapter_{kind}" / "adapter_config.json").read_text())
        assert saved["lisa_format_version"] == 1
        assert json.loads((FIXTURE / f"merged_{kind}" / "config.json").read_text())["lisa"]["format_version"] == 1
    # The linear adapter of 0.1.0 carried a (trained, non-zero) bias b2 that softmax ignored.
    weights = load_file(FIXTURE / "adapter_linear" / "adapter_model.safetensors")
    biases = [value for key, value in weights.items() if key.endswith("lisa_align.out_bias")]
    assert biases and all(bias.abs().sum() > 0 for bias in biases)


@pytest.mark.parametrize("kind", KINDS)
def test_format_1_adapter_loads_and_matches(kind, expected, tmp_path):
    model = PeftModel.from_pretrained(base_model(), FIXTURE / f"adapter_{kind}").eval()
    torch.testing.assert_close(
        logits_of(model, expected), saved_logits(expected, f"logits_{kind}"), atol=1e-5, rtol=1e-5
    )
    with model.disable_adapter():  # exactly the base model run here; the saved base logits to CPU kernel rounding
        disabled = logits_of(model, expected)
    torch.testing.assert_close(disabled, logits_of(base_model().eval(), expected), atol=0, rtol=0)
    torch.testing.assert_close(disabled, saved_logits(expected, "logits_base"), atol=1e-5, rtol=1e-5)
    # Saved again, it is a format-2 adapter that reloads to the same logits.
    model.save_pretrained(tmp_path / "again")
    assert LiSAConfig.from_pretrained(tmp_path / "again").lisa_format_version == 2
    reloaded = PeftModel.from_pretrained(base_model(), tmp_path / "again").eval()
    torch.testing.assert_close(
        logits_of(reloaded, expected), saved_logits(expected, f"logits_{kind}"), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("kind", KINDS)
def test_format_1_merged_model_loads_and_matches(kind, expected):
    model = AutoModelForCausalLM.from_pretrained(FIXTURE / f"merged_{kind}").eval()
    assert not hasattr(model.model.layers[2].self_attn, "q_proj")
    torch.testing.assert_close(
        logits_of(model, expected), saved_logits(expected, f"logits_{kind}"), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("kind", KINDS)
def test_format_1_adapter_merges_like_the_old_merged_model(kind, expected):
    model = PeftModel.from_pretrained(base_model(), FIXTURE / f"adapter_{kind}").eval()
    merged = model.merge_and_unload()
    assert merged.config.lisa["format_version"] == 2
    torch.testing.assert_close(
        logits_of(merged, expected), saved_logits(expected, f"logits_{kind}"), atol=1e-5, rtol=1e-5
    )


def test_ffn_adapter_loads_under_another_adapter_name(expected, tmp_path):
    """Format 1 baked the adapter name into the FFN's keys; format 2 keys carry no adapter name."""
    model = PeftModel.from_pretrained(base_model(), FIXTURE / "adapter_ffn").eval()
    model.save_pretrained(tmp_path / "ffn")
    other = PeftModel.from_pretrained(base_model(), tmp_path / "ffn", adapter_name="other").eval()
    torch.testing.assert_close(logits_of(other, expected), saved_logits(expected, "logits_ffn"), atol=1e-5, rtol=1e-5)
