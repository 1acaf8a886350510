"""A merged model under ``torch.compile``: whole graphs (``fullgraph=True``, no break at a LiSA layer) for a prefill
into a static cache and its decode steps, on every inference route of a shared layer, with the eager model's logits;
the CPU kernel's entry points as torch operators (``peft_lisa::shared_attention``, ``peft_lisa::decode_rows``) inside
the graph; and ``generate``'s own compiled decoding (``CompileConfig``) with the inductor backend, token for token."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from torch._dynamo.utils import counters
from transformers import CompileConfig, StaticCache

from peft_lisa.tuner import cpu_kernel
from peft_lisa.tuner.architectures import decoder_layers
from tests.conftest import random_ids, randomize_adapter, require_cpu_kernel
from tests.test_families import family_model, lisa_config

# A prompt within HANDED_LOGITS_MAX_KEYS (logits handed on whole, decode rows on CPU) and one beyond it (the kernel's
# tiles, or torch's blocks with the kernel off).
PROMPTS = {"short": 40, "long": 120}
DECODE_STEPS = 3


def merged_model(family: str = "llama") -> torch.nn.Module:
    """A tiny model of ``family`` with a chain of two shared layers (source 1, links 2 and 3), its adapter randomized,
    merged."""
    peft_model = get_peft_model(family_model(family), lisa_config(family))
    randomize_adapter(peft_model)
    return peft_model.eval().merge_and_unload()


def prefill_then_decode(model, forward, ids: torch.Tensor) -> list[torch.Tensor]:
    """The logits of ``forward`` on a prefill of ``ids`` into a static cache, then of DECODE_STEPS greedy steps."""
    cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + DECODE_STEPS + 1)
    out = forward(input_ids=ids, cache=cache, use_cache=True)
    logits = [out.logits]
    for _ in range(DECODE_STEPS):
        out = forward(input_ids=out.logits[:, -1:].argmax(-1), cache=out.cache, use_cache=True)
        logits.append(out.logits)
    return logits


# Llama; Mistral, whose layers all have a sliding window (6 tokens); Qwen2, whose layer 2 slides (4 tokens) and shares
# from the full layer 1.
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("prompt", list(PROMPTS))
@pytest.mark.parametrize("route", ["kernel", "off"])
def test_merged_model_compiles_whole_and_matches_eager(family, prompt, route, monkeypatch):
    """``torch.compile(fullgraph=True)`` traces the merged model's prefill into a static cache and its decode steps
    without a graph break (a break raises) and without recompiling from step to step (two graphs: the prefill's and
    the decode steps'), on the CPU kernel's routes and on torch's (kernel off), sliding windows included, and gives the
    eager model's logits; on the kernel route the graph calls the kernel's operators."""
    if route == "kernel":
        require_cpu_kernel(monkeypatch)
    else:
        monkeypatch.setenv(cpu_kernel.SETTING_VARIABLE, "off")
    merged = merged_model(family)
    ids = random_ids(2, PROMPTS[prompt])
    calls = []
    if route == "kernel":  # count the operators' calls, which reach the extension through _required_kernel
        built = cpu_kernel.load_cpu_kernel()

        class Counting:
            def __getattr__(self, name):
                if name in ("decode_rows", "shared_attention"):  # the entry points, not the build's facts
                    calls.append(name)
                return getattr(built, name)

        monkeypatch.setattr(cpu_kernel, "_required_kernel", Counting)
    torch._dynamo.reset()
    compiled = torch.compile(merged, backend="eager", fullgraph=True)
    with torch.inference_mode():
        expected = prefill_then_decode(merged, merged, ids)
        calls.clear()
        counters.clear()
        got = prefill_then_decode(merged, compiled, ids)
    assert counters["stats"]["unique_graphs"] == 2
    for want, have in zip(expected, got, strict=True):
        torch.testing.assert_close(have, want, atol=1e-5, rtol=1e-5)
    if route == "kernel":
        prefill = ["decode_rows"] if prompt == "short" else ["shared_attention"] * 2
        # a short prompt: layer 3 takes layer 2's logits as rows; each decode step: every layer as rows (the full
        # layers too, as LiSAFullAttention)
        assert calls == prefill + ["decode_rows"] * len(decoder_layers(merged)) * DECODE_STEPS
    else:
        assert calls == []


@pytest.mark.parametrize("prompt", list(PROMPTS))
def test_bf16_merged_model_compiles_whole_and_matches_eager(prompt, monkeypatch):
    """In bf16 the kernel's route facts read at compile time include whether it packs bf16 products (AMX): the
    compiled graph, whole, gives the eager bf16 model's logits."""
    require_cpu_kernel(monkeypatch)
    merged = merged_model().to(torch.bfloat16)
    ids = random_ids(2, PROMPTS[prompt])
    torch._dynamo.reset()
    compiled = torch.compile(merged, backend="eager", fullgraph=True)
    with torch.inference_mode():
        expected = prefill_then_decode(merged, merged, ids)
        counters.clear()
        got = prefill_then_decode(merged, compiled, ids)
    assert counters["stats"]["unique_graphs"] == 2
    for want, have in zip(expected, got, strict=True):
        torch.testing.assert_close(have, want, atol=1e-2, rtol=1e-2)


def test_generate_compiles_its_decoding_with_inductor(monkeypatch):
    """``generate`` with a static cache and a ``CompileConfig`` compiles the merged model's decode steps with the
    inductor backend, in one graph, through the CPU kernel's operators: eager decoding's logits, step by step."""
    require_cpu_kernel(monkeypatch)
    merged = merged_model()
    ids = random_ids(2, PROMPTS["short"])
    torch._dynamo.reset()
    counters.clear()
    generation = dict(max_new_tokens=6, do_sample=False, cache_implementation="static", output_logits=True)
    with torch.inference_mode():
        eager = merged.generate(ids, return_dict_in_generate=True, **generation)
        assert counters["stats"]["unique_graphs"] == 0
        config = CompileConfig(fullgraph=True, mode="default", dynamic=False)
        config._compile_all_devices = True  # transformers compiles on accelerators only unless asked
        compiled = merged.generate(ids, return_dict_in_generate=True, compile_config=config, **generation)
    assert counters["stats"]["unique_graphs"] == 1  # the decode steps' graph (the prefill runs eagerly)
    for want, have in zip(eager.logits, compiled.logits, strict=True):
        torch.testing.assert_close(have, want, atol=1e-4, rtol=1e-4)


def test_kernel_operators_need_the_built_kernel(monkeypatch):
    """Calling an operator where the kernel is off names the problem instead of crashing in the extension."""
    monkeypatch.setenv(cpu_kernel.SETTING_VARIABLE, "off")
    value = torch.zeros(1, 1, 4, 8)
    with pytest.raises(cpu_kernel.CPUKernelUnavailable, match="not built"):
        torch.ops.peft_lisa.decode_rows(None, None, torch.zeros(1, 1, 1, 8), value, value, None, 0.0, False)


def test_kernel_operators_pass_torch_opcheck(monkeypatch):
    """``torch.library.opcheck`` on both operators (schema, fake shapes and dtypes against the real outputs, no
    autograd registration needed): a decode step with handed logits in bf16 values, and a shared layer's tiles with a
    mixed part and a term."""
    require_cpu_kernel(monkeypatch)
    generator = torch.Generator().manual_seed(0)
    batch, heads, kv_heads, keys, rank = 2, 4, 2, 20, 8
    value = torch.randn(batch, kv_heads, keys, 16, generator=generator).bfloat16()
    rows = (
        torch.randn(batch, heads, 1, keys, generator=generator),  # handed logits, float32
        torch.randn(heads, heads, generator=generator),  # mixing
        torch.randn(batch, heads, 1, rank, generator=generator),  # rank-r query, scaled
        torch.randn(batch, kv_heads, keys, rank, generator=generator),  # rank-r keys
        value,
        None,
    )
    for want_logits in (True, False):
        torch.library.opcheck(torch.ops.peft_lisa.decode_rows, (*rows, 0.0, want_logits))
    value = value.float()
    tiles = (
        [torch.randn(batch, heads, keys, 16, generator=generator)],  # the source's queries
        [torch.randn(batch, kv_heads, keys, 16, generator=generator)],  # and keys
        [torch.randn(heads, heads, generator=generator)],
        [torch.randn(batch, heads, keys, rank, generator=generator)],  # a term: queries, keys
        [torch.randn(batch, kv_heads, keys, rank, generator=generator)],
        value,
        None,
        cpu_kernel.BLOCK_QUERIES,
        cpu_kernel.BLOCK_KEYS,
        False,
    )
    torch.library.opcheck(torch.ops.peft_lisa.shared_attention, tiles)
