"""Every supported architecture: forward, exact disable, KV cache (with left padding), cache size, sliding windows."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM, GPT2Config

from peft_lisa import LiSAConfig, UnsupportedModelError

from .conftest import left_padded_batch, random_ids, randomize_adapter, tiny_model
from .test_reference import assert_cached_generation_equals_uncached

ARCHS = ["llama", "mistral", "qwen2", "qwen3"]


def lisa_model(model_type: str, share_layers=(2, 3), rank: int = 4, **model_overrides):
    model = tiny_model(model_type, **model_overrides)
    peft_model = get_peft_model(model, LiSAConfig(share_layers=list(share_layers), rank=rank))
    randomize_adapter(peft_model)
    return peft_model.eval()


@pytest.mark.parametrize("model_type", ARCHS)
def test_forward_and_exact_disable(model_type):
    model = tiny_model(model_type)
    ids = random_ids()
    with torch.no_grad():
        base_logits = model(ids).logits
    peft_model = lisa_model(model_type)
    with torch.no_grad():
        lisa_logits = peft_model(ids).logits
        with peft_model.disable_adapter():
            disabled = peft_model(ids).logits
    assert torch.isfinite(lisa_logits).all()
    assert (lisa_logits - base_logits).abs().max() > 1e-3
    assert torch.equal(disabled, base_logits)


@pytest.mark.parametrize("model_type", ARCHS)
def test_generate_with_cache_equals_without_left_padding(model_type):
    """Same tokens and, step by step, the same logits (atol 1e-4) with and without the cache."""
    assert_cached_generation_equals_uncached(lisa_model(model_type), *left_padded_batch(), new=10)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_incremental_decoding_logits_match_full_forward(attn_implementation):
    """Logits of a cached decode step equal the last row of a no-cache forward over the whole sequence."""
    model = tiny_model("llama", attn_implementation=attn_implementation)
    peft_model = get_peft_model(model, LiSAConfig(share_layers=[2, 3, 4], rank=4))
    randomize_adapter(peft_model)
    ids, mask = left_padded_batch()
    with torch.no_grad():
        out = peft_model(input_ids=ids, attention_mask=mask, use_cache=True)
        next_ids = torch.tensor([[5], [7]])
        full_mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
        step = peft_model(input_ids=next_ids, attention_mask=full_mask, past_key_values=out.past_key_values)
        full = peft_model(input_ids=torch.cat([ids, next_ids], 1), attention_mask=full_mask, use_cache=False)
    torch.testing.assert_close(step.logits[:, -1], full.logits[:, -1], atol=1e-4, rtol=1e-4)


def test_shared_layers_cache_low_rank_keys():
    """A shared layer caches H_kv x r key dims per token instead of H_kv x d_h: here 1/4 (rank 4, head size 16)."""
    peft_model = lisa_model("llama", share_layers=(2, 3), rank=4)
    ids = random_ids(2, 10)
    with torch.no_grad():
        cache = peft_model(ids, use_cache=True).past_key_values
    layers = cache.layers

    def key_bytes(i):
        return layers[i].keys.numel() * layers[i].keys.element_size()

    def value_bytes(i):
        return layers[i].values.numel() * layers[i].values.element_size()

    full_key, shared_key = key_bytes(1), key_bytes(2)
    assert shared_key * 4 == full_key
    assert key_bytes(3) == shared_key and key_bytes(0) == full_key == key_bytes(4)
    assert value_bytes(2) == value_bytes(1)  # values stay full


def test_sliding_window_model_cache_equals_no_cache():
    """Mistral with a sliding window shorter than the sequence: masks and rolling caches stay consistent."""
    assert_cached_generation_equals_uncached(lisa_model("mistral", sliding_window=6), *left_padded_batch(), new=12)


def test_sliding_layer_shares_from_full_layer():
    """Qwen2 with layers full, full, sliding, sliding, sliding: layer 2 (sliding) may share from layer 1 (full); its
    own mask restricts it to its window, and its rolling cache keeps the last keys of the source's logits."""
    model = tiny_model("qwen2", use_sliding_window=True, sliding_window=6, max_window_layers=2)
    assert model.config.layer_types[1] != model.config.layer_types[2]
    peft_model = get_peft_model(model, LiSAConfig(share_layers=[2, 3], rank=4))
    randomize_adapter(peft_model)
    ids, mask = left_padded_batch()
    kwargs = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(
            peft_model.generate(input_ids=ids, use_cache=True, **kwargs),
            peft_model.generate(input_ids=ids, use_cache=False, **kwargs),
        )


def test_unsupported_architecture_says_how_support_is_decided():
    model = AutoModelForCausalLM.from_config(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedModelError, match="gpt2.*q/k/v/o projections.*tested families: gemma2"):
        get_peft_model(model, LiSAConfig(share_layers=[1], rank=4))


def test_flash_or_flex_attention_is_refused_clearly():
    model = tiny_model("llama")
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(UnsupportedModelError, match="attn_implementation='sdpa'"):
        get_peft_model(model, LiSAConfig(share_layers=[2], rank=4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_dtypes(dtype):
    fp32 = lisa_model("qwen3")
    ids = random_ids()
    with torch.no_grad():
        reference = fp32(ids).logits
        fp32.to(dtype)
        logits = fp32(ids).logits
    assert logits.dtype == dtype and torch.isfinite(logits).all()
    tolerance = 1e-5 if dtype == torch.float32 else 0.1
    torch.testing.assert_close(logits.float(), reference, atol=tolerance * reference.abs().max().item(), rtol=0)
