"""``peft_lisa.generated_text``: the model's own sampled text and mixing it into training data, on a tiny random
model and word-level tokenizer."""

from __future__ import annotations

import pytest
import torch

from peft_lisa.data import chat_dataset, text_dataset
from peft_lisa.evaluation import generate_samples
from peft_lisa.generated_text import GENERIC_PROMPTS, mix_texts, mixed_dataset, sample_answers, sample_texts

from .conftest import tiny_model
from .test_training import random_conversations, random_texts, tiny_tokenizer

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


# --------------------------------------------------------------------------------------------------------------
# Answers to prompts, and mixing them into training data
# --------------------------------------------------------------------------------------------------------------


def token_count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1  # + the EOS that packing puts between


def test_sample_answers_stop_at_the_token_count_and_pair_each_answer_with_its_prompt(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    pairs = sample_answers(model, tokenizer, 60, PROMPTS, batch_size=3, max_new_tokens=8)
    counts = [token_count(tokenizer, answer) for _, answer in pairs]
    assert len(pairs) % 3 == 0 and sum(counts) >= 60 and sum(counts[:-3]) < 60  # whole batches, no more than needed
    # Batch after batch, each starting at the next prompt: answer i answers prompt i mod 4.
    assert [prompt for prompt, _ in pairs] == [PROMPTS[i % len(PROMPTS)] for i in range(len(pairs))]
    # Each batch is sample_texts of its prompts with the batch's own seed; the whole is deterministic.
    first = sample_texts(model, tokenizer, 3, 8, prompts=PROMPTS[:3], seed=0, batch_size=3)
    assert [answer for _, answer in pairs[:3]] == first
    assert sample_answers(model, tokenizer, 60, PROMPTS, batch_size=3, max_new_tokens=8) == pairs
    with pytest.raises(ValueError, match="min_tokens >= 1"):
        sample_answers(model, tokenizer, 0, PROMPTS)
    with pytest.raises(ValueError, match="min_tokens >= 1 and prompts"):
        sample_answers(model, tokenizer, 10, [])


@pytest.mark.parametrize("fraction", [0.5, 0.2])
def test_mix_texts_make_the_share_of_tokens_throughout_and_keep_the_data_in_order(fraction):
    tokenizer = tiny_tokenizer()
    texts = random_texts(40, seed=1, words=20)  # words w0..w19
    answers = [" ".join(f"w{50 + (i + j) % 10}" for j in range(5 + 3 * i)) for i in range(5)]  # w50..w59 only
    mixed = mix_texts(tokenizer, texts, answers, fraction)
    own = [text for text in mixed if text in texts]
    extra = [text for text in mixed if text not in texts]
    assert own == texts  # every document once, in its order
    assert extra == [answers[i % len(answers)] for i in range(len(extra))]  # the answers, cycled in order
    sizes = [token_count(tokenizer, text) for text in mixed]
    is_extra = [text not in texts for text in mixed]
    share = sum(s for s, e in zip(sizes, is_extra, strict=True) if e) / sum(sizes)
    assert share == pytest.approx(fraction, abs=0.02)
    # Interleaved, not appended: the first half of the tokens holds the share too.
    half, seen, extra_seen = sum(sizes) / 2, 0, 0
    for size, e in zip(sizes, is_extra, strict=True):
        if seen >= half:
            break
        seen, extra_seen = seen + size, extra_seen + size * e
    assert extra_seen / seen == pytest.approx(fraction, abs=0.05)
    for bad in (0.0, 1.0):
        with pytest.raises(ValueError, match=r"must be in \(0, 1\)"):
            mix_texts(tokenizer, texts, answers, bad)
    with pytest.raises(ValueError, match="empty list"):
        mix_texts(tokenizer, texts, [], 0.5)


def test_mixed_dataset_for_text_and_chat_data():
    tokenizer = tiny_tokenizer()
    pairs = [("w1 w2", "w60 w61 w62"), ("w3", "w63 w64")]
    text = mixed_dataset(text_dataset(random_texts(10)), tokenizer, pairs, 0.5)
    assert text.column_names == ["text"] and {"w60 w61 w62", "w63 w64"} <= set(text["text"])
    conversations = random_conversations(10)
    chat = mixed_dataset(chat_dataset(conversations), tokenizer, pairs, 0.3)
    assert chat.column_names == ["messages"]
    added = [m for m in chat["messages"] if m not in conversations]
    assert added[:2] == [
        [{"role": "user", "content": "w1 w2"}, {"role": "assistant", "content": "w60 w61 w62"}],
        [{"role": "user", "content": "w3"}, {"role": "assistant", "content": "w63 w64"}],
    ]
    assert [m for m in chat["messages"] if m in conversations] == conversations
