"""Property-based tests: for any config and model shape, LiSA either works (forward, cache, merge) or says why not."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

from peft_lisa import LiSAConfig, LiSALayer


@st.composite
def shapes_and_configs(draw):
    num_kv_heads = draw(st.sampled_from([1, 2, 3]))
    num_heads = num_kv_heads * draw(st.sampled_from([1, 2, 3]))
    head_dim = draw(st.sampled_from([4, 8, 16]))
    num_layers = draw(st.integers(2, 5))
    model_type = draw(st.sampled_from(["llama", "qwen3"]))
    share_layers = draw(st.lists(st.integers(-1, num_layers + 1), min_size=1, max_size=num_layers, unique=True))
    rank = draw(st.sampled_from([2, 4, 6, 8, 16, 32]))
    align_hidden = draw(st.sampled_from([None, 0, 3]))
    rotary = draw(st.sampled_from(["first", "strided"]))
    return model_type, num_heads, num_kv_heads, head_dim, num_layers, share_layers, rank, align_hidden, rotary


def build(model_type, num_heads, num_kv_heads, head_dim, num_layers):
    kwargs = dict(
        vocab_size=64,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        num_hidden_layers=num_layers,
        intermediate_size=32,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    if model_type == "llama":
        config = LlamaConfig(hidden_size=num_heads * head_dim, **kwargs)
    else:
        config = Qwen3Config(hidden_size=24, head_dim=head_dim, **kwargs)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shapes_and_configs())
def test_lisa_works_or_raises_a_clear_error(case):
    model_type, num_heads, num_kv_heads, head_dim, num_layers, share_layers, rank, align_hidden, rotary = case
    model = build(model_type, num_heads, num_kv_heads, head_dim, num_layers)
    ids = torch.randint(1, 64, (2, 7))
    with torch.no_grad():
        base_logits = model(ids).logits
    expected_error = any(i <= 0 for i in share_layers) or any(i >= num_layers for i in share_layers) or rank > head_dim
    try:
        config = LiSAConfig(share_layers=share_layers, rank=rank, align_hidden=align_hidden, rotary_frequencies=rotary)
        peft_model = get_peft_model(model, config).eval()
    except ValueError as error:
        assert expected_error, f"unexpected error for a valid case: {error}"
        assert "share_layers" in str(error) or "rank" in str(error)
        assert not any(isinstance(m, LiSALayer) for m in model.modules())  # nothing half-applied
        with torch.no_grad():
            assert torch.equal(model(ids).logits, base_logits)
        return
    assert not expected_error, "an invalid config was accepted"
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if ".lisa_" in name:
                param.add_(torch.randn_like(param) * 0.2)
        logits = peft_model(ids).logits
        assert torch.isfinite(logits).all()
        cached = peft_model.generate(ids, max_new_tokens=3, do_sample=False, use_cache=True, pad_token_id=0)
        uncached = peft_model.generate(ids, max_new_tokens=3, do_sample=False, use_cache=False, pad_token_id=0)
        assert torch.equal(cached, uncached)
        merged = peft_model.merge_and_unload()
        torch.testing.assert_close(merged(ids).logits, logits, atol=1e-5, rtol=1e-5)


@settings(max_examples=20, deadline=None)
@given(
    dtype=st.sampled_from([torch.float16, torch.bfloat16]),
    scale=st.floats(1.0, 30.0),
)
def test_half_precision_logits_handed_between_layers_stay_finite(dtype, scale):
    """Large q/k weights in fp16/bf16: the logits handed from layer to layer are float32 and never overflow."""
    model = build("llama", 4, 2, 16, 4)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(scale)
            layer.self_attn.k_proj.weight.mul_(scale)
    peft_model = get_peft_model(model, LiSAConfig(share_layers=[2, 3], rank=4)).to(dtype).eval()
    handed = []
    carrier = peft_model.base_model.logits_carrier
    carrier.observers.append(lambda call: handed.append(call.logits))
    with torch.no_grad():
        logits = peft_model(torch.randint(1, 64, (2, 9))).logits
    assert handed and all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in handed)
    assert torch.isfinite(logits.float()).all()
