"""Property-based tests: for any valid model shape and config LiSA computes what it should; any invalid one is refused
with an error naming the field, leaving the model untouched.

Valid cases are drawn geometry first (architecture, heads, head size, layers), then a config that fits it, so that
every example builds an adapter. Each is checked against references, not only for finiteness: the untrained adapter
against direct sharing built from the base model's own eager attention, disable_adapter against the base model
(exactly), and, with every LiSA parameter trained, cached decoding against a no-cache forward, a left-padded row
against the row alone, and the merged model against the adapter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from peft import get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

from peft_lisa import LiSAConfig, LiSALayer

from .test_reference import direct_sharing_reference, positions_of, prefill_and_decode

VOCAB = 64
PROPERTY_SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@dataclass(frozen=True)
class Geometry:
    model_type: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_layers: int
    sliding_window: Optional[int] = None  # Mistral only


@st.composite
def geometries(draw) -> Geometry:
    model_type = draw(st.sampled_from(["llama", "mistral", "qwen2", "qwen3"]))
    # Mostly 3+ heads, so that most permutations are not their own inverse; MHA and GQA.
    num_heads, num_kv_heads = draw(st.sampled_from([(4, 2), (3, 1), (4, 4), (6, 2), (6, 3), (2, 1), (1, 1)]))
    head_dim = draw(st.sampled_from([4, 8, 12]))
    num_layers = draw(st.integers(2, 4))
    sliding_window = draw(st.sampled_from([None, 4])) if model_type == "mistral" else None
    return Geometry(model_type, num_heads, num_kv_heads, head_dim, num_layers, sliding_window)


@st.composite
def valid_cases(draw) -> tuple[Geometry, dict, str]:
    geometry = draw(geometries())
    share_layers = draw(st.lists(st.integers(1, geometry.num_layers - 1), min_size=1, unique=True).map(sorted))
    kwargs = dict(
        share_layers=share_layers,
        rank=draw(st.sampled_from(list(range(2, geometry.head_dim + 1, 2)))),
        align_hidden=draw(st.sampled_from([None, 0, 3])),
        align_activation=draw(st.sampled_from(["gelu", "silu", "relu", "tanh"])),
        rotary_frequencies=draw(st.sampled_from(["first", "strided"])),
        align_init_permutations={
            layer: draw(st.permutations(list(range(geometry.num_heads)))) for layer in share_layers
        },
    )
    return geometry, kwargs, draw(st.sampled_from(["sdpa", "eager"]))


def build(geometry: Geometry, attn_implementation: str = "sdpa"):
    kwargs = dict(
        vocab_size=VOCAB,
        num_attention_heads=geometry.num_heads,
        num_key_value_heads=geometry.num_kv_heads,
        num_hidden_layers=geometry.num_layers,
        intermediate_size=32,
        max_position_embeddings=64,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    hidden_size = geometry.num_heads * geometry.head_dim
    if geometry.model_type == "llama":
        config = LlamaConfig(hidden_size=hidden_size, **kwargs)
    elif geometry.model_type == "mistral":
        config = MistralConfig(hidden_size=hidden_size, sliding_window=geometry.sliding_window, **kwargs)
    elif geometry.model_type == "qwen2":
        config = Qwen2Config(hidden_size=hidden_size, **kwargs)
    else:  # an explicit head size that is not hidden_size / heads
        config = Qwen3Config(hidden_size=24, head_dim=geometry.head_dim, **kwargs)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    with torch.no_grad():  # sharper attention than the random init's near-uniform one, so errors show
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
            layer.self_attn.k_proj.weight.mul_(4.0)
    return model.eval()


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts of 7 tokens; the second is left-padded to 4 real tokens."""
    ids = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0
    return ids, mask


# Always run, whatever hypothesis draws: Qwen3 (q/k norm) with a chain, an FFN alignment and permutations that are
# not their own inverse; Mistral with a sliding window shorter than the sequence.
@example(
    (
        Geometry("qwen3", 4, 2, 8, 3),
        dict(
            share_layers=[1, 2], rank=4, align_hidden=None, align_init_permutations={1: [1, 2, 3, 0], 2: [3, 0, 1, 2]}
        ),
        "sdpa",
    )
)
@example(
    (
        Geometry("mistral", 6, 3, 8, 4, sliding_window=4),
        dict(share_layers=[2, 3], rank=8, align_hidden=3, align_init_permutations={2: [1, 2, 0, 4, 5, 3]}),
        "eager",
    )
)
@settings(max_examples=25, **PROPERTY_SETTINGS)
@given(valid_cases())
def test_valid_config_computes_what_it_should(case):
    geometry, kwargs, attn_implementation = case
    ids, mask = batch()
    pad = int((mask[1] == 0).sum())
    new_tokens = torch.tensor([[5, 9], [7, 11]])
    model = build(geometry, attn_implementation)
    with torch.no_grad():
        base = model(input_ids=ids, attention_mask=mask).logits
    # An untrained adapter (zero low-rank query, W2 = 0) is direct sharing of the base model's own attention.
    perms = kwargs["align_init_permutations"] or {}
    expected = direct_sharing_reference(build(geometry, "eager"), ids[:1], kwargs["share_layers"], perms)
    peft_model = get_peft_model(model, LiSAConfig(init_lowrank="zero", **kwargs)).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids[:1]).logits, expected, atol=1e-5, rtol=1e-5)

        # Every LiSA parameter trained-like: P, W1, b1, W2, b2 and both low-rank factors.
        generator = torch.Generator().manual_seed(1)
        lisa = [(n, p) for n, p in peft_model.named_parameters() if ".lisa_" in n]
        assert lisa and all(p.requires_grad for _, p in lisa)
        for _, param in lisa:
            param.add_(torch.randn(param.shape, generator=generator) * 0.3)
        assert any(n.endswith("align.down.weight") for n, _ in lisa) == (kwargs["align_hidden"] != 0)

        with peft_model.disable_adapter():
            assert torch.equal(peft_model(input_ids=ids, attention_mask=mask).logits, base)

        # Cached decoding equals one no-cache forward; the padded row's real tokens equal the row alone.
        cached = prefill_and_decode(peft_model, ids, mask, new_tokens)
        full_mask = torch.cat([mask, torch.ones_like(new_tokens)], dim=1)
        full = peft_model(
            input_ids=torch.cat([ids, new_tokens], dim=1),
            attention_mask=full_mask,
            position_ids=positions_of(full_mask),
            use_cache=False,
        ).logits
        assert torch.isfinite(full).all()
        torch.testing.assert_close(cached[:1], full[:1], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(cached[1:, pad:], full[1:, pad:], atol=1e-4, rtol=1e-4)
        alone = prefill_and_decode(peft_model, ids[1:, pad:], mask[1:, pad:], new_tokens[1:])
        torch.testing.assert_close(cached[1:, pad:], alone, atol=1e-5, rtol=1e-5)

        adapter_logits = peft_model(input_ids=ids, attention_mask=mask).logits
    merged = peft_model.merge_and_unload()
    with torch.no_grad():
        merged_logits = merged(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(merged_logits[:1], adapter_logits[:1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged_logits[1:, pad:], adapter_logits[1:, pad:], atol=1e-5, rtol=1e-5)


INVALID = {
    "layer 0 shares": ("share_layers", "layer 0 can never share"),
    "layer out of range": ("share_layers", "valid indices are"),
    "rank above head size": ("rank", "rank <= head size"),
    "odd rank": ("rank", "even integer"),
    "permutation of the wrong size": ("align_init_permutations", "attention heads"),
    "permutation of a layer that does not share": ("align_init_permutations", "not in share_layers"),
}


@st.composite
def invalid_cases(draw) -> tuple[Geometry, dict, str]:
    geometry = draw(geometries())
    problem = draw(st.sampled_from(sorted(INVALID)))
    share_layers = draw(st.lists(st.integers(1, geometry.num_layers - 1), min_size=1, unique=True))
    kwargs: dict = dict(share_layers=share_layers, rank=2)
    if problem == "layer 0 shares":
        kwargs["share_layers"] = [0, *share_layers]
    elif problem == "layer out of range":
        kwargs["share_layers"] = [*share_layers, draw(st.integers(geometry.num_layers, geometry.num_layers + 2))]
    elif problem == "rank above head size":
        kwargs["rank"] = draw(st.sampled_from([geometry.head_dim + 2, 2 * geometry.head_dim]))
    elif problem == "odd rank":
        kwargs["rank"] = draw(st.sampled_from([1, 3, 5]))
    elif problem == "permutation of the wrong size":
        kwargs["align_init_permutations"] = {share_layers[0]: list(range(geometry.num_heads + 1))}
    else:
        kwargs["align_init_permutations"] = {
            draw(st.sampled_from([0, geometry.num_layers])): list(range(geometry.num_heads))
        }
    return geometry, kwargs, problem


@settings(max_examples=15, **PROPERTY_SETTINGS)
@given(invalid_cases())
def test_invalid_config_is_refused_naming_the_field_and_leaves_the_model_untouched(case):
    geometry, kwargs, problem = case
    field, message = INVALID[problem]
    model = build(geometry)
    ids, mask = batch()
    with torch.no_grad():
        base = model(input_ids=ids, attention_mask=mask).logits
    with pytest.raises(ValueError) as error:
        get_peft_model(model, LiSAConfig(**kwargs))
    assert field in str(error.value) and message in str(error.value), (problem, str(error.value))
    assert not any(isinstance(m, LiSALayer) for m in model.modules())  # nothing half-applied
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, base)


@settings(max_examples=20, deadline=None)
@given(
    dtype=st.sampled_from([torch.float16, torch.bfloat16]),
    scale=st.floats(1.0, 30.0),
)
def test_half_precision_logits_handed_between_layers_stay_finite(dtype, scale):
    """Large q/k weights in fp16/bf16: the logits handed from layer to layer are float32 and never overflow."""
    model = build(Geometry("llama", 4, 2, 16, 4))
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
