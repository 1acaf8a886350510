"""Every supported decoder family, recognised by the structure of its attention (``docs/method.md``; README,
"Supported models").

For each family, on a tiny model with at least one sliding and one full layer where the family has both:

(a) an untrained adapter equals *direct sharing* computed from the base model itself: layer l-1's own eager
    attention probabilities (permuted, restricted to layer l's mask) applied to layer l's values and ``o_proj``;
(b) a trained-looking adapter: cache == no cache with left padding, disable == base exactly, save/load, merged model
    without q/k in its shared layers equal to the adapter, merged save + ``AutoModelForCausalLM`` reload;
(c) the refusals: full-from-sliding sharing, multi-head latent attention, attention sinks.
"""

from __future__ import annotations

import sys

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, StaticCache

from peft_lisa import LiSAConfig, UnsupportedModelError
from peft_lisa.tuner.functional import keys_held
from peft_lisa.tuner.merged import LiSASharedAttention

from .conftest import TINY_COMMON, random_ids, randomize_adapter, run_python

PERMUTATION = [1, 2, 3, 0]  # not its own inverse: a transposed P would show

COMMON = TINY_COMMON
MOE = dict(num_experts_per_tok=2, moe_intermediate_size=32)

# family -> (config overrides, share_layers, attention implementation). Sliding windows are shorter than the test
# sequences, so that windows, rolling caches and the sliding-from-full key alignment are exercised.
FAMILIES = {
    "llama": (dict(), [2, 3], "sdpa"),
    "mistral": (dict(sliding_window=6), [2, 3], "sdpa"),
    # layer types full, full, sliding, sliding, sliding: layer 2 (sliding) shares from layer 1 (full)
    "qwen2": (dict(use_sliding_window=True, sliding_window=4, max_window_layers=2), [2, 3], "sdpa"),
    "qwen3": (dict(head_dim=24), [2, 3], "sdpa"),
    # sliding, full, sliding, full, sliding; softcapped logits (eager only: sdpa refuses softcap); own scaling
    "gemma2": (
        dict(head_dim=16, sliding_window=4, attn_logit_softcapping=5.0, query_pre_attn_scalar=24),
        [2, 4],
        "eager",
    ),
    # per-layer-type rotary (different theta for sliding and full layers), per-head q/k norms; layer 5 (sliding)
    # feeds no shared layer: a merged model's plain full layer with the sliding layers' rotary
    "gemma3_text": (
        dict(
            head_dim=16,
            sliding_window=4,
            query_pre_attn_scalar=24,
            num_hidden_layers=6,
            layer_types=[
                "full_attention",
                "sliding_attention",
                "sliding_attention",
                "full_attention",
                "full_attention",
                "sliding_attention",
            ],
        ),
        [1, 2, 4],
        "sdpa",
    ),
    # fused qkv_proj, partial rotary
    "phi3": (
        dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}),
        [2, 3],
        "sdpa",
    ),
    "olmo2": (dict(), [2, 3], "sdpa"),  # q/k norms over the full width
    "granite": (dict(attention_multiplier=0.1), [2, 3], "sdpa"),
    "qwen3_moe": (dict(head_dim=16, num_experts=4, **MOE), [2, 3], "sdpa"),
    "mixtral": (dict(num_local_experts=4, num_experts_per_tok=2), [2, 3], "sdpa"),
}


def family_model(family: str, seed: int = 0, attn_implementation: str | None = None, **overrides):
    config_overrides, _, implementation = FAMILIES[family]
    config = AutoConfig.for_model(family, **{**COMMON, **config_overrides, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation or implementation)
    sharpen(model)
    return model.eval()


def sharpen(model) -> None:
    """Random init gives near-uniform attention; sharpen q/k so that attention patterns (and errors) are visible."""
    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            if hasattr(attn, "qkv_proj"):
                rows = (attn.config.num_attention_heads + attn.config.num_key_value_heads) * attn.head_dim
                attn.qkv_proj.weight[:rows].mul_(4.0)
            else:
                attn.q_proj.weight.mul_(4.0)
                attn.k_proj.weight.mul_(4.0)
            for name in ("q_norm", "k_norm"):
                norm = getattr(attn, name, None)
                if norm is not None:  # Gemma's norms scale by (1 + w), w = 0 at init
                    norm.weight.add_(1.0) if norm.weight.abs().max() < 1e-6 else norm.weight.mul_(2.0)


def adapter_then_merged(peft_model):
    """``peft_model`` itself, then, once the caller is done with it, its merged model (``merge_and_unload`` changes the
    model in place, so it must not run before the adapter's turn)."""
    yield peft_model
    yield peft_model.merge_and_unload()


def lisa_config(family: str, **kwargs) -> LiSAConfig:
    return LiSAConfig(share_layers=list(FAMILIES[family][1]), rank=4, **kwargs)


def direct_sharing_logits(model, share_layers: list[int], ids: torch.Tensor) -> torch.Tensor:
    """Logits of the base model with layer l's attention replaced by layer l-1's own eager attention probabilities,
    heads permuted by PERMUTATION and restricted (renormalised) to layer l's mask, applied to layer l's values."""
    module = sys.modules[type(model.model.layers[0].self_attn).__module__]
    eager = module.eager_attention_forward
    probs = {}

    def shared_eager(attn, query, key, value, attention_mask, **kwargs):
        out, weights = eager(attn, query, key, value, attention_mask, **kwargs)
        idx = attn.layer_idx
        if idx in share_layers:
            weights = probs[idx - 1][:, PERMUTATION]
            allowed = (attention_mask > torch.finfo(attention_mask.dtype).min / 2).to(weights.dtype)
            weights = weights * allowed
            weights = weights / weights.sum(-1, keepdim=True)
            values = value.repeat_interleave(query.shape[1] // value.shape[1], dim=1)
            out = torch.matmul(weights, values).transpose(1, 2).contiguous()
        probs[idx] = weights
        return out, weights

    module.eager_attention_forward = shared_eager
    try:
        with torch.no_grad():
            return model(ids).logits
    finally:
        module.eager_attention_forward = eager


@pytest.mark.parametrize("family", list(FAMILIES))
def test_untrained_adapter_is_direct_sharing_of_the_base_attention(family):
    model = family_model(family, attn_implementation="eager")
    share_layers = FAMILIES[family][1]
    ids = random_ids(2, 10)
    with torch.no_grad():
        base = model(ids).logits
    reference = direct_sharing_logits(model, share_layers, ids)
    assert (reference - base).abs().max() > 1e-3  # sharing changes the model: the comparison below can fail
    config = lisa_config(
        family,
        align_hidden=0,
        init_lowrank="zero",
        align_init_permutations={layer: PERMUTATION for layer in share_layers},
    )
    peft_model = get_peft_model(model, config).eval()
    with torch.no_grad():
        lisa = peft_model(ids).logits
    torch.testing.assert_close(lisa, reference, atol=1e-5, rtol=0)  # measured: <= 4e-7


def left_padded(length: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    ids = random_ids(2, length, seed=2)
    mask = torch.ones_like(ids)
    ids[1, :4], mask[1, :4] = 0, 0
    return ids, mask


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_end_to_end(family, tmp_path):
    model = family_model(family)
    ids = random_ids(2, 10)
    with torch.no_grad():
        base = model(ids).logits
    peft_model = get_peft_model(model, lisa_config(family))
    randomize_adapter(peft_model)
    peft_model.eval()
    with torch.no_grad():
        lisa = peft_model(ids).logits
        with peft_model.disable_adapter():
            assert torch.equal(peft_model(ids).logits, base)
    assert torch.isfinite(lisa).all() and (lisa - base).abs().max() > 1e-3

    # Cache == no cache, left padding, prompt longer than the sliding windows: prefill then three decode steps.
    prompt, mask = left_padded()
    steps = torch.tensor([[5, 9, 11], [7, 4, 13]])
    with torch.no_grad():
        cache = peft_model(input_ids=prompt, attention_mask=mask, use_cache=True).past_key_values
        for step in range(steps.shape[1]):
            full_ids = torch.cat([prompt, steps[:, : step + 1]], 1)
            full_mask = torch.cat([mask, torch.ones(2, step + 1, dtype=mask.dtype)], 1)
            out = peft_model(input_ids=steps[:, step : step + 1], attention_mask=full_mask, cache=cache)
            cache = out.past_key_values
            uncached = peft_model(input_ids=full_ids, attention_mask=full_mask, use_cache=False).logits[:, -1]
            torch.testing.assert_close(out.logits[:, -1], uncached, atol=1e-4, rtol=1e-4)

    # Save and load the adapter.
    peft_model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(family_model(family), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, lisa)

    # Merge: the shared layers have no q/k left and compute what the adapter does; save and reload.
    merged = peft_model.merge_and_unload()
    assert merged.config.model_type == f"lisa_{family}"
    for layer_idx in FAMILIES[family][1]:
        attn = merged.model.layers[layer_idx].self_attn
        assert isinstance(attn, LiSASharedAttention)
        names = {name for name, _ in attn.named_parameters()}
        assert not any(part in name for name in names for part in ("q_proj", "k_proj", "qkv_proj"))
    with torch.no_grad():
        merged_logits = merged(ids).logits
    torch.testing.assert_close(merged_logits, lisa, atol=1e-5, rtol=1e-5)
    merged.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert type(reloaded) is type(merged)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, merged_logits, atol=1e-6, rtol=1e-6)


@pytest.mark.usefixtures("shared_logits_route")
@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_prefill_continuing_the_cache_equals_an_uncached_forward(family):
    """A second chunk of several tokens through the dynamic cache (more keys than queries; a sliding layer keeps fewer
    keys than the full layer it shares from, and reads its source's logits of its own, last keys), then a decode step,
    give the logits of one uncached forward over the whole sequence, on every route of a shared layer's logits, for
    the adapter and the merged model (whose full layers decode through the kernel's rows on the kernel route)."""
    peft_model = get_peft_model(family_model(family), lisa_config(family))
    randomize_adapter(peft_model)
    peft_model.eval()
    ids = random_ids(2, 14, seed=3)
    with torch.no_grad():
        for model in adapter_then_merged(peft_model):
            first = model(input_ids=ids[:, :9], use_cache=True)
            second = model(input_ids=ids[:, 9:13], past_key_values=first.past_key_values, use_cache=True)
            step = model(input_ids=ids[:, 13:], past_key_values=second.past_key_values, use_cache=True)
            uncached = model(input_ids=ids, use_cache=False).logits
            torch.testing.assert_close(
                torch.cat([second.logits, step.logits], 1), uncached[:, 9:], atol=1e-4, rtol=1e-4
            )


# A first prefill past the sliding windows (4-6 tokens), a continued prefill, a decode step; or a first prefill within
# them, a decode step, continued prefills past them, one more decode step.
CHUNKS = {
    "long first": (slice(0, 9), slice(9, 13), slice(13, 14)),
    "short first": (slice(0, 3), slice(3, 4), slice(4, 9), slice(9, 13), slice(13, 14)),
}


@pytest.mark.usefixtures("shared_logits_route")
@pytest.mark.parametrize("chunks", list(CHUNKS))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_static_cache_equals_an_uncached_forward(family, chunks):
    """A static cache (``StaticCache``, what ``cache_implementation="static"`` and compiled decoding use): its first
    prefill hands the layers no mask although its keys run past the prompt (empty slots, which the base layers'
    top-left causal mask never reads; longer or shorter than the sliding windows, whose slots then run past it too),
    then decode steps and continued prefills come with masks over all its slots;
    a left-padded batch has masks at every step. Every step, the adapter and the merged model, gives the logits of one
    uncached forward, on every route of a shared layer's logits; the shared layers' slots hold rank-r keys (4 here),
    as their dynamic cache does."""
    peft_model = get_peft_model(family_model(family), lisa_config(family))
    randomize_adapter(peft_model)
    peft_model.eval()
    ids = random_ids(2, 14, seed=4)
    padding = torch.ones_like(ids)
    padding[1, :3] = 0  # a left-padded batch: every step comes with a mask
    with torch.no_grad():
        for model in adapter_then_merged(peft_model):
            for mask in (None, padding):
                masked = {} if mask is None else {"attention_mask": mask}
                uncached = model(input_ids=ids, use_cache=False, **masked).logits
                cache = StaticCache(config=model.config, max_cache_len=24)
                logits = []
                for chunk in CHUNKS[chunks]:
                    masked = {} if mask is None else {"attention_mask": mask[:, : chunk.stop]}
                    logits.append(model(input_ids=ids[:, chunk], cache=cache, use_cache=True, **masked).logits)
                real = slice(None) if mask is None else mask.bool()  # the padded positions' logits are not compared
                torch.testing.assert_close(torch.cat(logits, 1)[real], uncached[real], atol=1e-4, rtol=1e-4)
            assert [cache.layers[i].keys.shape[-1] for i in FAMILIES[family][1]] == [4] * len(FAMILIES[family][1])


@pytest.mark.usefixtures("shared_logits_route")
@pytest.mark.parametrize("window", [4, 32])
@pytest.mark.parametrize("chunks", list(CHUNKS))
def test_a_static_cache_through_a_full_link_into_a_sliding_one(window, chunks):
    """Qwen2 with layers full, full, full, sliding, sliding and layers 2-3 shared: a full shared layer between a full
    source and a sliding-window reader, the window within the cache's 24 slots (4) or beyond them (32: the reader's
    slots never fill). On a static cache all three must read their keys by position (the reader's last keys are the
    source's and the middle link's last held ones, not their last slots): every chunk gives the logits of one
    uncached forward."""
    model = family_model("qwen2", max_window_layers=3, sliding_window=window)
    assert model.config.layer_types[1:4] == ["full_attention", "full_attention", "sliding_attention"]
    peft_model = get_peft_model(model, LiSAConfig(share_layers=[2, 3], rank=4))
    randomize_adapter(peft_model)
    ids = random_ids(2, 14, seed=5)
    with torch.no_grad():
        for model in (peft_model.eval(), peft_model.merge_and_unload()):
            uncached = model(input_ids=ids, use_cache=False).logits
            cache = StaticCache(config=model.config, max_cache_len=24)
            logits = [model(input_ids=ids[:, chunk], cache=cache, use_cache=True).logits for chunk in CHUNKS[chunks]]
            torch.testing.assert_close(torch.cat(logits, 1), uncached, atol=1e-4, rtol=1e-4)


def test_static_slots_are_cut_only_where_a_shared_layer_needs_it():
    """:func:`keys_held` on real static caches of 24 slots: a layer given a mask returns the cache's own tensors,
    uncut, full and sliding-window layers alike, filled or not (a cut view would be copied by every product of a
    decode step); without a mask, several queries (the first prefill, into an empty cache) get the slots of the
    tokens held, and one query gets every slot, as the base layer attends to them."""
    sliding = family_model("qwen2")
    assert sliding.config.layer_types[1:3] == ["full_attention", "sliding_attention"]
    for model in (family_model("llama"), sliding):
        for tokens in (3, 9):  # within and past the sliding window (4)
            cache = StaticCache(config=model.config, max_cache_len=24)
            with torch.no_grad():
                model(input_ids=random_ids(2, tokens), cache=cache, use_cache=True)
            for layer in cache.layers[1:3]:
                slots = layer.keys.shape[-2]
                mask = torch.ones(2, 1, 1, slots, dtype=torch.bool)
                for q_len in (1, tokens):
                    key, value, held_mask = keys_held(layer.keys, layer.values, mask, q_len)
                    assert key is layer.keys and value is layer.values and held_mask is mask
                key, value, held_mask = keys_held(layer.keys, layer.values, None, tokens)
                assert torch.equal(key, layer.keys[:, :, : min(tokens, slots)]) and held_mask is None
                assert torch.equal(value, layer.values[:, :, : min(tokens, slots)])
                key, value, held_mask = keys_held(layer.keys, layer.values, None, 1)
                assert key is layer.keys and value is layer.values and held_mask is None


@pytest.mark.parametrize("family", ["phi3", "qwen3_moe"])
def test_merged_family_model_loads_in_a_fresh_process(family, tmp_path):
    """A merged Phi-3 (fused qkv, partial rotary) and a merged Qwen3-MoE (expert weights that transformers converts on
    load) reload with AutoModelForCausalLM after ``import peft_lisa`` alone: same class, same weights bit for bit,
    same logits."""
    peft_model = get_peft_model(family_model(family), lisa_config(family))
    randomize_adapter(peft_model)
    merged = peft_model.eval().merge_and_unload()
    ids = random_ids(2, 10)
    with torch.no_grad():
        torch.save(merged(ids).logits, tmp_path / "expected.pt")
    torch.save(ids, tmp_path / "ids.pt")
    torch.save(merged.state_dict(), tmp_path / "state.pt")
    merged.save_pretrained(tmp_path / "merged")
    done = run_python(
        f"""
import torch
import peft_lisa
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "merged")!r}).eval()
state, expected = model.state_dict(), torch.load({str(tmp_path / "state.pt")!r})
assert state.keys() == expected.keys(), sorted(set(state) ^ set(expected))[:4]
assert all(torch.equal(state[name], value) for name, value in expected.items())
ids = torch.load({str(tmp_path / "ids.pt")!r})
with torch.no_grad():
    logits = model(ids).logits
torch.testing.assert_close(logits, torch.load({str(tmp_path / "expected.pt")!r}), atol=1e-5, rtol=1e-5)
print(type(model).__name__)
""",
        tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == type(merged).__name__


def test_sliding_layer_may_share_from_full_but_not_the_reverse():
    model = family_model("gemma2")  # sliding, full, sliding, full, sliding
    with pytest.raises(ValueError, match=r"layer 3 uses full attention.*sliding layer may share from a full one"):
        get_peft_model(model, LiSAConfig(share_layers=[3], rank=4))
    assert not hasattr(model, "peft_config")
    peft_model = get_peft_model(model, LiSAConfig(share_layers=[2], rank=4))  # sliding from full: fine
    with torch.no_grad():
        assert torch.isfinite(peft_model(random_ids(1, 12)).logits).all()


def test_multi_head_latent_attention_is_refused_with_the_reason():
    config = AutoConfig.for_model(
        "deepseek_v3",
        **{**COMMON, "num_key_value_heads": 4, "num_hidden_layers": 3},
        q_lora_rank=16,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=16,
        n_routed_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        first_k_dense_replace=1,
        n_group=1,
        topk_group=1,
    )
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(UnsupportedModelError, match="multi-head latent attention.*no per-head q/k projections"):
        get_peft_model(model, LiSAConfig(share_layers=[2], rank=4))


def test_attention_sinks_are_refused_with_the_reason():
    config = AutoConfig.for_model(
        "gpt_oss", **{**COMMON, "head_dim": 16, "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 4}
    )
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(UnsupportedModelError, match="attention sinks"):
        get_peft_model(model, LiSAConfig(share_layers=[2], rank=4))


# Families that share the layout and need no code of their own: a light check (adapter, cache, merge).
OTHER_FAMILIES = {
    "cohere2": (dict(sliding_window=4), [1, 2]),  # interleaved rotary, rotary only on sliding layers
    "olmo3": (dict(sliding_window=4), [1, 2]),
    "ministral": (dict(head_dim=16, sliding_window=4), [2, 3]),
    "starcoder2": (dict(), [2, 3]),
    "stablelm": (dict(), [2, 3]),  # partial rotary (25%)
    "smollm3": (dict(), [2, 3]),  # no-rope layers
    "glm4": (dict(head_dim=16), [2, 3]),  # interleaved partial rotary
}


@pytest.mark.parametrize("family", list(OTHER_FAMILIES))
def test_other_families_with_the_layout_work(family):
    overrides, share_layers = OTHER_FAMILIES[family]
    config = AutoConfig.for_model(family, **{**COMMON, "num_hidden_layers": 4, **overrides})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    peft_model = get_peft_model(model, LiSAConfig(share_layers=share_layers, rank=4))
    randomize_adapter(peft_model)
    peft_model.eval()
    prompt, mask = left_padded()
    kwargs = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        lisa = peft_model(input_ids=prompt, attention_mask=mask).logits
        assert torch.equal(
            peft_model.generate(input_ids=prompt, use_cache=True, **kwargs),
            peft_model.generate(input_ids=prompt, use_cache=False, **kwargs),
        )
        merged = peft_model.merge_and_unload()
        torch.testing.assert_close(merged(input_ids=prompt, attention_mask=mask).logits, lisa, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "family, expected",
    [
        ("phi3", 64 * (64 + 32)),  # the q/k rows of the fused qkv_proj
        ("olmo2", 64 * (64 + 32) + 64 + 32),  # q/k projections + full-width q/k norms
        ("qwen2", 64 * (64 + 32) + 64 + 32),  # q/k projections + their biases
        ("qwen3", 64 * (96 + 48) + 24 + 24),  # explicit head size 24, per-head norms
    ],
)
def test_compression_counts_qk_params_by_structure(family, expected):
    from peft_lisa import qk_compression_report

    peft_model = get_peft_model(family_model(family), lisa_config(family))
    report = qk_compression_report(peft_model)
    assert [row.qk_params_original for row in report.layers] == [expected, expected]
    merged_report = qk_compression_report(peft_model.merge_and_unload())
    assert merged_report.to_dict() == report.to_dict()


def test_layer_logits_are_the_kernel_logits_softcap_included():
    """``layer_logits`` (for analysis and distillation) gives the probabilities Gemma 2's own eager kernel computes."""
    from peft_lisa.tuner.functional import layer_logits

    model = family_model("gemma2", attn_implementation="eager")
    captured = {}

    def hook(module, args, kwargs):
        captured["input"] = (kwargs["hidden_states"], kwargs["position_embeddings"], kwargs["attention_mask"])

    attn = model.model.layers[1].self_attn
    handle = attn.register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad():
        out = model(random_ids(2, 10), output_attentions=True)
    handle.remove()
    hidden, position_embeddings, mask = captured["input"]
    probs = torch.softmax(layer_logits(attn, hidden, position_embeddings) + mask, dim=-1)
    torch.testing.assert_close(probs, out.attentions[1], atol=1e-6, rtol=0)


def eager_attention_probabilities(model, ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """Every layer's attention probabilities as the family's own eager kernel computes them (softcap included)."""
    module = sys.modules[type(model.model.layers[0].self_attn).__module__]
    eager = module.eager_attention_forward
    probs = {}

    def recording_eager(attn, *args, **kwargs):
        out, weights = eager(attn, *args, **kwargs)
        probs[attn.layer_idx] = weights
        return out, weights

    module.eager_attention_forward = recording_eager
    try:
        with torch.no_grad():
            model(ids)
    finally:
        module.eager_attention_forward = eager
    return probs


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text", "phi3", "olmo2", "granite"])
def test_analysis_and_distillation_see_the_family_attention(family):
    """The attention the calibration analysis measures and the teacher of attention distillation are the family's own
    (its scaling, softcap, norms, partial rotary), compared with its eager kernel's probabilities."""
    from peft_lisa.analysis.measure import _attention_row_hooks
    from peft_lisa.training import AttentionDistiller, teacher_attention_logits

    model = family_model(family, attn_implementation="eager")
    ids = random_ids(2, 10)
    expected = eager_attention_probabilities(model, ids)
    rows = torch.arange(10)
    store: dict[int, torch.Tensor] = {}
    with _attention_row_hooks(model, rows, store), torch.no_grad():
        model(ids)
    for layer_idx, probs in expected.items():
        torch.testing.assert_close(store[layer_idx], probs.float(), atol=1e-5, rtol=1e-5)

    peft_model = get_peft_model(model, lisa_config(family)).eval()
    distiller = AttentionDistiller(peft_model)
    with distiller.collect(), torch.no_grad():
        peft_model(ids)
    # The first shared layer gets the base model's hidden states (later ones get those LiSA changed).
    layer_idx = min(distiller.calls)
    wrapper = peft_model.base_model.model.model.layers[layer_idx].self_attn
    teacher = teacher_attention_logits(wrapper, distiller.calls[layer_idx])
    mask = expected[layer_idx] > 0
    teacher_probs = torch.softmax(teacher.masked_fill(~mask, float("-inf")), dim=-1)
    torch.testing.assert_close(teacher_probs, expected[layer_idx].float(), atol=1e-5, rtol=1e-5)
