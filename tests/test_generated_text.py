"""``peft_lisa.data.sample_texts``: the model's own sampled text, on a tiny random model and word-level tokenizer."""

from __future__ import annotations

import pytest
import torch

from peft_lisa.data import GENERIC_PROMPTS, sample_texts
from peft_lisa.evaluation import generate_samples

from .conftest import tiny_model
from .test_training import tiny_tokenizer

PROMPTS = ["w1 w2 w3", "w4 w5", "w6 w7 w8 w9", "w10"]


@pytest.fixture
def model_and_tokenizer():
    tokenizer = tiny_tokenizer()
    # The model's vocabulary is the tokenizer's: every sampled id decodes to a word.
    return tiny_model(vocab_size=len(tokenizer)), tokenizer


def test_count_length_and_determinism(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    texts = sample_texts(model, tokenizer, 6, max_new_tokens=12, prompts=PROMPTS, seed=3, batch_size=4)
    assert len(texts) == 6 and all(isinstance(text, str) and text for text in texts)
    assert all(len(text.split()) <= 12 for text in texts)
    # The same seed (and batch size) gives the same texts; the global RNG is not disturbed.
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    again = sample_texts(model, tokenizer, 6, max_new_tokens=12, prompts=PROMPTS, seed=3, batch_size=4)
    assert again == texts
    assert torch.equal(torch.rand(3), expected)
    other = sample_texts(model, tokenizer, 6, max_new_tokens=12, prompts=PROMPTS, seed=4, batch_size=4)
    assert other != texts
    # Sampled, not greedy: texts of one prompt differ between its occurrences (prompts are cycled).
    assert texts[0] != texts[4]


def test_texts_are_the_models_answers_not_the_prompts(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    # At a tiny temperature, sampling is greedy decoding: the same answers as generate_samples (chat-wrapped
    # prompts, new text only), and not the prompts or the template.
    cold = sample_texts(model, tokenizer, len(PROMPTS), max_new_tokens=10, prompts=PROMPTS, temperature=1e-4)
    greedy = generate_samples(model, tokenizer, PROMPTS, max_new_tokens=10)
    assert cold == greedy
    for prompt, text in zip(PROMPTS, cold, strict=True):
        assert not text.startswith(prompt) and "user" not in text.split() and "assistant" not in text.split()
    # A different model writes different text: the texts come from the model.
    other = sample_texts(tiny_model(vocab_size=len(tokenizer), seed=1), tokenizer, 4, 10, PROMPTS, temperature=1e-4)
    assert other != cold


def test_temperature_one_follows_the_models_distribution(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    tokenizer.chat_template = None  # plain sampling from BOS
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)  # a peaked next-token distribution: top probabilities about 0.41, 0.18, 0.17
        probs = model(torch.tensor([[tokenizer.bos_token_id]])).logits[0, -1].softmax(-1)
    texts = sample_texts(model, tokenizer, 200, max_new_tokens=1, batch_size=50)
    # The first sampled words' frequencies are the model's probabilities at temperature 1 (greedy decoding would
    # give the top word every time, temperature 0.5 about 0.7 of the time).
    for prob, token_id in zip(*probs.topk(3), strict=True):
        word = tokenizer.decode([token_id])
        assert word and sum(text == word for text in texts) / len(texts) == pytest.approx(prob.item(), abs=0.1)
    cold = sample_texts(model, tokenizer, 200, max_new_tokens=1, batch_size=50, temperature=0.5)
    assert sum(text == tokenizer.decode([probs.argmax()]) for text in cold) / len(cold) > 0.6


def test_chat_default_prompts_and_errors(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    assert len(GENERIC_PROMPTS) == 32 and len(set(GENERIC_PROMPTS)) == 32
    assert not any(word in " ".join(GENERIC_PROMPTS).lower() for word in ("license", "licence", "legal", "law"))
    assert len(sample_texts(model, tokenizer, 3, max_new_tokens=4)) == 3
    with pytest.raises(ValueError, match="num_texts"):
        sample_texts(model, tokenizer, 0)
    with pytest.raises(ValueError, match="temperature"):
        sample_texts(model, tokenizer, 2, temperature=0.0)
    with pytest.raises(ValueError, match="empty prompts"):
        sample_texts(model, tokenizer, 2, prompts=[])
