"""``head_mixing="kv_group"``: P restricted to one source KV group per KV group, so that the shared layer's attention
runs as one fused call of head size d_h + r. Checked against the independent reference of ``test_method`` with the
restricted P, and against the unrestricted fold."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from peft_lisa import LiSAConfig
from peft_lisa.tuner.carrier import FoldedScores, LogitsCarrier
from peft_lisa.tuner.functional import kv_group_alignment
from tests.conftest import random_ids, randomize_adapter, tiny_model
from tests.test_method import adapter_weights, reference_logits


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
    the full mixing needs H_kv d_h + r, then H_kv (d_h + ... ) + r."""
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
    with torch.no_grad():
        peft_model(random_ids(1, 30))
    folded = {idx: logits for idx, logits in handed if isinstance(logits, FoldedScores)}
    assert sorted(folded) == [1, 2, 3]
    source_query = folded[1].parts[0].query  # layer 1's rotary query, B x H x T x d_h
    for idx in (2, 3):
        parts = folded[idx].parts
        assert parts[0].query is source_query
        assert [part.query.shape[-1] for part in parts[1:]] == [4] * (idx - 1)  # one rank-r query per link
    assert folded[3].parts[1].query is folded[2].parts[1].query  # layer 2's rank-r query, handed on unmixed
    # What attend built for its groups (the keys side by side, the float queries) is freed when it returns, not kept
    # alive with the logits handed on.
    for logits in folded.values():
        assert all(part._spread_key is None and part._float_query is None for part in logits.parts)


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
