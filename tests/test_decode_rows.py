"""The CPU kernel's decode rows (``csrc/decode_rows.h``, :func:`peft_lisa.tuner.cpu_kernel.decode_rows`) against
``softmax(S + M) V`` computed densely in float32 from the same tensors, and the layers that take them on decode steps.

Whole models decoding through them are checked against the independent reference (the base model, an uncached
forward) by the family and cache tests, whose ``handed`` and ``kernel`` routes build and use the kernel."""

from __future__ import annotations

import copy
from typing import Optional

import pytest
import torch
from peft import get_peft_model

from peft_lisa import LiSAConfig, LiSAFullAttention
from peft_lisa.benchmark import base_on_decode_rows
from peft_lisa.tuner import cpu_kernel
from peft_lisa.tuner.architectures import decoder_layers
from peft_lisa.tuner.functional import additive_mask, causal_allowed, grouped_attend
from tests.conftest import record_decode_rows, require_cpu_kernel


def rand(generator: torch.Generator, *shape: int) -> torch.Tensor:
    """Standard normal values of ``shape`` from ``generator``."""
    return torch.randn(*shape, generator=generator)


def dense_rows(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    allowed: torch.Tensor,
    handed: Optional[torch.Tensor],
    mix: Optional[torch.Tensor],
    softcap: Optional[float],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B x T_q x (H d_v), S before the mask) in float32, each key head repeated for its query heads."""
    heads = query.shape[1]
    logits = query.float() @ key.float().repeat_interleave(heads // key.shape[1], 1).transpose(-1, -2)
    if handed is not None:
        logits = logits + torch.einsum("hg,bgqt->bhqt", mix, handed)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    q_len, k_len = logits.shape[-2:]
    probs = torch.softmax(logits + additive_mask(allowed, q_len, k_len, None), dim=-1)
    return grouped_attend(probs, value.float()), logits


@pytest.fixture(autouse=True)
def two_threads():
    """Two torch threads for each test here (the split test sets its own): the shapes below choose between a task per
    KV group and a task per query head (at least twice as many groups as threads: by group) for two threads, so that
    every route of the kernel's tasks runs whatever the machine's thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


# batch, heads, kv_heads, width (the term's: a rank-r one below a vector, a source's q k^T above), value size, keys.
# For every build's vectors (16, 8 or 4 float32 lanes) some width is below a vector (keys transposed), some leaves a
# scalar tail, and the value sizes leave partial vectors.
SHAPES = {
    "rank-term": (2, 4, 2, 3, 38, 37),  # below a vector on every build; a value size of partial vectors
    "one-task-per-head": (1, 6, 2, 6, 42, 50),  # fewer groups than twice the threads: a task per query head
    "source-wide": (4, 4, 2, 64, 84, 70),  # a value size beyond one chunk (4 vectors) and not a multiple of it
    "mha-head-128": (2, 3, 3, 20, 128, 19),  # a width with a scalar tail on 16 and 8 lanes
    "rank-8": (2, 4, 2, 8, 38, 45),  # keys packed two to a vector on 16 lanes, a vector each on 8, two on 4
    "group-of-six": (2, 12, 2, 16, 64, 40),  # six query heads a KV head: their handed rows mixed four, then two
}


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("q_len", [1, 3])
@pytest.mark.parametrize("mask_kind", ["causal", "bool", "float-shared"])
@pytest.mark.parametrize("handed_on", [True, False], ids=["handed", "source"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_rows_equal_dense_attention(kernel, shape, q_len, mask_kind, handed_on, dtype):
    """Every route through the kernel's decode rows (handed logits mixed or none, a narrow or a wide term, GQA and
    MHA, tasks per head group or per head) equals dense attention of the same tensors, and hands on S before the
    mask. The cache is read as it lies: keys and values are views of a longer cache, the handed logits the last
    T_k keys of longer rows."""
    batch, heads, kv_heads, width, value_dim, k_len = shape
    generator = torch.Generator().manual_seed(sum(shape) + q_len)
    query = rand(generator, batch, heads, q_len, width) * width**-0.5
    key = rand(generator, batch, kv_heads, k_len + 5, width).to(dtype)[:, :, :k_len]
    value = rand(generator, batch, kv_heads, k_len + 5, value_dim).to(dtype)[:, :, :k_len]
    handed = (rand(generator, batch, heads, q_len, k_len + 3) * 3)[..., 3:] if handed_on else None
    mix = rand(generator, heads, heads) if handed_on else None
    allowed = causal_allowed(slice(None), q_len, k_len, None).expand(batch, q_len, k_len)
    mask = None
    if mask_kind == "bool":  # padding on the left of some sequences, as a batch of prompts has
        allowed = allowed & (torch.arange(k_len) >= torch.arange(batch)[:, None, None] * 3)
        mask = allowed
    elif mask_kind == "float-shared":
        allowed = allowed[:1]
        mask = additive_mask(allowed, q_len, k_len, None)
    output, logits = cpu_kernel.decode_rows(kernel, query, key, value, mask, handed=handed, mix=mix)
    expected, expected_logits = dense_rows(query, key, value, allowed[:, None], handed, mix, None)
    assert output.dtype == dtype and output.shape == (batch, q_len, heads * value_dim)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: the output rounded to it
    torch.testing.assert_close(output.float(), expected, atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(logits, expected_logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("width", [1, 2, 4, 8, 12, 16, 24, 128])
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "strided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_rows_read_keys_of_every_width_packed_or_strided(kernel, width, packed, dtype):
    """The term q k^T for each way the kernel reads a tile of keys: several keys a vector (a width that divides the
    vector, the keys packed), one vector or more a key (a multiple of it), transposed (a narrower width, or keys that
    lie apart), one key at a time (other widths, and the keys past the last whole tile)."""
    generator = torch.Generator().manual_seed(width)
    batch, heads, kv_heads, k_len = 2, 4, 2, 53
    query = rand(generator, batch, heads, 1, width) * width**-0.5
    cache = rand(generator, batch, kv_heads, k_len, width if packed else width + 3).to(dtype)
    key, value = cache[..., :width], rand(generator, batch, kv_heads, k_len, 16).to(dtype)
    handed, mix = rand(generator, batch, heads, 1, k_len), rand(generator, heads, heads)
    output, logits = cpu_kernel.decode_rows(kernel, query, key, value, None, handed=handed, mix=mix)
    allowed = causal_allowed(slice(None), 1, k_len, None)
    expected, expected_logits = dense_rows(query, key, value, allowed, handed, mix, None)
    torch.testing.assert_close(logits, expected_logits, atol=1e-5, rtol=1e-5)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: the output rounded to it
    torch.testing.assert_close(output.float(), expected, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("width", [3, 4, 8, 16, 24, 128])
def test_a_key_logit_is_the_same_whatever_the_layout_or_the_number_of_keys(kernel, width):
    """A key's logit comes out bit for bit the same whether the cached keys lie packed or strided, and whether the key
    falls in a whole tile of keys or in the last, partial one: an uncached forward (keys strided in the projection's
    output) and a cached one, or decode steps at different lengths, compute every logit the same way."""
    generator = torch.Generator().manual_seed(width + 1)
    query = rand(generator, 2, 4, 1, width) * width**-0.5
    strided = rand(generator, 2, 2, 40, width + 3).to(torch.bfloat16)[..., :width]
    packed, value = strided.contiguous(), rand(generator, 2, 2, 40, 16).to(torch.bfloat16)
    _, by_packed = cpu_kernel.decode_rows(kernel, query, packed, value, None)
    _, by_strided = cpu_kernel.decode_rows(kernel, query, strided, value, None)
    _, fewer = cpu_kernel.decode_rows(kernel, query, packed[:, :, :30], value[:, :, :30], None)
    assert torch.equal(by_packed, by_strided)
    assert torch.equal(fewer, by_packed[..., :30])  # the last keys in a partial tile here, in whole tiles above


def test_decode_rows_softcap_and_no_logits_unless_handed_on(kernel):
    """A softcapped source (Gemma 2) caps S before the mask; without ``hand_on`` no logits come back."""
    generator = torch.Generator().manual_seed(1)
    query, key, value = rand(generator, 2, 4, 1, 16) * 2, rand(generator, 2, 2, 30, 16), rand(generator, 2, 2, 30, 16)
    allowed = causal_allowed(slice(None), 1, 30, None)
    output, logits = cpu_kernel.decode_rows(kernel, query, key, value, None, softcap=5.0)
    expected, expected_logits = dense_rows(query, key, value, allowed, None, None, 5.0)
    torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, expected_logits, atol=1e-5, rtol=1e-5)
    assert logits.abs().max() <= 5.0
    unseen = cpu_kernel.decode_rows(kernel, query, key, value, None, softcap=5.0, hand_on=False)
    assert unseen[1] is None
    torch.testing.assert_close(unseen[0], output)


def test_decode_rows_refuse_handed_logits_of_other_keys(kernel):
    """Handed logits must cover exactly the keys attended: the layer lines them up (keys_by_position), the kernel
    does not guess."""
    generator = torch.Generator().manual_seed(2)
    query, key, value = rand(generator, 1, 2, 1, 8), rand(generator, 1, 1, 10, 8), rand(generator, 1, 1, 10, 8)
    with pytest.raises(RuntimeError, match="handed: B x H_s x T_q x T_k"):
        cpu_kernel.decode_rows(kernel, query, key, value, None, handed=torch.zeros(1, 2, 1, 12), mix=torch.eye(2))


def test_decode_steps_of_source_and_shared_layers_take_the_decode_rows(kernel, monkeypatch, llama):
    """In inference on CPU each layer of a decode step attends by one decode-rows call (the source, the shared
    layers and the full layers that hand nothing on, which keep no logits), as does a short prompt's later link (its
    source's logits materialized), on every build (without AVX-512 too: its rows are faster than torch's operations
    on caches read from memory); autograd does not; the greedy continuation and its logits equal the torch route's
    (kernel off)."""
    merged = get_peft_model(copy.deepcopy(llama), LiSAConfig(share_layers=[2, 3], rank=4)).merge_and_unload().eval()
    calls = record_decode_rows(monkeypatch, kernel)
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(3))
    greedy = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.inference_mode():
        through_rows = merged.generate(ids, **greedy)
    # the prompt's second link (layer 3 takes layer 2's logits, materialized: a short prompt), then at each of the 3
    # decode steps layer 0 (full), layer 1 (the source), layers 2 and 3 (shared; layer 3 takes layer 2's mixed rows
    # and hands nothing on) and the full layers after them
    full_after = len(decoder_layers(merged)) - 4
    step = [(1, False, False), (1, False, True), (1, True, True), (1, True, False)] + [(1, False, False)] * full_after
    assert calls == [(40, True, False)] + step * 3
    monkeypatch.setenv(cpu_kernel.SETTING_VARIABLE, "off")
    with torch.inference_mode():
        by_torch = merged.generate(ids, **greedy)
    assert torch.equal(through_rows.sequences, by_torch.sequences)
    torch.testing.assert_close(torch.stack(through_rows.logits), torch.stack(by_torch.logits), atol=1e-4, rtol=1e-4)
    calls.clear()
    monkeypatch.setenv(cpu_kernel.SETTING_VARIABLE, "on")
    prefill = merged(ids[:, :9], use_cache=True)  # with autograd: torch operations
    merged(ids[:, 9:10], cache=prefill.cache, use_cache=True)
    assert calls == []


def test_base_on_decode_rows_is_the_base_decoding_by_the_rows(kernel, monkeypatch, llama):
    """The benchmark's control subject (:func:`~peft_lisa.benchmark.base_on_decode_rows`): the base's own modules,
    every layer of a decode step attending by one decode-rows call that hands nothing on, and what the unmodified
    base computes (greedy tokens and each step's logits); adapter and merged models are refused."""
    control = copy.deepcopy(llama)
    projections = [layer.self_attn.q_proj for layer in decoder_layers(control)]
    assert base_on_decode_rows(control) is control
    layers = decoder_layers(control)
    assert all(type(layer.self_attn) is LiSAFullAttention for layer in layers)
    assert [layer.self_attn.q_proj for layer in layers] == projections  # the same modules, not copies
    calls = record_decode_rows(monkeypatch, kernel)
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(3))
    greedy = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.inference_mode():
        by_rows = control.generate(ids, **greedy)
        by_base = llama.generate(ids, **greedy)
    assert calls == [(1, False, False)] * len(layers) * 3  # the prompt by sdpa, 3 decode steps by the rows
    assert torch.equal(by_rows.sequences, by_base.sequences)
    torch.testing.assert_close(torch.stack(by_rows.logits), torch.stack(by_base.logits), atol=1e-4, rtol=1e-4)
    adapter = get_peft_model(copy.deepcopy(llama), LiSAConfig(share_layers=[2, 3], rank=4))
    with pytest.raises(ValueError, match=r"got a PEFT model \(PeftModel\); pass the plain base model"):
        base_on_decode_rows(adapter)
    with pytest.raises(ValueError, match=r"layers \[0, 1, 2, 3, 4\] are LiSA layers already \(a merged model\?\)"):
        base_on_decode_rows(adapter.merge_and_unload())


@pytest.mark.parametrize("threads", [1, 8])
def test_decode_rows_split_tasks_by_group_or_by_head(kernel, threads):
    """Tasks are a value head's group of query heads where there are at least twice as many groups as threads, single
    query heads otherwise: both splits give dense attention's result."""
    generator = torch.Generator().manual_seed(4)
    query, key, value = rand(generator, 3, 6, 1, 8), rand(generator, 3, 2, 45, 8), rand(generator, 3, 2, 45, 64)
    handed, mix = rand(generator, 3, 6, 1, 45), rand(generator, 6, 6)
    allowed = causal_allowed(slice(None), 1, 45, None)
    expected, _ = dense_rows(query, key, value, allowed, handed, mix, None)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)  # 6 groups: by group with 1 thread, by head with 8
        output, _ = cpu_kernel.decode_rows(kernel, query, key, value, None, handed=handed, mix=mix)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-5)


def test_decode_rows_with_float32_keys_and_bf16_values(kernel):
    """An fp32 adapter on a bf16 base: float32 rank-r keys, bf16 values."""
    generator = torch.Generator().manual_seed(5)
    query, key = rand(generator, 2, 4, 1, 8), rand(generator, 2, 2, 33, 8)
    value = rand(generator, 2, 2, 33, 32).bfloat16()
    allowed = causal_allowed(slice(None), 1, 33, None)
    output, _ = cpu_kernel.decode_rows(kernel, query, key, value, None)
    expected, _ = dense_rows(query, key, value, allowed, None, None, None)
    assert output.dtype == torch.bfloat16
    torch.testing.assert_close(output.float(), expected, atol=1e-2, rtol=1e-2)


def test_a_row_masked_out_by_minus_infinity_attends_evenly(kernel):
    """A float mask of -inf over a whole row reads as the lowest float, as the torch route's additive mask clamps it:
    the row attends evenly instead of giving NaN."""
    generator = torch.Generator().manual_seed(6)
    query, key, value = rand(generator, 1, 2, 1, 16), rand(generator, 1, 1, 20, 16), rand(generator, 1, 1, 20, 16)
    mask = torch.full((1, 1, 20), float("-inf"))
    output, _ = cpu_kernel.decode_rows(kernel, query, key, value, mask)
    torch.testing.assert_close(output, value.mean(dim=2).expand(1, 2, 16).reshape(1, 1, 32), atol=1e-5, rtol=1e-5)


def test_masks_of_other_dtypes_and_float16_values_keep_torch_operations(monkeypatch):
    """An integer mask is not read as an additive one (the torch route names what it takes), and float16 values,
    which the kernel would convert one at a time, keep torch's operations."""
    require_cpu_kernel(monkeypatch)
    assert cpu_kernel.kernel_mask(torch.ones(1, 1, 1, 5, dtype=torch.int64), 5) == (False, None)
    with torch.inference_mode():
        assert cpu_kernel.decode_rows_route(torch.zeros(1, 1, 4, 8), None) is not None
        assert cpu_kernel.decode_rows_route(torch.zeros(1, 1, 4, 8, dtype=torch.float16), None) is None
    assert cpu_kernel.decode_rows_route(torch.zeros(1, 1, 4, 8), None) is None  # autograd on
