"""merge_and_unload(): a compact model equal to the adapter, without q_proj/k_proj in shared layers, that reloads."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM

from peft_lisa import LiSAConfig, LiSAFullAttention, LiSASharedAttention, merged_layers, qk_compression_report

from .conftest import left_padded_batch, random_ids, randomize_adapter, run_python, tiny_model
from .test_reference import assert_cached_generation_equals_uncached

SHARE = [2, 3]


def trained_lisa(model_type: str = "llama"):
    # align_hidden=None: the widest alignment (FFN of 4H), so merging covers every LiSA parameter.
    peft_model = get_peft_model(tiny_model(model_type), LiSAConfig(share_layers=SHARE, rank=4, align_hidden=None))
    randomize_adapter(peft_model)
    return peft_model.eval()


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_merged_equals_adapter_and_drops_qk(model_type):
    peft_model = trained_lisa(model_type)
    ids = random_ids()
    base_params = sum(p.numel() for n, p in peft_model.named_parameters() if ".lisa_" not in n)
    report = qk_compression_report(peft_model)
    with torch.no_grad():
        expected = peft_model(ids).logits
    merged = peft_model.merge_and_unload()
    assert type(merged).__name__ == f"LiSA{type(tiny_model(model_type)).__name__}"
    assert merged.config.model_type == f"lisa_{model_type}"
    for idx in SHARE:
        attn = merged.model.layers[idx].self_attn
        assert isinstance(attn, LiSASharedAttention)
        assert not hasattr(attn, "q_proj") and not hasattr(attn, "k_proj")
    assert merged_layers(merged) == {1: "source", 2: "shared", 3: "shared"}
    full_layers = [layer.self_attn for idx, layer in enumerate(merged.model.layers) if idx not in (1, 2, 3)]
    assert full_layers and all(type(attn) is LiSAFullAttention for attn in full_layers)
    merged_params = sum(p.numel() for p in merged.parameters())
    assert merged_params == base_params - report.qk_params_original + report.qk_params_lisa
    with torch.no_grad():
        # Same functions, same weights: equal up to float32 summation order (tolerance 1e-5).
        torch.testing.assert_close(merged(ids).logits, expected, atol=1e-5, rtol=1e-5)
    assert qk_compression_report(merged).to_dict() == report.to_dict()


def test_compression_report_numbers():
    report = qk_compression_report(trained_lisa("llama"))
    hidden, heads, kv_heads, head_dim, rank, m = 64, 4, 2, 16, 4, 16
    original = hidden * (heads + kv_heads) * head_dim
    lisa = hidden * (heads + kv_heads) * rank + heads * heads + heads + heads * m + m + m * heads
    assert [row.layer for row in report.layers] == SHARE
    assert report.layers[0].qk_params_original == original and report.layers[0].qk_params_lisa == lisa
    assert report.ratio == pytest.approx(original / lisa)
    assert report.layers[0].key_cache_dims_lisa * 4 == report.layers[0].key_cache_dims_original
    assert "| **shared layers** |" in report.to_markdown()


def test_merged_model_saves_and_reloads_in_fresh_process(tmp_path):
    merged = trained_lisa("llama").merge_and_unload()
    ids, mask = left_padded_batch()
    with torch.no_grad():
        logits = merged(input_ids=ids, attention_mask=mask).logits
        tokens = merged.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    merged.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert type(reloaded) is type(merged)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids, attention_mask=mask).logits, logits)
    torch.save({"ids": ids, "mask": mask, "logits": logits, "tokens": tokens}, tmp_path / "expected.pt")
    result = run_python(
        f"""
import torch, peft_lisa
from transformers import AutoModelForCausalLM
e = torch.load({str(tmp_path / "expected.pt")!r})
model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "merged")!r}).eval()
assert not hasattr(model.model.layers[2].self_attn, "q_proj")
assert type(model.model.layers[0].self_attn).__name__ == "LiSAFullAttention"
with torch.no_grad():
    assert torch.equal(model(input_ids=e["ids"], attention_mask=e["mask"]).logits, e["logits"])
    out = model.generate(
        input_ids=e["ids"], attention_mask=e["mask"], max_new_tokens=8, do_sample=False, pad_token_id=0
    )
    assert torch.equal(out, e["tokens"]), (out, e["tokens"])
print("FRESH-OK")
""",
        tmp_path,
    )
    assert "FRESH-OK" in result.stdout, result.stderr


def test_merged_model_saved_without_full_layer_layouts_keeps_the_base_attention(tmp_path):
    """A merged model saved before full layers' layouts were saved (config.json's ``lisa.attention_layouts`` holds
    the LiSA layers' only) reloads with the base's own attention modules on its other full layers, which compute the
    same: its logits and generated tokens are those of the model as merged now."""
    merged = trained_lisa("llama").merge_and_unload()
    ids, mask = left_padded_batch()
    merged.config.lisa["attention_layouts"] = {
        idx: layout for idx, layout in merged.config.lisa["attention_layouts"].items() if int(idx) in (1, 2, 3)
    }
    merged.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert type(reloaded.model.layers[0].self_attn) is type(tiny_model("llama").model.layers[0].self_attn)
    assert isinstance(merged.model.layers[0].self_attn, LiSAFullAttention)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(input_ids=ids, attention_mask=mask).logits,
            merged(input_ids=ids, attention_mask=mask).logits,
            atol=1e-5,
            rtol=1e-5,
        )
        assert torch.equal(reloaded.generate(**kwargs), merged.generate(**kwargs))


def test_merged_layers_keep_the_mode_of_the_layers_they_replace():
    """A model merged in eval mode is in eval mode throughout, its new modules too: with attention dropout in the
    config, its forwards are deterministic and equal the adapter model's."""
    model = tiny_model("llama", attention_dropout=0.5)
    peft_model = get_peft_model(model, LiSAConfig(share_layers=SHARE, rank=4)).eval()
    randomize_adapter(peft_model)
    ids = random_ids()
    with torch.no_grad():
        expected = peft_model(ids).logits
        merged = peft_model.merge_and_unload()
        assert not [name for name, module in merged.named_modules() if module.training]
        torch.testing.assert_close(merged(ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_merged_generation_cache_equals_no_cache():
    """Same tokens and, step by step, the same logits (atol 1e-4) with and without the cache."""
    merged = trained_lisa("qwen2").merge_and_unload()
    assert_cached_generation_equals_uncached(merged, *left_padded_batch(), new=8)


@pytest.mark.parametrize("align_hidden", [0, None])
def test_static_cache_generation_equals_the_dynamic_cache(align_hidden):
    """``generate(cache_implementation="static")``, adapter and merged model, linear and FFN alignment, on a batch
    without padding (whose first prefill gets no mask) and a left-padded one: the tokens the default (dynamic) cache
    gives."""
    peft_model = get_peft_model(tiny_model("llama"), LiSAConfig(share_layers=SHARE, rank=4, align_hidden=align_hidden))
    randomize_adapter(peft_model)
    ids, mask = left_padded_batch()
    batches = [dict(input_ids=random_ids(2, 9)), dict(input_ids=ids, attention_mask=mask)]
    with torch.no_grad():
        for model in (peft_model.eval(), peft_model.merge_and_unload()):
            for batch in batches:
                kwargs = dict(batch, max_new_tokens=10, do_sample=False, pad_token_id=0)
                dynamic = model.generate(**kwargs)
                assert torch.equal(model.generate(cache_implementation="static", **kwargs), dynamic)


def test_merged_model_without_import_fails_naming_model_type(tmp_path):
    trained_lisa("llama").merge_and_unload().save_pretrained(tmp_path / "merged")
    result = run_python(
        "from transformers import AutoModelForCausalLM\n"
        f"AutoModelForCausalLM.from_pretrained({str(tmp_path / 'merged')!r})",
        tmp_path,
    )
    assert result.returncode != 0 and "lisa_llama" in result.stderr


def test_merge_refuses_two_adapters_and_keeps_model():
    peft_model = trained_lisa("llama")
    peft_model.add_adapter("other", LiSAConfig(share_layers=[4], rank=2))
    with pytest.raises(ValueError, match="exactly one LiSA adapter"):
        peft_model.base_model.merge_and_unload(adapter_names=["default", "other"])
    with torch.no_grad():
        assert torch.isfinite(peft_model(random_ids()).logits).all()


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])  # qwen2: a value projection with a bias
def test_fused_generation_projection_follows_the_weights(model_type):
    """Without autograd a merged shared layer projects its rank-r queries and keys with one fused ``[Wq_r; Wk_r]``
    product; it must equal the separate projections (run with autograd) and follow weights changed in place after it
    was first built."""
    merged = trained_lisa(model_type).merge_and_unload()
    ids = random_ids()
    for idx in SHARE:
        bias = merged.model.layers[idx].self_attn.v_proj.bias
        assert (bias is not None) == (model_type == "qwen2")
        if bias is not None:  # the model initialises it at zero
            torch.nn.init.normal_(bias, std=0.5)

    def fused_and_separate():
        with torch.no_grad():
            fused = merged(ids).logits
        with torch.enable_grad():
            separate = merged(ids).logits.detach()
        return fused, separate

    fused, separate = fused_and_separate()
    torch.testing.assert_close(fused, separate, atol=1e-5, rtol=1e-5)
    attn = merged.model.layers[SHARE[0]].self_attn
    with torch.no_grad():
        attn.v_proj.weight.mul_(-2.0)
        attn.k_lowrank.weight.add_(0.5)
        attn.q_lowrank.weight.mul_(3.0)
    changed, separate = fused_and_separate()
    assert (changed - fused).abs().max() > 1e-2  # the change matters...
    torch.testing.assert_close(changed, separate, atol=1e-5, rtol=1e-5)  # ...and the fused product follows it
    copy = attn._fused[1]  # what the layer holds beyond its parameters, counted by the benchmark's weight bytes
    assert attn.fused_copy_bytes() == copy.numel() * copy.element_size() > 0
