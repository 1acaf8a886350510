"""Sliding-window perplexity and greedy sample generation (``peft_lisa.evaluation``) on tiny models."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model

from peft_lisa import LiSAConfig
from peft_lisa.evaluation import (
    DEFAULT_PROMPTS,
    PerplexityResult,
    copying_nll,
    generate_samples,
    perplexity,
    precision_agreement,
    repeated_ngram,
    sliding_windows,
)

from .conftest import randomize_adapter, tiny_model
from .test_training import random_texts, tiny_tokenizer


def stream(tokenizer, texts) -> torch.Tensor:
    return torch.tensor(tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"])


def test_perplexity_is_exp_mean_nll_with_one_window():
    model, tokenizer = tiny_model(), tiny_tokenizer()
    texts = random_texts(3, seed=5)
    ids = stream(tokenizer, texts)
    assert 40 < len(ids) < 256
    with torch.no_grad():
        logits = model(input_ids=ids[None]).logits[0]
    nll = F.cross_entropy(logits[:-1], ids[1:]).item()
    result = perplexity(model, tokenizer, texts, window=256, stride=128, progress=False)
    assert isinstance(result, PerplexityResult)
    assert result.num_tokens == len(ids) - 1
    assert result.nll == pytest.approx(nll, rel=1e-5)
    assert result.ppl == pytest.approx(math.exp(nll), rel=1e-5)
    assert (result.window, result.stride) == (256, 128)
    assert result.to_dict()["ppl"] == result.ppl


@pytest.mark.parametrize(("num_tokens", "window", "stride"), [(100, 16, 8), (101, 16, 5), (16, 16, 4), (17, 8, 1)])
def test_sliding_windows_score_every_token_once(num_tokens, window, stride):
    windows = sliding_windows(num_tokens, window, stride)
    scored = [t for _, end, first in windows for t in range(first, end)]
    assert scored == list(range(1, num_tokens))  # every token but the first, once, in order
    for index, (begin, end, first) in enumerate(windows):
        assert end - begin <= window and begin < first
        if index:  # after the first window, every scored token has >= window - stride tokens of context
            assert first - begin >= min(window - stride, first)
    assert windows[-1][1] == num_tokens


def test_sliding_window_perplexity_matches_a_hand_computation():
    model, tokenizer = tiny_model(), tiny_tokenizer()
    texts = random_texts(4, seed=7)
    ids = stream(tokenizer, texts)
    window, stride = 32, 12
    total, count, previous_end = 0.0, 0, 0
    with torch.no_grad():
        for begin in range(0, len(ids), stride):  # the Hugging Face guide's loop, written out
            end = min(begin + window, len(ids))
            new = end - max(previous_end, begin + 1)
            logits = model(input_ids=ids[None, begin:end]).logits[0]
            total += F.cross_entropy(logits[-new - 1 : -1], ids[end - new : end], reduction="sum").item()
            count += new
            previous_end = end
            if end == len(ids):
                break
    batched = perplexity(model, tokenizer, texts, window=window, stride=stride, batch_size=3, progress=False)
    single = perplexity(model, tokenizer, texts, window=window, stride=stride, batch_size=1, progress=False)
    assert batched.num_tokens == count == len(ids) - 1
    assert batched.nll == pytest.approx(total / count, rel=1e-5)
    assert single.nll == pytest.approx(batched.nll, rel=1e-5)
    # More context per scored token (a smaller stride) changes the number, not the token count.
    assert perplexity(model, tokenizer, texts, window=window, stride=4, progress=False).num_tokens == count
    # max_tokens evaluates a prefix of the stream.
    prefix = perplexity(model, tokenizer, texts, window=window, stride=stride, max_tokens=50, progress=False)
    assert prefix.num_tokens == 49


class NoLogitsToKeep(torch.nn.Module):
    """A causal LM whose forward has no ``logits_to_keep``: the perplexity must run its LM head everywhere."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache)


def test_perplexity_runs_the_lm_head_only_where_it_scores():
    model, tokenizer = tiny_model(), tiny_tokenizer()
    texts = random_texts(6, seed=3)
    window, stride = 32, 8
    head_rows = []
    model.lm_head.register_forward_hook(lambda module, args, output: head_rows.append(args[0].shape[:2].numel()))
    trimmed = perplexity(model, tokenizer, texts, window=window, stride=stride, batch_size=4, progress=False)
    windows = sliding_windows(len(stream(tokenizer, texts)), window, stride)
    # every scored prediction, plus each window's unused last position; the first window's batch is wider
    assert sum(head_rows) <= trimmed.num_tokens + 4 * (window - stride) + len(windows)
    assert sum(head_rows) < sum(end - begin for begin, end, _ in windows) / 2
    head_rows.clear()
    full = perplexity(
        NoLogitsToKeep(model), tokenizer, texts, window=window, stride=stride, batch_size=4, progress=False
    )
    assert sum(head_rows) == sum(end - begin for begin, end, _ in windows)
    assert full.nll == pytest.approx(trimmed.nll, rel=1e-6)
    assert full.num_tokens == trimmed.num_tokens


def test_perplexity_of_peft_merged_and_disabled_models():
    tokenizer, texts = tiny_tokenizer(), random_texts(4, seed=2)
    base = tiny_model()
    base_ppl = perplexity(base, tokenizer, texts, window=32, stride=16, progress=False).ppl
    peft_model = get_peft_model(base, LiSAConfig(share_layers=[2, 3], rank=4))
    randomize_adapter(peft_model)
    peft_ppl = perplexity(peft_model, tokenizer, texts, window=32, stride=16, progress=False).ppl
    with peft_model.disable_adapter():
        assert perplexity(peft_model, tokenizer, texts, window=32, stride=16, progress=False).ppl == pytest.approx(
            base_ppl, rel=1e-6
        )
    assert abs(peft_ppl - base_ppl) > 1e-4  # the (random) adapter is active
    merged = peft_model.merge_and_unload()
    assert perplexity(merged, tokenizer, texts, window=32, stride=16, progress=False).ppl == pytest.approx(
        peft_ppl, rel=1e-4
    )


def test_precision_agreement_against_a_hand_computation():
    """The KL and perplexities of a merged LiSA model in bf16 against itself in float32, on disjoint windows of the
    stream, recomputed here from the two models' logits; float32 against float32 agrees (within 1e-7); the model
    passed in is left in float32, and a model not in float32 is refused."""
    tokenizer, texts = tiny_tokenizer(), random_texts(6, seed=3)
    peft_model = get_peft_model(tiny_model(), LiSAConfig(share_layers=[2, 3], rank=4))
    randomize_adapter(peft_model)
    merged = peft_model.merge_and_unload().eval()
    window, windows = 24, 3
    ids = stream(tokenizer, texts)[: window * windows].view(windows, window)
    with torch.no_grad():
        reference = merged(ids).logits[:, :-1].float().log_softmax(-1)
        lowered = copy.deepcopy(merged).bfloat16()(ids).logits[:, :-1].float().log_softmax(-1)
    kl = (reference.exp() * (reference - lowered)).sum(-1)
    got = precision_agreement(
        merged, tokenizer, texts, window=window, num_windows=windows, batch_size=2, progress=False
    )
    assert got.num_tokens == windows * (window - 1) and got.dtype == "bfloat16"
    assert got.kl_mean == pytest.approx(kl.mean().item(), rel=1e-5) and got.kl_max == pytest.approx(kl.max().item())
    assert got.kl_mean > 0
    targets = ids[:, 1:, None]
    assert got.ppl_float32 == pytest.approx(math.exp(-reference.gather(-1, targets).mean().item()), rel=1e-6)
    assert got.ppl == pytest.approx(math.exp(-lowered.gather(-1, targets).mean().item()), rel=1e-6)
    assert all(param.dtype == torch.float32 for param in merged.parameters())
    same = precision_agreement(
        merged, tokenizer, texts, torch.float32, window=window, num_windows=windows, progress=False
    )
    assert same.kl_mean == pytest.approx(0.0, abs=1e-7) and same.ppl == pytest.approx(same.ppl_float32, rel=1e-6)
    with pytest.raises(ValueError, match="pass it in float32"):
        precision_agreement(merged.bfloat16(), tokenizer, texts, window=window, progress=False)
    with pytest.raises(ValueError, match="fewer than one window"):
        precision_agreement(tiny_model(), tokenizer, texts[:1], window=100_000, progress=False)


def test_perplexity_errors():
    model, tokenizer = tiny_model(), tiny_tokenizer()
    with pytest.raises(ValueError, match="no non-empty texts"):
        perplexity(model, tokenizer, [], progress=False)
    with pytest.raises(ValueError, match="no non-empty texts"):
        perplexity(model, tokenizer, ["", "  \n"], progress=False)
    with pytest.raises(ValueError, match="at least 2"):
        perplexity(model, tokenizer, ["w1"], progress=False)
    with pytest.raises(ValueError, match="stride"):
        perplexity(model, tokenizer, random_texts(2), window=16, stride=32, progress=False)
    with pytest.raises(ValueError, match="window"):
        perplexity(model, tokenizer, random_texts(2), window=1, stride=1, progress=False)


class _Copier(torch.nn.Module):
    """A causal LM stand-in that puts probability ``hit`` on the token ``offset`` positions back (the rest spread
    uniformly) and predicts uniformly before that, and where it predicts token ``offset`` itself (the start of the
    repeat)."""

    def __init__(self, vocab_size: int, offset: int, hit: float) -> None:
        super().__init__()
        self.config = SimpleNamespace(vocab_size=vocab_size)
        self.offset, self.hit = offset, hit
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the stand-in a device

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False) -> SimpleNamespace:
        runs, length = input_ids.shape
        vocab, offset = self.config.vocab_size, self.offset
        probs = torch.full((runs, length, vocab), 1.0 / vocab)
        # Position p predicts token p + 1; a copy of token p + 1 - offset. Positions offset .. length - 2 copy.
        copying = probs[:, offset : length - 1]
        copying.mul_(1 - self.hit).scatter_add_(
            -1, input_ids[:, 1 : length - offset, None], torch.full((runs, length - offset - 1, 1), self.hit)
        )
        return SimpleNamespace(logits=probs.log())


def test_copying_nll_scores_the_second_occurrence_but_its_first_token():
    vocab, length = 1000, 16
    # A model that copies from `length` back puts probability 0.9 (+ 0.1 / vocab) on every scored token; it predicts
    # the first token of the repeat uniformly, which must not be scored.
    copied = copying_nll(_Copier(vocab, offset=length, hit=0.9), length=length, runs=3)
    assert copied == pytest.approx(-math.log(0.9 + 0.1 / vocab), rel=1e-5)
    # One that copies from the wrong distance, and one that never copies, score log(vocab) or about it.
    for model in (_Copier(vocab, offset=length - 1, hit=0.9), _Copier(vocab, offset=length, hit=0.0)):
        assert copying_nll(model, length=length, runs=3) > math.log(vocab) - 0.05
    with pytest.raises(ValueError, match="length must be >= 2"):
        copying_nll(_Copier(vocab, offset=2, hit=0.5), length=1)
    with pytest.raises(ValueError, match="first_id"):
        copying_nll(_Copier(100, offset=2, hit=0.5), length=4)


def test_copying_nll_of_a_lisa_model_against_its_base():
    base = tiny_model()
    base_nll = copying_nll(base, length=24, runs=2, first_id=4)
    peft_model = get_peft_model(base, LiSAConfig(share_layers=[2, 3], rank=4))
    randomize_adapter(peft_model)
    with peft_model.disable_adapter():
        assert copying_nll(peft_model, length=24, runs=2, first_id=4) == pytest.approx(base_nll, rel=1e-6)
    assert copying_nll(peft_model, length=24, runs=2, first_id=4) != pytest.approx(base_nll, rel=1e-4)
    peft_model.train()
    copying_nll(peft_model, length=24, runs=2, first_id=4)
    assert peft_model.training  # its mode is restored


def test_generate_samples_greedy_left_padded():
    model, tokenizer = tiny_model(), tiny_tokenizer()
    peft_model = get_peft_model(model, LiSAConfig(share_layers=[2, 3], rank=4))
    randomize_adapter(peft_model)
    prompts = ["w1 w2 w3 w4 w5 w6", "w7"]
    padding_side = tokenizer.padding_side
    batched = generate_samples(peft_model, tokenizer, prompts, max_new_tokens=6)
    assert tokenizer.padding_side == padding_side  # restored
    assert len(batched) == 2 and all(isinstance(text, str) for text in batched)
    # Left padding: the short prompt's completion does not depend on its batch mate.
    assert generate_samples(peft_model, tokenizer, prompts[1:], max_new_tokens=6) == batched[1:]
    assert generate_samples(peft_model, tokenizer, prompts, max_new_tokens=6) == batched  # greedy: deterministic
    assert generate_samples(peft_model, tokenizer, []) == []
    assert len(DEFAULT_PROMPTS) >= 3


def test_repeated_ngram_flags_looping_generations_only():
    # The generations of the issue that opened calibration, and answers that do not loop.
    assert repeated_ngram("A decorator decorator decorator decorator ...") == "decorator"
    assert repeated_ngram("a tuple is a tuple in Python, tuple, tuple, tuple") == "tuple"
    assert repeated_ngram("It is used to be used to be used to be") == "used to be"
    assert repeated_ngram("The sea is blue. The sea is calm. The sea is deep.") == "the sea is"
    assert repeated_ngram("A decorator is a function that takes another function and extends its behaviour.") is None
    assert repeated_ngram("Waves fold on the shore, salt wind carries gull cries, the tide keeps its time.") is None
    assert repeated_ngram("") is None
