"""LiSA against references built from the base model itself, on every supported architecture.

* Direct sharing (``docs/method.md``, steps 1-2, untrained adapter): the base model runs with its own eager attention,
  and each shared layer's attention probabilities are replaced by those the previous layer used, heads permuted.
* Padding: the real tokens of a left-padded row get the logits of that row alone, in prefill and in cached decoding.
* Decoding: every generated step's logits equal a no-cache forward over the same tokens (tolerance, not tokens).
* Merging: with every adapter parameter trained, the merged model computes the adapter's logits (float32 and bf16).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from peft import get_peft_model

from peft_lisa import LiSAConfig

from .conftest import left_padded_batch, random_ids, randomize_adapter, tiny_model

ARCHS = ["llama", "mistral", "qwen2", "qwen3"]
# Layer 0 feeds 1, which feeds 2 (a chain of two shared layers); layer 3 (full) feeds 4. No permutation is its own
# inverse, so applying P transposed (P^T = P^-1) gives other logits.
SHARE = [1, 2, 4]
PERMS = {1: [1, 2, 3, 0], 2: [2, 0, 3, 1], 4: [3, 0, 1, 2]}
LISA_PARAMETERS = {
    "align.permute",  # P
    "align.up.weight",  # W1
    "align.up.bias",  # b1
    "align.down.weight",  # W2
    "align.out_bias",  # b2
    "q_lowrank.weight",
    "k_lowrank.weight",
}


def inverse(perm: list[int]) -> list[int]:
    out = [0] * len(perm)
    for i, p in enumerate(perm):
        out[p] = i
    return out


@contextmanager
def eager_probabilities_shared(
    model: torch.nn.Module, share_layers: list[int], perms: dict[int, list[int]]
) -> Iterator[list[int]]:
    """Within the block, ``model`` (eager attention) is direct sharing built from its own attention probabilities.

    Every layer runs transformers' own ``eager_attention_forward``. For a shared layer ``l`` the probabilities it
    returns are thrown away and replaced by those layer ``l-1`` used (for a chain, the already replaced ones), head
    ``i`` taking head ``perms[l][i]``; they weigh layer ``l``'s own values, and its own ``o_proj`` follows. Softmax
    commutes with a head permutation and the mask is the same for every head, so this is ``softmax(P S_{l-1} + M)``.
    Yields the list of layer indices the patched function saw, so that a caller can check it ran for every layer.
    """
    assert model.config._attn_implementation == "eager", "the reference reads eager attention probabilities"
    module = sys.modules[type(model).__module__]  # transformers.models.<type>.modeling_<type>
    original = module.eager_attention_forward
    used: dict[int, torch.Tensor] = {}
    seen: list[int] = []

    def shared_probabilities(attn, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        output, probs = original(attn, query, key, value, attention_mask, scaling, dropout, **kwargs)
        idx = attn.layer_idx
        seen.append(idx)
        if idx in share_layers:
            perm = perms.get(idx, list(range(query.shape[1])))
            probs = used[idx - 1][:, perm]  # B x H x T_q x T_k: head i <- head perm[i] of layer l-1
            groups = query.shape[1] // value.shape[1]
            values = value.repeat_interleave(groups, dim=1)  # GQA: query head h reads KV head h // groups
            output = torch.matmul(probs.to(values.dtype), values).transpose(1, 2).contiguous()
        used[idx] = probs
        return output, probs

    module.eager_attention_forward = shared_probabilities
    try:
        yield seen
    finally:
        module.eager_attention_forward = original


def direct_sharing_reference(
    model: torch.nn.Module,
    ids: torch.Tensor,
    share_layers: list[int],
    perms: dict[int, list[int]],
    attention_mask=None,
) -> torch.Tensor:
    """Full-model logits of direct sharing, computed by the eager base ``model`` (``eager_probabilities_shared``)."""
    with eager_probabilities_shared(model, share_layers, perms) as seen, torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention_mask).logits
    num_layers = model.config.num_hidden_layers
    assert seen == list(range(num_layers)), f"the patched attention ran for layers {seen}, not every layer"
    return logits


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("model_type", ARCHS)
def test_untrained_adapter_is_direct_sharing_of_the_base_models_own_attention(model_type, attn_implementation):
    """Untrained (zero low-rank query, linear alignment): logits equal the base model with its shared layers'
    eager attention probabilities replaced by the previous layer's, heads permuted; a chain of two shared layers and
    permutations that are not their own inverse (so a transposed P is seen; so is a Qwen3 source without q/k norm)."""
    ids = random_ids(2, 12)
    reference_model = tiny_model(model_type, attn_implementation="eager")
    expected = direct_sharing_reference(reference_model, ids, SHARE, PERMS)
    transposed = direct_sharing_reference(reference_model, ids, SHARE, {i: inverse(p) for i, p in PERMS.items()})
    with torch.no_grad():
        base = reference_model(ids).logits
    model = tiny_model(model_type, attn_implementation=attn_implementation)
    config = LiSAConfig(share_layers=SHARE, rank=4, align_hidden=0, init_lowrank="zero", align_init_permutations=PERMS)
    peft_model = get_peft_model(model, config).eval()
    with torch.no_grad():
        got = peft_model(ids).logits
    # The reference must be able to tell: it differs from the base model and from P applied transposed.
    assert (expected - base).abs().max() > 0.03
    assert (expected - transposed).abs().max() > 0.03
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_untrained_ffn_alignment_is_direct_sharing_too():
    """W2 starts at zero, so an untrained FFN alignment (align_hidden=None -> 4H) is the permutation alone."""
    ids = random_ids(2, 12)
    expected = direct_sharing_reference(tiny_model("qwen3", attn_implementation="eager"), ids, SHARE, PERMS)
    config = LiSAConfig(share_layers=SHARE, rank=4, align_hidden=None, align_init_permutations=PERMS)
    peft_model = get_peft_model(tiny_model("qwen3"), config).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, expected, atol=1e-5, rtol=1e-5)


def trained_config(align_hidden=None) -> LiSAConfig:
    return LiSAConfig(
        share_layers=SHARE, rank=4, align_hidden=align_hidden, init_lowrank="random", align_init_permutations=PERMS
    )


def trained_lisa(model_type: str, attn_implementation: str = "sdpa", align_hidden=None, seed: int = 0):
    """An adapter on ``SHARE`` with every LiSA parameter given random, trained-like values."""
    model = tiny_model(model_type, attn_implementation=attn_implementation)
    peft_model = get_peft_model(model, trained_config(align_hidden))
    randomize_adapter(peft_model, seed=seed)
    return peft_model.eval()


def positions_of(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded batch: the real tokens of every row count from 0."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def prefill_and_decode(model, ids: torch.Tensor, mask: torch.Tensor, new_tokens: torch.Tensor) -> torch.Tensor:
    """Logits of a cached prefill of ``ids`` and then one cached decode step per column of ``new_tokens``:
    B x (T + n) x V."""
    positions = positions_of(mask)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        logits, cache = [out.logits], out.past_key_values
        for step in range(new_tokens.shape[1]):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            positions = positions[:, -1:] + 1
            out = model(
                input_ids=new_tokens[:, step : step + 1],
                attention_mask=mask,
                position_ids=positions,
                cache=cache,
                use_cache=True,
            )
            logits.append(out.logits)
            cache = out.past_key_values
            assert cache.get_seq_length() == mask.shape[1], "the decode step must run on the cache"
    return torch.cat(logits, dim=1)


@pytest.mark.usefixtures("shared_logits_route")
@pytest.mark.parametrize("merged", [False, True], ids=["adapter", "merged"])
@pytest.mark.parametrize(
    ("model_type", "attn_implementation"), [(arch, "sdpa") for arch in ARCHS] + [("llama", "eager")]
)
def test_left_padding_changes_nothing_on_the_real_tokens(model_type, attn_implementation, merged):
    """A trained adapter on a left-padded batch: the real tokens of each row get the logits of that row run alone
    without padding, in the prefill and in three cached decode steps (shared layers must mask the padding); the
    cached steps equal a no-cache forward."""
    model = trained_lisa(model_type, attn_implementation)
    if merged:
        model = model.merge_and_unload()
    ids, mask = left_padded_batch()
    pad = int((mask[1] == 0).sum())
    new_tokens = torch.tensor([[5, 9, 17], [7, 11, 3]])
    batched = prefill_and_decode(model, ids, mask, new_tokens)
    full_mask = torch.cat([mask, torch.ones_like(new_tokens)], dim=1)
    with torch.no_grad():  # the cached decode steps against one no-cache forward
        full = model(
            input_ids=torch.cat([ids, new_tokens], dim=1),
            attention_mask=full_mask,
            position_ids=positions_of(full_mask),
            use_cache=False,
        ).logits
    torch.testing.assert_close(batched[1:, pad:], full[1:, pad:], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(batched[:1], full[:1], atol=1e-4, rtol=1e-4)
    for row, start in ((0, 0), (1, pad)):
        alone = prefill_and_decode(
            model, ids[row : row + 1, start:], mask[row : row + 1, start:], new_tokens[row : row + 1]
        )
        torch.testing.assert_close(batched[row : row + 1, start:], alone, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # a test only if the padding would change something unmasked
        unmasked = prefill_and_decode(model, ids[1:], torch.ones_like(mask[1:]), new_tokens[1:])
    assert (unmasked[:, pad:] - batched[1:, pad:]).abs().max() > 1e-3


def assert_cached_generation_equals_uncached(model, ids: torch.Tensor, mask: torch.Tensor, new: int) -> None:
    """Greedy generation with and without the cache: same tokens, and every step's logits equal (atol 1e-4)."""
    kwargs = dict(
        attention_mask=mask,
        max_new_tokens=new,
        do_sample=False,
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
    )
    with torch.no_grad():
        cached = model.generate(input_ids=ids, use_cache=True, **kwargs)
        uncached = model.generate(input_ids=ids, use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, uncached.sequences)
    assert len(cached.logits) == len(uncached.logits) == new
    for with_cache, without_cache in zip(cached.logits, uncached.logits, strict=True):
        torch.testing.assert_close(with_cache, without_cache, atol=1e-4, rtol=1e-4)


@pytest.mark.usefixtures("shared_logits_route")
@pytest.mark.parametrize("merged", [False, True], ids=["adapter", "merged"])
@pytest.mark.parametrize("model_type", ARCHS)
def test_generated_step_logits_equal_a_no_cache_forward(model_type, merged):
    """Greedy cached generation on a left-padded batch: each step's logits (not only the tokens) equal the logits of
    one no-cache forward over the generated sequence, atol 1e-4."""
    model = trained_lisa(model_type)
    if merged:
        model = model.merge_and_unload()
    ids, mask = left_padded_batch()
    new = 6
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new,
            do_sample=False,
            pad_token_id=0,
            use_cache=True,
            output_logits=True,
            return_dict_in_generate=True,
        )
        full_mask = torch.cat([mask, torch.ones(mask.shape[0], new, dtype=mask.dtype)], dim=1)
        full = model(
            input_ids=out.sequences, attention_mask=full_mask, position_ids=positions_of(full_mask), use_cache=False
        ).logits
    assert len(out.logits) == new
    prompt = ids.shape[1]
    for step, step_logits in enumerate(out.logits):
        torch.testing.assert_close(step_logits, full[:, prompt - 1 + step], atol=1e-4, rtol=1e-4)


@pytest.mark.usefixtures("shared_logits_route")
@pytest.mark.parametrize("align_hidden", [None, 3])
@pytest.mark.parametrize("model_type", ARCHS)
def test_merged_equals_adapter_with_every_parameter_trained(model_type, align_hidden):
    """FFN alignment with P, W1, b1, W2, b2 and both low-rank factors all trained: the merged model keeps each of
    them and gives the adapter's logits (unpadded and left-padded)."""
    peft_model = trained_lisa(model_type, align_hidden=align_hidden)
    trained = {n: p.detach().clone() for n, p in peft_model.named_parameters() if ".lisa_" in n}
    assert {n.split(".lisa_substitute.default.")[1] for n in trained} == LISA_PARAMETERS
    assert all(bool((p != 0).all()) for p in trained.values()), "every parameter must be trained (non-zero)"
    ids = random_ids(2, 12)
    padded, mask = left_padded_batch()
    with torch.no_grad():
        expected = peft_model(ids).logits
        expected_padded = peft_model(input_ids=padded, attention_mask=mask).logits
        # W2 matters: a merge that dropped it would be seen (likewise b2, the other FFN parameter starting at zero)
        for suffix in ("align.down.weight", "align.out_bias"):
            saved = {n: p.clone() for n, p in peft_model.named_parameters() if n.endswith(suffix)}
            for n, p in peft_model.named_parameters():
                if n in saved:
                    p.zero_()
            assert (peft_model(ids).logits - expected).abs().max() > 1e-3, suffix
            for n, p in peft_model.named_parameters():
                if n in saved:
                    p.copy_(saved[n])
    merged = peft_model.merge_and_unload()
    for idx in SHARE:
        attn = merged.model.layers[idx].self_attn
        for name in LISA_PARAMETERS:
            key = next(n for n in trained if f".layers.{idx}." in n and n.endswith(f".lisa_substitute.default.{name}"))
            assert torch.equal(attn.get_parameter(name), trained[key]), (idx, name)
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            merged(input_ids=padded, attention_mask=mask).logits, expected_padded, atol=1e-5, rtol=1e-5
        )


@pytest.mark.usefixtures("shared_logits_route")
def test_bf16_merged_model_error_is_bounded():
    """bf16 merge: the merged model differs from the adapter only by the roundings the merge adds.

    1. With the same bf16 weights (the whole adapter cast to bf16, then merged) the merged model runs the very same
       functions on the same weights, so its logits equal the adapter's exactly.
    2. The usual path: a bf16 base with the float32 LiSA modules peft keeps (autocast_adapter_dtype), merged into a
       bf16 model. The merge rounds the LiSA weights to bf16 (relative error <= 2^-9) and computes the rank-r Q/K in
       bf16; the logits handed on and the alignment stay float32. Those are the same kinds of rounding the bf16 base
       already applies to every other projection, so the bound is: ``max |merged - adapter| <= 2 * e_bf16``, where
       ``e_bf16 = max |adapter on the bf16 base - adapter in float32|`` is what bf16 already costs the adapter
       (measured ratio 0.3-1.6 over 18 seeds / architectures; this case ~0.65). A merge that loses W2 or any other
       trained parameter changes the logits by far more than the bound.
    """
    ids = random_ids(2, 16, seed=10)
    fp32_adapter = trained_lisa("qwen3", align_hidden=None)
    lisa_state = {k: v for k, v in fp32_adapter.state_dict().items() if ".lisa_" in k}
    with torch.no_grad():
        fp32_logits = fp32_adapter(ids).logits

    # 1. Same bf16 weights: exactly equal.
    bf16_adapter = trained_lisa("qwen3", align_hidden=None).to(torch.bfloat16)
    with torch.no_grad():
        bf16_logits = bf16_adapter(ids).logits
    bf16_merged = bf16_adapter.merge_and_unload()
    with torch.no_grad():
        assert torch.equal(bf16_merged(ids).logits, bf16_logits)

    # 2. float32 LiSA on a bf16 base, merged into bf16.
    mixed = get_peft_model(tiny_model("qwen3").to(torch.bfloat16), trained_config()).eval()
    assert all(p.dtype == torch.float32 for n, p in mixed.named_parameters() if ".lisa_" in n)
    missing = mixed.load_state_dict(lisa_state, strict=False).missing_keys
    assert not [k for k in missing if ".lisa_" in k]
    with torch.no_grad():
        mixed_logits = mixed(ids).logits.float()
        without_w2 = {n: p.clone() for n, p in mixed.named_parameters() if n.endswith("align.down.weight")}
        for n, p in mixed.named_parameters():
            if n in without_w2:
                p.zero_()
        dropped_w2 = (mixed(ids).logits.float() - mixed_logits).abs().max().item()
        for n, p in mixed.named_parameters():
            if n in without_w2:
                p.copy_(without_w2[n])
    merged = mixed.merge_and_unload()
    assert all(p.dtype == torch.bfloat16 for p in merged.parameters())
    with torch.no_grad():
        merged_logits = merged(ids).logits.float()
    e_bf16 = (mixed_logits - fp32_logits).abs().max().item()
    merge_error = (merged_logits - mixed_logits).abs().max().item()
    assert 0 < merge_error <= 2 * e_bf16, (merge_error, e_bf16)
    assert dropped_w2 > 4 * e_bf16, "the bound must be tight enough to see a lost parameter"
