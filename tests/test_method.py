"""LiSA's forward against a hand-written reference computation of METHOD.md steps 1-6 (no library code reused)."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from peft_lisa import LiSAConfig
from peft_lisa.tuner.carrier import ChainedLogits, FoldedScores, MaterializedLogits, ScoresFromQueryKey
from peft_lisa.tuner.functional import grouped_product

from .conftest import random_ids, randomize_adapter, tiny_model


def rope(x: torch.Tensor, positions: torch.Tensor, dims: int, head_dim: int, theta: float, freq_idx) -> torch.Tensor:
    """Rotate-half rotary embedding of ``x`` (B x heads x T x dims) using the frequencies ``freq_idx``."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = positions[:, None].float() * inv_freq[freq_idx][None, :]  # T x dims/2
    cos, sin = torch.cat([freqs.cos(), freqs.cos()], -1), torch.cat([freqs.sin(), freqs.sin()], -1)
    x1, x2 = x[..., : dims // 2], x[..., dims // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def reference_logits(model, ids: torch.Tensor, adapters: dict[int, dict]) -> torch.Tensor:
    """Eager re-implementation of a Llama forward where the layers in ``adapters`` use LiSA attention.

    ``adapters[l]`` holds the LiSA weights of shared layer ``l``: ``P``, ``W1``, ``b1``, ``W2``, ``b2``, ``Wq``,
    ``Wk``, ``rank``.
    """
    cfg = model.config
    heads, kv_heads, head_dim = (
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.hidden_size // cfg.num_attention_heads,
    )
    theta = cfg.rope_parameters["rope_theta"]
    batch, length = ids.shape
    positions = torch.arange(length)
    causal = torch.full((length, length), float("-inf")).triu(1)
    h = model.model.embed_tokens(ids)
    prev_logits = None
    for idx, layer in enumerate(model.model.layers):
        attn = getattr(layer.self_attn, "base_layer", layer.self_attn)
        x = layer.input_layernorm(h)
        v = (
            attn.v_proj(x)
            .view(batch, length, kv_heads, head_dim)
            .transpose(1, 2)
            .repeat_interleave(heads // kv_heads, 1)
        )
        if idx in adapters:
            a = adapters[idx]
            s = prev_logits.permute(0, 2, 3, 1)  # B x T x T x H: the alignment acts on the head axis
            aligned = s @ a["P"].T + torch.nn.functional.gelu(s @ a["W1"].T + a["b1"]) @ a["W2"].T + a["b2"]
            r = a["rank"]
            qr = (x @ a["Wq"].T).view(batch, length, heads, r).transpose(1, 2)
            kr = (
                (x @ a["Wk"].T)
                .view(batch, length, kv_heads, r)
                .transpose(1, 2)
                .repeat_interleave(heads // kv_heads, 1)
            )
            freq_idx = a["freq_idx"]
            qr, kr = (
                rope(qr, positions, r, head_dim, theta, freq_idx),
                rope(kr, positions, r, head_dim, theta, freq_idx),
            )
            logits = aligned.permute(0, 3, 1, 2) + (qr @ kr.transpose(-1, -2)) / r**0.5
        else:
            q = attn.q_proj(x).view(batch, length, heads, head_dim).transpose(1, 2)
            k = (
                attn.k_proj(x)
                .view(batch, length, kv_heads, head_dim)
                .transpose(1, 2)
                .repeat_interleave(heads // kv_heads, 1)
            )
            freq_idx = torch.arange(head_dim // 2)
            q, k = (
                rope(q, positions, head_dim, head_dim, theta, freq_idx),
                rope(k, positions, head_dim, head_dim, theta, freq_idx),
            )
            logits = (q @ k.transpose(-1, -2)) / head_dim**0.5
        probs = torch.softmax(logits + causal, dim=-1)
        out = (probs @ v).transpose(1, 2).reshape(batch, length, -1)
        h = h + attn.o_proj(out)
        h = h + layer.mlp(layer.post_attention_layernorm(h))
        prev_logits = logits
    return model.lm_head(model.model.norm(h))


def adapter_weights(peft_model, layer_idx: int) -> dict:
    wrapper = peft_model.base_model.model.model.layers[layer_idx].self_attn
    substitute = wrapper.lisa_substitute["default"]
    align = substitute.align
    heads = align.num_heads
    linear_only = align.hidden == 0  # no FFN: a zero-width one contributes W2 gelu(W1 s + b1) = 0
    return {
        "P": align.permute,
        "W1": torch.zeros(1, heads) if linear_only else align.up.weight,
        "b1": torch.zeros(1) if linear_only else align.up.bias,
        "W2": torch.zeros(heads, 1) if linear_only else align.down.weight,
        "b2": torch.zeros(heads) if linear_only else align.out_bias,
        "Wq": substitute.q_lowrank.weight,
        "Wk": substitute.k_lowrank.weight,
        "rank": substitute.rank,
        "freq_idx": documented_frequencies(
            peft_model.peft_config["default"].rotary_frequencies, substitute.layout.head_dim, substitute.rank
        ),
    }


def documented_frequencies(rotary_frequencies: str, head_dim: int, rank: int) -> torch.Tensor:
    """The rotary frequencies of the rank-r query/key as LiSAConfig documents them: the first r/2 (``"first"``), or
    r/2 spread evenly from the first to the last, ``round(i (d_h/2 - 1) / (r/2 - 1))`` (``"strided"``)."""
    half_rank, half_dim = rank // 2, head_dim // 2
    if rotary_frequencies == "first":
        return torch.arange(half_rank)
    return torch.tensor([round(i * (half_dim - 1) / max(half_rank - 1, 1)) for i in range(half_rank)])


def direct_sharing_logits(model, ids: torch.Tensor, share_layers: list[int], perms: dict[int, list[int]]):
    """Direct sharing: a shared layer takes the previous layer's logits with heads re-indexed, nothing else."""
    heads = model.config.num_attention_heads
    adapters = {}
    for layer in share_layers:
        perm = perms.get(layer, list(range(heads)))
        P = torch.zeros(heads, heads)
        P[torch.arange(heads), torch.tensor(perm)] = 1.0
        adapters[layer] = dict(
            P=P,
            W1=torch.zeros(1, heads),
            b1=torch.zeros(1),
            W2=torch.zeros(heads, 1),
            b2=torch.zeros(heads),
            Wq=torch.zeros(2 * heads, model.config.hidden_size),
            Wk=torch.zeros(2, model.config.hidden_size).repeat(model.config.num_key_value_heads, 1),
            rank=2,
            freq_idx=torch.arange(1),  # Wq = 0: the rotary frequencies do not matter
        )
    return reference_logits(model, ids, adapters)


@pytest.mark.usefixtures("shared_logits_route")
@pytest.mark.parametrize("share_layers", [[2], [2, 3], [1, 3, 4]])
def test_untrained_adapter_is_direct_sharing_with_permutation(share_layers):
    model = tiny_model("llama")
    ids = random_ids()
    perms = {layer: [(h + layer) % 4 for h in range(4)] for layer in share_layers}
    with torch.no_grad():
        expected = direct_sharing_logits(model, ids, share_layers, perms)
        base = model(ids).logits
        peft_model = get_peft_model(
            model, LiSAConfig(share_layers=share_layers, rank=4, align_init_permutations=perms)
        )
        got = peft_model(ids).logits
    assert (expected - base).abs().max() > 1e-2, "the reference must differ from the base model to be a test"
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.usefixtures("shared_logits_route")
@pytest.mark.parametrize("rotary_frequencies", ["first", "strided"])
@pytest.mark.parametrize("align_hidden", [None, 0, 3])
def test_trained_adapter_matches_reference_steps_1_to_6(align_hidden, rotary_frequencies):
    model = tiny_model("llama")
    ids = random_ids()
    config = LiSAConfig(share_layers=[2, 3], rank=4, align_hidden=align_hidden, rotary_frequencies=rotary_frequencies)
    peft_model = get_peft_model(model, config)
    randomize_adapter(peft_model)
    with torch.no_grad():
        got = peft_model(ids).logits
        expected = reference_logits(
            peft_model.get_base_model(), ids, {i: adapter_weights(peft_model, i) for i in (2, 3)}
        )
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.usefixtures("shared_logits_route")
def test_no_information_from_future_positions():
    """Changing a later token must not change the logits of earlier positions (mask re-applied after alignment)."""
    peft_model = get_peft_model(tiny_model("llama"), LiSAConfig(share_layers=[2, 3], rank=4))
    randomize_adapter(peft_model, scale=1.0)
    ids = random_ids(1, 10)
    changed = ids.clone()
    changed[0, 7] = (changed[0, 7] + 5) % 128
    with torch.no_grad():
        a, b = peft_model(ids).logits, peft_model(changed).logits
    torch.testing.assert_close(a[:, :7], b[:, :7], atol=1e-5, rtol=1e-5)
    assert (a[:, 7:] - b[:, 7:]).abs().max() > 1e-4


@pytest.mark.parametrize("align_hidden", [None, 0])
def test_long_prefill_spanning_several_query_blocks_matches_reference(align_hidden):
    """300 queries: the FFN alignment runs them as 256 + 44 blocks (layer 3 recomputes layer 2's logits block by
    block), the linear one in one fused call; neither may change the result."""
    model = tiny_model("llama")
    ids = random_ids(1, 300)
    peft_model = get_peft_model(model, LiSAConfig(share_layers=[2, 3], rank=4, align_hidden=align_hidden))
    randomize_adapter(peft_model)
    with torch.no_grad():
        got = peft_model(ids).logits
        weights = {i: adapter_weights(peft_model, i) for i in (2, 3)}
        expected = reference_logits(peft_model.get_base_model(), ids, weights)
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_source_layer_attends_with_the_models_own_kernel_and_hands_no_logits_tensor(attn_implementation, monkeypatch):
    """A full layer feeding a shared one is the base layer, bit for bit, with the model's attention implementation;
    it hands its rotary query/key on, so no B x H x T x T tensor lives between layers."""
    from peft_lisa.tuner.carrier import FoldedScores, LogitsCarrier

    model = tiny_model("llama", attn_implementation=attn_implementation)
    ids = random_ids(2, 20)
    captured = {}
    hook = model.model.layers[2].self_attn.register_forward_hook(lambda m, a, out: captured.update(base=out[0]))
    with torch.no_grad():
        model(ids)
    hook.remove()
    peft_model = get_peft_model(model, LiSAConfig(share_layers=[3], rank=4))
    handed = []
    original_put = LogitsCarrier.put
    monkeypatch.setattr(
        LogitsCarrier, "put", lambda self, idx, logits: handed.append((idx, logits)) or original_put(self, idx, logits)
    )
    source = peft_model.get_base_model().model.layers[2].self_attn
    source.register_forward_hook(lambda m, a, out: captured.update(lisa=out[0]))
    with torch.no_grad():
        peft_model(ids)
    assert torch.equal(captured["lisa"], captured["base"])
    assert [idx for idx, _ in handed] == [2]
    assert isinstance(handed[0][1], FoldedScores) and handed[0][1].shape == (2, 4, 20, 20)


@pytest.mark.parametrize(("heads", "kv_heads", "q_len", "dim", "dtype", "key_major"), [
    (4, 4, 1, 128, torch.bfloat16, True),  # a decode step without GQA
    (8, 2, 1, 128, torch.bfloat16, True),  # 4 query heads per KV head
    (4, 1, 1, 128, torch.bfloat16, True),  # one KV head for all: a (k q^T)^T with several columns
    (4, 4, 3, 128, torch.bfloat16, False),  # a prefill's rows
    (10, 2, 1, 128, torch.bfloat16, False),  # 5 query heads per KV head
    (4, 4, 1, 8, torch.bfloat16, False),  # a rank-8 term
    (4, 4, 1, 128, torch.float16, False),
    (4, 4, 1, 128, torch.float32, False),
])  # fmt: skip
def test_grouped_product_per_head_on_either_layout(heads, kv_heads, q_len, dim, dtype, key_major):
    """``q k^T`` per head, GQA aware, whichever layout runs it (a bf16 decode step with few query heads per KV head:
    ``(k q^T)^T``): each head's scores against its KV head's keys, in the inputs' dtype, contiguous (callers view
    them flat)."""
    from peft_lisa.tuner.functional import grouped_product, uses_key_major

    generator = torch.Generator().manual_seed(0)
    query = torch.randn(2, heads, q_len, dim, generator=generator).to(dtype)
    key = torch.randn(2, kv_heads, 37, dim, generator=generator).to(dtype)
    assert uses_key_major(query, kv_heads) is key_major
    scores = grouped_product(query, key)
    expected = query.double() @ key.double().repeat_interleave(heads // kv_heads, dim=1).transpose(-1, -2)
    assert scores.shape == (2, heads, q_len, 37) and scores.dtype == dtype and scores.is_contiguous()
    torch.testing.assert_close(scores.double(), expected, atol=0.0, rtol=2**-7)


def test_source_logits_against_their_first_keys():
    """``first_keys(n)`` of every kind of handed logits (what a sliding-window shared layer reads of a full source on
    a static cache, whose slots run past the tokens held) gives the first ``n`` columns of the logits, and its rows
    against the last ``m`` keys the last ``m`` of those; compared with the uncut logits, computed whole."""
    torch.manual_seed(0)
    batch, heads, kv_heads, q_len, k_len, dim, rank = 2, 4, 2, 3, 11, 8, 4
    query, key = torch.randn(batch, heads, q_len, dim), torch.randn(batch, kv_heads, k_len, dim)
    q_small, k_small = torch.randn(batch, heads, q_len, rank), torch.randn(batch, kv_heads, k_len, rank)
    mixing = torch.randn(heads, heads)
    folded = FoldedScores.from_query_key(query, key, 0.3).mixed(mixing).with_lowrank(q_small, k_small, 0.5)
    softcapped = ScoresFromQueryKey(query, key, 0.3, softcap=2.0)

    def lowrank_link(source_rows, q_rows, k_rows):
        return source_rows * 0.7 + grouped_product(q_rows, k_rows)

    kinds = {
        "materialized": MaterializedLogits(torch.randn(batch, heads, q_len, k_len)),
        "query and key": softcapped,
        "folded": folded,
        "chained": ChainedLogits(lowrank_link, softcapped, q_small, k_small),
    }
    held, last = 7, 5
    for name, logits in kinds.items():
        whole = logits.rows(slice(None))  # B x H x T_q x k_len
        cut = logits.first_keys(held)
        assert cut.shape == (batch, heads, q_len, held), name
        torch.testing.assert_close(cut.rows(slice(None)), whole[..., :held], msg=name)
        torch.testing.assert_close(cut.rows(slice(1, 3), last), whole[:, :, 1:3, held - last : held], msg=name)
