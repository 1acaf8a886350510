"""``head_mixing="kv_group"``: P restricted to one source KV group per KV group, so that the shared layer's attention
runs as one fused call of head size d_h + r. Checked against the independent reference of ``test_method`` with the
restricted P, and against the unrestricted fold."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from peft import get_peft_model

from peft_lisa import LiSAConfig
from peft_lisa.tuner import carrier as carrier_module
from peft_lisa.tuner import cpu_kernel
from peft_lisa.tuner import functional as functional_module
from peft_lisa.tuner.carrier import FoldedScores, LogitsCarrier, MaterializedLogits
from peft_lisa.tuner.functional import additive_mask, causal_allowed, grouped_attend, kv_group_alignment, kv_group_mask
from tests.conftest import random_ids, randomize_adapter, require_cpu_kernel, set_handed_logits_bound, tiny_model
from tests.test_method import adapter_weights, reference_logits


@pytest.mark.usefixtures("shared_logits_route")
@pytest.mark.parametrize("share_layers", [[2], [2, 3]])
@pytest.mark.parametrize("num_kv_heads", [2, 4], ids=["gqa", "mha"])
def test_kv_group_adapter_matches_reference_with_restricted_P(share_layers, num_kv_heads):
    model = tiny_model("llama", num_key_value_heads=num_kv_heads)
    perms = {layer: [3, 2, 0, 1] for layer in share_layers}  # crosses groups: repaired within the chosen group
    config = LiSAConfig(share_layers=share_layers, rank=4, head_mixing="kv_group", align_init_permutations=perms)
    peft_model = get_peft_model(model, config)
    randomize_adapter(peft_model)  # P gets values everywhere; only the allowed blocks may act
    ids = random_ids(2, 40)
    with torch.no_grad():
        got = peft_model(ids).logits
        weights = {}
        for layer in share_layers:
            weights[layer] = adapter_weights(peft_model, layer)
            align = peft_model.base_model.model.model.layers[layer].self_attn.lisa_substitute["default"].align
            weights[layer]["P"] = align.mixing()
            assert (align.mixing() == 0).sum() == 16 - 4 * (4 // num_kv_heads)  # H^2 - H G entries masked
        expected = reference_logits(peft_model.get_base_model(), ids, weights)
        merged = peft_model.merge_and_unload()(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(merged, got, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("head_mixing, head_dims", [("full", [36, 44]), ("kv_group", [20, 24])])
def test_fused_head_size(head_mixing, head_dims, monkeypatch):
    """The point of kv_group: the chain [2, 3] hands on logits of head size d_h + r, then d_h + 2r (d_h = 16, r = 4);
    the full mixing needs H_kv d_h + r, then H_kv (d_h + ... ) + r. (Folded logits: the route of every input longer
    than HANDED_LOGITS_MAX_KEYS.)"""
    set_handed_logits_bound(monkeypatch, 0)
    handed = []
    original_put = LogitsCarrier.put
    monkeypatch.setattr(
        LogitsCarrier, "put", lambda self, idx, logits: handed.append((idx, logits)) or original_put(self, idx, logits)
    )
    peft_model = get_peft_model(
        tiny_model("llama"), LiSAConfig(share_layers=[2, 3, 4], rank=4, head_mixing=head_mixing)
    )
    with torch.no_grad():
        peft_model(random_ids(1, 30))
    folded = {idx: logits.head_dim for idx, logits in handed if isinstance(logits, FoldedScores)}
    assert [folded[2], folded[3]] == head_dims


@pytest.mark.parametrize("head_mixing", ["full", "kv_group"])
def test_chain_hands_on_only_its_sources_queries_not_mixed_ones(head_mixing, monkeypatch):
    """Memory: a chain's links compose their P's as H x H matrices; the tensors they hand on are the source layer's
    own query and the rank-r queries, never mixed queries (B x H x T x H_kv d_h under the full mixing), which would
    live through every MLP of the chain (measured on SmolLM2 at 1 x 2048: peak tensors 140.8 MiB with them,
    128.3 without; base 145.0)."""
    handed = []
    original_put = LogitsCarrier.put
    monkeypatch.setattr(
        LogitsCarrier, "put", lambda self, idx, logits: handed.append((idx, logits)) or original_put(self, idx, logits)
    )
    peft_model = get_peft_model(
        tiny_model("llama"), LiSAConfig(share_layers=[2, 3, 4], rank=4, head_mixing=head_mixing)
    )
    randomize_adapter(peft_model)
    with torch.enable_grad():  # the fused calls (training), which build the tensors below for their groups
        peft_model(random_ids(1, 30))
    folded = {idx: logits for idx, logits in handed if isinstance(logits, FoldedScores)}
    assert sorted(folded) == [1, 2, 3]
    source_query = folded[1].parts[0].query  # layer 1's rotary query, B x H x T x d_h
    for idx in (2, 3):
        parts = folded[idx].parts
        assert parts[0].query is source_query
        assert [part.query.shape[-1] for part in parts[1:]] == [4] * (idx - 1)  # one rank-r query per link
    assert folded[3].parts[1].query is folded[2].parts[1].query  # layer 2's rank-r query, handed on unmixed


def test_P_outside_the_groups_gets_no_gradient():
    peft_model = get_peft_model(tiny_model("llama"), LiSAConfig(share_layers=[3], rank=4, head_mixing="kv_group"))
    randomize_adapter(peft_model)
    peft_model(random_ids(2, 12)).logits.square().mean().backward()
    align = peft_model.base_model.model.model.layers[3].self_attn.lisa_substitute["default"].align
    outside = align.mixing_mask == 0
    assert align.permute.grad[outside].abs().max() == 0
    assert align.permute.grad[~outside].abs().max() > 0


def test_kv_group_alignment_keeps_each_group_in_one_source_group():
    permutation = [4, 1, 2, 0, 3, 5, 8, 7, 6]  # groups of 3; group 0 mostly reads group 0, group 1 group 1
    group_map, aligned = kv_group_alignment(permutation, 3)
    assert group_map == [0, 1, 2]
    assert sorted(aligned) == list(range(9))
    assert all(aligned[h] // 3 == group_map[h // 3] for h in range(9))
    assert [aligned[h] for h in (1, 2, 4, 5, 6, 7, 8)] == [1, 2, 3, 5, 8, 7, 6]  # heads already in place stay


def _chain_of_two(batch: int, q_len: int, k_len: int, group_map, generator, rank: int = 2) -> FoldedScores:
    """A source's logits, mixed and corrected by two shared layers (4 heads, 2 KV heads, d_h 8, rank 2; from rank 5
    a link's fully mixed term is wider than the source's head size, as on models with many KV heads)."""

    def rand(*shape):
        return torch.randn(*shape, generator=generator)

    mask = torch.ones(4, 4) if group_map is None else kv_group_mask(group_map, 4)
    logits = FoldedScores.from_query_key(rand(batch, 4, q_len, 8), rand(batch, 2, k_len, 8), 8**-0.5)
    for _ in range(2):
        logits = logits.mixed(rand(4, 4) * mask, group_map)
        logits = logits.with_lowrank(rand(batch, 4, q_len, rank), rand(batch, 2, k_len, rank), rank**-0.5)
    return logits


@pytest.mark.parametrize("group_map", [None, [1, 0]], ids=["full", "kv_group"])
@pytest.mark.parametrize("masking", ["causal", "padding", "after_cache"])
@pytest.mark.parametrize("products", ["bmm", "mm_per_matrix"])
def test_explicit_blocks_equal_the_fused_calls_and_dense_attention(group_map, masking, products, monkeypatch):
    """Inference runs a widely mixed shared layer as explicit blocks of queries (``attend_by_blocks``), training as
    fused calls: both equal ``softmax(S + M) V`` from the dense logits, in blocks of a few queries and sequences, with
    a padding mask, and for a prefill that continues a cache (fewer queries than keys, no mask). The blocks write
    their logits into buffers reused from block to block (the last block has fewer sequences), with the products as
    ``bmm`` or, as for a long prefill on CPU, one ``mm`` per matrix."""
    if products == "mm_per_matrix":
        monkeypatch.setattr(functional_module, "MM_LOOP_MIN_WORK", 0)
        monkeypatch.setattr(functional_module, "MM_LOOP_MAX_BATCH_PER_THREAD", 1024)
    generator = torch.Generator().manual_seed(0)
    batch, q_len = 3, 21
    k_len = q_len + 6 if masking == "after_cache" else q_len
    logits = _chain_of_two(batch, q_len, k_len, group_map, generator)
    value = torch.randn(batch, 2, k_len, 8, generator=generator)
    allowed = causal_allowed(slice(None), q_len, k_len, value.device).expand(batch, 1, q_len, k_len).clone()
    attention_mask = None
    if masking == "padding":
        allowed[1, ..., :5] = False  # sequence 1 is left-padded by 5 tokens
        allowed[1, ..., :5, 4] = True  # (a padded query sees one key, as transformers' masks keep a row finite)
        attention_mask = allowed
    dense = grouped_attend(
        torch.softmax(logits.rows(slice(None)) + additive_mask(allowed, q_len, k_len, value.device), -1), value
    )
    monkeypatch.setattr(carrier_module, "EXPLICIT_BLOCK_KEYS", 2 * k_len)  # two sequences per block
    explicit = logits.attend_by_blocks(attention_mask, value, block=4)
    # an accelerator's sizing: 2 sequences x 5 queries of logits per block (at least block=4 queries)
    by_bytes = logits.attend_by_blocks(attention_mask, value, block=4, block_bytes=4 * k_len * 4 * 10)
    fused = logits.attend_fused(attention_mask, value, 0.0)
    torch.testing.assert_close(explicit, dense, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(by_bytes, dense, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused, dense, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("batch, q_len, queries_per_block", [(1, 300, 128), (8, 300, 64), (1, 1100, 64), (1, 200, 64)])
def test_default_blocks_hold_at_least_the_minimum_rows(batch, q_len, queries_per_block, monkeypatch):
    """By default a block holds EXPLICIT_QUERY_BLOCK queries of each of its sequences, and, for 256-1024 keys
    (EXPLICIT_MIN_ROWS_KEYS), at least EXPLICIT_MIN_BLOCK_ROWS (sequence, query) rows: a single sequence of 300
    tokens takes 128 queries per block, 8 sequences 64, a single sequence of 1100 or 200 tokens 64. The result equals
    that of explicit 64-query blocks."""
    generator = torch.Generator().manual_seed(3)
    logits = _chain_of_two(batch, q_len, q_len, None, generator)
    value = torch.randn(batch, 2, q_len, 8, generator=generator)
    sizes = []
    original = FoldedScores.masked_rows
    monkeypatch.setattr(
        FoldedScores,
        "masked_rows",
        lambda self, mask, rows, *args: (
            sizes.append((self.shape[0], rows.stop - rows.start)) or original(self, mask, rows, *args)
        ),
    )
    by_default = logits.attend_by_blocks(None, value)
    assert sizes[0] == (batch, queries_per_block)  # all sequences in one block
    assert sum(size for _, size in sizes) == q_len
    torch.testing.assert_close(by_default, logits.attend_by_blocks(None, value, block=64), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rank", [2, 6], ids=["narrow_links", "wide_links"])
def test_explicit_blocks_in_the_models_dtype_equal_dense_attention(dtype, rank):
    """The explicit blocks of a float32 or bf16 model (bf16: bf16 products, float32 logits and softmax, bf16
    probabilities for ``A V``, in two buffers reused from block to block), also with links whose mixed terms are
    wider than the source's head size (each such part's scores computed apart), equal ``softmax(S + M) V``
    computed densely from the same tensors."""
    generator = torch.Generator().manual_seed(2)
    batch, q_len = 3, 21
    logits = _chain_of_two(batch, q_len, q_len, None, generator, rank)
    logits = FoldedScores([replace(part, query=part.query.to(dtype), key=part.key.to(dtype)) for part in logits.parts])
    assert len(logits._parts_by_layout()[2]) == (1 if rank == 2 else 2)  # the wide parts
    value = torch.randn(batch, 2, q_len, 8, generator=generator).to(dtype)
    allowed = causal_allowed(slice(None), q_len, q_len, value.device)
    probs = torch.softmax(logits.rows(slice(None)) + additive_mask(allowed, q_len, q_len, None), -1)
    dense = grouped_attend(probs.to(dtype), value)
    explicit = logits.attend_by_blocks(None, value, block=4)
    assert explicit.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(explicit, dense, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("group_map", [None, [0]], ids=["full", "kv_group"])
def test_fused_call_with_one_key_head_equals_dense_attention(group_map):
    """Multi-query attention (one KV head for all 4 query heads), a prefill continuing a cache: the one fused call
    over all heads equals the dense ``softmax(S + M) V``."""
    generator = torch.Generator().manual_seed(1)

    def rand(*shape):
        return torch.randn(*shape, generator=generator)

    batch, q_len, k_len = 2, 5, 9
    logits = FoldedScores.from_query_key(rand(batch, 4, q_len, 8), rand(batch, 1, k_len, 8), 8**-0.5)
    for _ in range(2):
        logits = logits.mixed(rand(4, 4), group_map).with_lowrank(
            rand(batch, 4, q_len, 2), rand(batch, 1, k_len, 2), 2**-0.5
        )
    value = rand(batch, 1, k_len, 8)
    allowed = causal_allowed(slice(None), q_len, k_len, value.device)
    dense = grouped_attend(
        torch.softmax(logits.rows(slice(None)) + additive_mask(allowed, q_len, k_len, None), -1), value
    )
    torch.testing.assert_close(logits.attend_fused(None, value), dense, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("head_mixing, explicit", [("full", True), ("kv_group", False)])
@pytest.mark.parametrize("kernel", ["on", "off"])
def test_inference_routes_of_folded_logits(head_mixing, explicit, kernel, monkeypatch):
    """On CPU, inference attends through the compiled kernel, under both head mixings (on AMX too: the route does not
    depend on the CPU); with it off, the full mixing of a GQA model (a fused call of head size H_kv d_h + r >= 2 d_h)
    runs as explicit blocks and kv_group (d_h + r) stays fused; training always runs fused. All agree. (The route of
    every input longer than HANDED_LOGITS_MAX_KEYS.)"""
    set_handed_logits_bound(monkeypatch, 0)
    if kernel == "on":
        require_cpu_kernel(monkeypatch)
    else:
        monkeypatch.setenv(cpu_kernel.SETTING_VARIABLE, "off")
    calls = []

    def counted(route):
        original = getattr(FoldedScores, route)
        return lambda self, *args, **kw: calls.append(route) or original(self, *args, **kw)

    for route in ("attend_by_blocks", "attend_by_kernel"):
        monkeypatch.setattr(FoldedScores, route, counted(route))
    peft_model = get_peft_model(tiny_model("llama"), LiSAConfig(share_layers=[2, 3], rank=4, head_mixing=head_mixing))
    randomize_adapter(peft_model)
    ids = random_ids(2, 30)
    with torch.no_grad():
        inference = peft_model(ids).logits
    if kernel == "on":
        assert calls == ["attend_by_kernel"] * 2
    else:
        assert calls == (["attend_by_blocks"] * 2 if explicit else [])
    training = peft_model(ids).logits
    assert len(calls) == (2 if kernel == "on" or explicit else 0)
    torch.testing.assert_close(inference, training.detach(), atol=1e-5, rtol=1e-5)


def test_a_short_inference_prefill_hands_whole_logits_on_and_a_longer_one_folded_logits(monkeypatch):
    """Without autograd a shared layer that attends to at most HANDED_LOGITS_MAX_KEYS keys computes its logits whole
    and hands them on, so that the next link mixes them instead of recomputing the chain block by block; one key
    more and it hands on folded logits (queries and keys, no T x T tensor). Both equal the training route (fused
    calls)."""
    set_handed_logits_bound(monkeypatch, 40)
    handed = []
    original_put = LogitsCarrier.put
    monkeypatch.setattr(
        LogitsCarrier, "put", lambda self, idx, logits: handed.append((idx, logits)) or original_put(self, idx, logits)
    )
    peft_model = get_peft_model(tiny_model("llama"), LiSAConfig(share_layers=[2, 3, 4], rank=4))
    randomize_adapter(peft_model)
    for length, route in ((40, MaterializedLogits), (41, FoldedScores)):
        ids = random_ids(2, length)
        handed.clear()
        with torch.no_grad():
            inference = peft_model(ids).logits
        assert [(idx, type(logits)) for idx, logits in handed] == [(1, FoldedScores), (2, route), (3, route)]
        training = peft_model(ids).logits
        torch.testing.assert_close(inference, training.detach(), atol=1e-5, rtol=1e-5)


def test_explicit_blocks_are_a_cpu_path(monkeypatch):
    """On an accelerator a wide shared layer attends by the fused calls: the explicit blocks' loop of small calls
    is sized for a CPU cache (on an H200 it ran up to 30x slower than the base). Meta tensors stand in for a device."""
    monkeypatch.setattr(FoldedScores, "attend_by_blocks", lambda *args, **kw: pytest.fail("explicit blocks off CPU"))
    device = torch.device("meta")
    query, key = torch.randn(1, 6, 5, 8, device=device), torch.randn(1, 2, 5, 8, device=device)
    scores = FoldedScores.from_query_key(query, key, 8**-0.5).mixed(torch.randn(6, 6, device=device), None)
    value = torch.randn(1, 2, 5, 8, device=device)
    with torch.no_grad():
        assert scores.head_dim >= 2 * value.shape[-1]  # wide: on CPU this would take the explicit blocks
        assert scores.attend(None, value).shape == (1, 5, 6 * 8)


def test_wide_fused_calls_take_explicit_blocks_on_an_accelerator(monkeypatch):
    """On an accelerator the fused call is kept up to FUSED_MAX_HEAD_DIM (flash attention's limit), beyond it (the end
    of a long chain) the explicit blocks take over, sized for the device (``block_bytes``), so that no math-kernel
    fallback holds the T x T logits. Meta tensors stand in for a device."""
    calls = []
    monkeypatch.setattr(FoldedScores, "attend_by_blocks", lambda self, mask, value, **kw: calls.append(kw))
    monkeypatch.setattr(FoldedScores, "attend_fused", lambda self, *args, **kw: calls.append("fused"))
    device = torch.device("meta")
    value = torch.randn(1, 2, 5, 64, device=device)
    for links, expected in ((1, "fused"), (3, {"block_bytes": carrier_module.EXPLICIT_BLOCK_BYTES_ACCELERATOR})):
        scores = FoldedScores.from_query_key(
            torch.randn(1, 6, 5, 64, device=device), torch.randn(1, 2, 5, 64, device=device), 0.125
        )
        for _ in range(links):  # each link adds H_kv r = 2 x 64 dims to the fused head size
            scores = scores.mixed(torch.randn(6, 6, device=device), None).with_lowrank(
                torch.randn(1, 6, 5, 64, device=device), torch.randn(1, 2, 5, 64, device=device), 0.125
            )
        assert (scores.head_dim > carrier_module.FUSED_MAX_HEAD_DIM) == (expected != "fused")
        with torch.no_grad():
            scores.attend(None, value)
        assert calls.pop() == expected


def test_fused_attention_repeats_grouped_keys_where_a_mask_has_no_grouped_kernel(monkeypatch):
    """Where sdpa has no fused kernel for grouped keys with a mask (CUDA), the keys and values are repeated per query
    head: the same result as the grouped call."""
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(2, 6, 7, 16, generator=generator)
    key, value = torch.randn(2, 2, 7, 16, generator=generator), torch.randn(2, 2, 7, 8, generator=generator)
    allowed = causal_allowed(slice(None), 7, 7, query.device).expand(2, 1, 7, 7).clone()
    allowed[1, ..., :3] = False
    allowed[1, ..., :3, 2] = True
    grouped = functional_module.fused_attention(query, key, value, allowed)
    monkeypatch.setattr(functional_module, "sdpa_takes_grouped_keys_with_mask", lambda device: False)
    seen = []
    original = functional_module.F.scaled_dot_product_attention
    monkeypatch.setattr(
        functional_module.F,
        "scaled_dot_product_attention",
        lambda q, k, *args, **kw: seen.append((k.shape[1], kw["enable_gqa"])) or original(q, k, *args, **kw),
    )
    repeated = functional_module.fused_attention(query, key, value, allowed)
    assert seen == [(6, False)]
    torch.testing.assert_close(repeated, grouped, atol=1e-6, rtol=1e-6)
