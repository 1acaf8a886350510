"""No forward of a LiSA adapter or merged model allocates a T_q x T_k tensor (``docs/method.md``, "Fused attention
of a shared layer"): every tensor an operator returns is watched, and a long input must never produce one with two
dimensions as large as the sequence.

The base model (sdpa, no padding) allocates none either, so a merged model's peak memory can stay at the base's.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import get_peft_model
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM, DynamicCache

from peft_lisa import LiSAConfig
from tests.conftest import random_ids, randomize_adapter, tiny_model

LONG = 600  # more than two query blocks of the explicit path, so blocks (256 x T) stay below the bound


class QuadraticTensorWatch(TorchDispatchMode):
    """Records every operator output with at least two dimensions of size >= ``length`` (a T x T tensor)."""

    def __init__(self, length: int) -> None:
        super().__init__()
        self.length = length
        self.found: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor) and sum(size >= self.length for size in tensor.shape) >= 2:
                self.found.append((str(func), tuple(tensor.shape)))
        return out


def quadratic_tensors(model, ids: torch.Tensor, decode_steps: int = 0) -> list[tuple[str, tuple[int, ...]]]:
    """Prefill ``ids`` through a cache, then decode a few tokens, recording T x T tensors."""
    watch = QuadraticTensorWatch(ids.shape[1])
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), watch:
        out = model(ids, cache=cache, use_cache=True)
        for _ in range(decode_steps):
            out = model(out.logits[:, -1:].argmax(-1), past_key_values=out.past_key_values, use_cache=True)
    return watch.found


def long_model(**overrides):
    return tiny_model("llama", max_position_embeddings=2 * LONG, **overrides)


def test_the_watch_sees_the_base_models_eager_attention():
    """The check can fail: eager attention materialises B x H x T x T weights."""
    found = quadratic_tensors(long_model(attn_implementation="eager"), random_ids(1, LONG))
    assert found, "eager attention must allocate T x T tensors; the watch saw none"


def test_base_sdpa_model_allocates_no_quadratic_tensor():
    assert quadratic_tensors(long_model(), random_ids(1, LONG), decode_steps=2) == []


@pytest.mark.parametrize("align_hidden", [0, 3])
@pytest.mark.parametrize("merged", [False, True], ids=["adapter", "merged"])
def test_lisa_forward_allocates_no_quadratic_tensor(align_hidden, merged):
    """A chain of shared layers (2, 3, 4) with a trained adapter, prefill and decode: no T x T tensor anywhere."""
    config = LiSAConfig(share_layers=[2, 3, 4], rank=4, align_hidden=align_hidden)
    model = get_peft_model(long_model(), config)
    randomize_adapter(model)
    if merged:
        model = model.merge_and_unload()
    assert quadratic_tensors(model, random_ids(1, LONG), decode_steps=2) == []


class ExpandedWeightWatch(TorchDispatchMode):
    """Records every ``bmm`` whose second operand holds matrices of at least ``numel`` elements: a weight expanded
    over the batch, which torch's CPU ``bmm`` copies once per sequence in bf16, inside the kernel where no dispatch
    sees the copy (SmolLM2's LM head: 54 MiB and about 40 ms per sequence, ``docs/method.md``)."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.numel = numel
        self.found: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.bmm.default:
            other = args[1]
            if other[0].numel() >= self.numel:
                self.found.append(tuple(other.shape))
        return func(*args, **(kwargs or {}))


def expanded_lm_head_products(model, length: int = 16) -> list[tuple[int, ...]]:
    """Prefills of 1 and of 4 sequences of ``length`` tokens with only the last token's logits, as ``generate`` runs
    them, recording products against the LM head's weight expanded over the batch."""
    watch = ExpandedWeightWatch(model.lm_head.weight.numel())
    with torch.no_grad(), watch:
        for batch in (1, 4):
            model(random_ids(batch, length), use_cache=True, logits_to_keep=1)
    return watch.found


def test_a_frozen_models_prefill_multiplies_by_an_expanded_lm_head():
    """The check can fail: torch's ``matmul`` folds the last-token slice of a prefill (B x 1 x d, strides of
    B x T x d) into one ``mm`` only when the weight requires grad (or the slice is contiguous); otherwise it runs
    ``bmm`` against the weight expanded over the batch. A torch that folds it anyway fails this test, not the
    library."""
    model = tiny_model()
    assert expanded_lm_head_products(model) == []  # as loaded: parameters require grad
    model.requires_grad_(False)
    assert expanded_lm_head_products(model), "a frozen model's prefill must run bmm on its LM head; the watch saw none"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_adapter_models_prefill_multiplies_by_its_lm_head_as_one_product(dtype):
    """peft freezes the base of an adapter model, LM head included: while LiSA is injected its LM head gets a
    contiguous input too, one hook whatever the number of adapters; ``merge_and_unload()`` leaves only the merged
    model's own. ``unload()`` takes it away with the rest of LiSA, and the frozen base it returns runs ``bmm`` again,
    as any model frozen by hand does."""
    model = get_peft_model(tiny_model().to(dtype), LiSAConfig(share_layers=[2, 3], rank=4))
    randomize_adapter(model)
    assert not model.base_model.model.lm_head.weight.requires_grad
    assert expanded_lm_head_products(model.base_model.model) == []
    model.add_adapter("second", LiSAConfig(share_layers=[2, 3], rank=4))
    assert len(model.base_model.model.lm_head._forward_pre_hooks) == 1  # one hook, however many adapters
    merged = copy.deepcopy(model).merge_and_unload()
    assert len(merged.lm_head._forward_pre_hooks) == 1  # the merged model's own; the adapter's is gone
    base = model.unload()
    assert expanded_lm_head_products(base), "unload() must remove the LM-head hook; the watch saw no bmm"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_merged_models_prefill_multiplies_by_its_lm_head_as_one_product(dtype, tmp_path):
    """``merge_and_unload()`` leaves the parameters frozen, as peft does; the merged model's LM head gets a
    contiguous input, so its prefill runs one ``mm`` as the base model's does. So does the reloaded model, frozen
    for inference."""
    model = get_peft_model(tiny_model(), LiSAConfig(share_layers=[2, 3], rank=4))
    randomize_adapter(model)
    merged = model.merge_and_unload().to(dtype)
    assert not any(param.requires_grad for param in merged.parameters())
    assert expanded_lm_head_products(merged) == []
    merged.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dtype).requires_grad_(False)
    assert expanded_lm_head_products(reloaded) == []
