"""Text the model writes itself, and mixing it into training data.

* :data:`GENERIC_PROMPTS`: 32 varied everyday requests (science, cooking, travel, history, stories, programming).
* :func:`sample_texts`: sampled continuations of prompts (pure sampling at a temperature), one batch at a time.
* :func:`sample_answers`: the model's answers to prompts, batch after batch, until they hold a number of tokens.
* :func:`mix_texts` / :func:`mix_conversations`: training documents with the answers cycled in to make a given share
  of the tokens.

Why: a LiSA adapter trained on one domain of plain text (the built-in pydoc text) learns to repeat itself on everyday
prompts; mixing the base model's own answers into its training text keeps it answering them as the base model does
(docs/calibration/objective.md, "Looping on everyday prompts").
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any, Optional, TypeVar

import torch
from tqdm.auto import tqdm

from .data import chat_dataset, is_conversational_dataset, render_conversation, text_dataset

Document = TypeVar("Document")


GENERIC_PROMPTS: tuple[str, ...] = (
    "Tell me about your favourite season and why.",
    "How do plants make their food?",
    "Write a short story about a lost dog finding its way home.",
    "What caused the fall of the Roman Empire?",
    "Give me a simple recipe for tomato soup.",
    "What should I pack for a week-long trip to the mountains?",
    "Explain how a for loop works in programming.",
    "Why is the sky blue?",
    "Describe a busy market in the morning.",
    "What are some tips for getting better sleep?",
    "How does a bicycle stay upright?",
    "Write a poem about the moon.",
    "Who was Marie Curie and what did she discover?",
    "How do I make bread at home?",
    "What are the main sights to see in Rome?",
    "Explain what a variable is to a beginner programmer.",
    "What is photosynthesis?",
    "Tell me a story about a robot who learns to paint.",
    "How did the printing press change the world?",
    "What is a healthy breakfast?",
    "How can I learn a new language quickly?",
    "Describe how volcanoes form.",
    "Write a letter to a friend about your holiday.",
    "What is the difference between weather and climate?",
    "How do you sort a list of numbers?",
    "Why do we have leap years?",
    "What are good exercises for beginners?",
    "Explain how the heart pumps blood.",
    "Describe your ideal weekend.",
    "What was the Industrial Revolution?",
    "How do I cook rice properly?",
    "What is gravity?",
)
"""Varied everyday, science, history, cooking, travel, programming and story requests for :func:`sample_texts`."""


@torch.no_grad()
def sample_texts(
    model: torch.nn.Module,
    tokenizer: Any,
    num_texts: int,
    max_new_tokens: int = 256,
    prompts: Optional[Sequence[str]] = None,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 16,
) -> list[str]:
    """Texts the model writes itself: ``num_texts`` sampled continuations (pure sampling at ``temperature``: no top-k,
    no top-p), e.g. as calibration data of no particular domain.

    Text ``i`` continues prompt ``i % len(prompts)``. With a chat template each prompt is a user turn (with the
    generation prompt) and ``prompts=None`` means :data:`GENERIC_PROMPTS`; without one, prompts are plain text and
    ``prompts=None`` means sampling from the BOS token (EOS if there is none) alone. Only the new text is returned
    (special tokens dropped, ends stripped): the model's own words, without our prompts or the chat markup. Prompts
    are batched ``batch_size`` at a time with left padding; the output is a function of ``seed`` and ``batch_size``
    (the global torch RNG is left as it was).

    Raises:
        ValueError: ``num_texts < 1``, ``max_new_tokens < 1``, ``temperature <= 0``, ``batch_size < 1``, empty
            ``prompts``, or no template, no prompts and no BOS/EOS token to start from.
    """
    if num_texts < 1 or max_new_tokens < 1 or batch_size < 1 or not temperature > 0:
        raise ValueError(
            f"sample_texts() needs num_texts >= 1, max_new_tokens >= 1, batch_size >= 1 and temperature > 0; got "
            f"{num_texts}, {max_new_tokens}, {batch_size}, {temperature}."
        )
    chat = bool(getattr(tokenizer, "chat_template", None))
    if prompts is None:
        prompts = GENERIC_PROMPTS if chat else [""]
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("sample_texts() got an empty prompts list: pass None for the built-in prompts.")
    # The inputs hold their special tokens themselves (the template's, or the start token), so the tokenizer adds none.
    if chat:
        inputs = [
            tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in prompts
        ]
    else:
        start_token = tokenizer.bos_token if tokenizer.bos_token is not None else tokenizer.eos_token
        if start_token is None and not all(prompts):
            raise ValueError("sample_texts(): the tokenizer has no chat template, no BOS and no EOS token to start.")
        inputs = [f"{start_token}{p}" if start_token else p for p in prompts]
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    padding_side, pad_token = tokenizer.padding_side, tokenizer.pad_token
    was_training = model.training
    texts: list[str] = []
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            for first in range(0, num_texts, batch_size):
                batch = [inputs[i % len(inputs)] for i in range(first, min(first + batch_size, num_texts))]
                encoded = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False)
                encoded = {key: value.to(device) for key, value in encoded.items()}
                output = model.generate(
                    **encoded,
                    do_sample=True,
                    temperature=temperature,
                    top_k=0,
                    top_p=1.0,
                    max_new_tokens=max_new_tokens,
                    pad_token_id=pad_id,
                )
                new_tokens = output[:, encoded["input_ids"].shape[1] :]
                texts += [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = padding_side
        if pad_token is None:
            tokenizer.pad_token = pad_token
        model.train(was_training)
    return texts


def sample_answers(
    model: torch.nn.Module,
    tokenizer: Any,
    min_tokens: int,
    prompts: Sequence[str],
    batch_size: int = 24,
    max_new_tokens: int = 256,
    progress: bool = False,
) -> list[tuple[str, str]]:
    """``(prompt, answer)`` pairs: the model's sampled answers (:func:`sample_texts`, temperature 1) to ``prompts``,
    ``batch_size`` at a time (each batch starting at the next prompt, with its own seed) until the answers hold at
    least ``min_tokens`` tokens. Deterministic for given arguments; ``progress`` shows a bar of tokens.

    A round lasts as long as its longest answer, so one wide round is cheaper than several narrow ones: on
    SmolLM2-135M-Instruct (2 threads, the project's 2-core CPU) 24 answers to 16 prompts, 5,631 tokens, took 65 s in
    one round of 24 and 104 s in three rounds of 8 (5,483 tokens); the main job's 4,096 tokens need one round of 24.

    Raises:
        ValueError: ``min_tokens < 1``, empty ``prompts``, or a round of ``batch_size`` answers that adds no token
            (the model ends every answer at once: nothing to mix in).
    """
    prompts = list(prompts)
    if min_tokens < 1 or not prompts:
        raise ValueError(
            f"sample_answers() needs min_tokens >= 1 and prompts; got {min_tokens}, {len(prompts)} prompts"
        )
    pairs: list[tuple[str, str]] = []
    count_tokens = _token_count(tokenizer)
    count = 0
    bar = tqdm(total=min_tokens, desc="sampling answers", unit="tok", disable=not progress)
    while count < min_tokens:
        first = len(pairs) % len(prompts)
        batch = [prompts[(first + i) % len(prompts)] for i in range(batch_size)]
        answers = sample_texts(
            model, tokenizer, batch_size, max_new_tokens, prompts=batch, seed=len(pairs), batch_size=batch_size
        )
        added = sum(count_tokens(answer) for answer in answers)
        if added == len(answers):  # only the separating EOS of each
            raise ValueError("sample_answers(): the model answered every prompt with nothing; nothing to mix in.")
        count += added
        bar.update(min(added, min_tokens - bar.n))
        pairs += list(zip(batch, answers, strict=True))
    bar.close()
    return pairs


def _mix(
    documents: Sequence[Document], extra: Sequence[Document], fraction: float, length: Callable[[Document], int]
) -> list[Document]:
    """``documents`` in order, with ``extra`` (cycled) inserted so that extra documents make ``fraction`` of the
    tokens (``length`` of each): each next document comes from the side that is further below its share."""
    if not 0 < fraction < 1:
        raise ValueError(f"The share of self-generated tokens must be in (0, 1), got {fraction}.")
    if not documents or not extra:
        raise ValueError("Mixing needs documents on both sides: got an empty list.")
    lengths = [max(1, length(doc)) for doc in documents]
    wanted = fraction / (1 - fraction) * sum(lengths)  # tokens of extra text that make the share
    extras = itertools.cycle([(doc, max(1, length(doc))) for doc in extra])
    out: list[Document] = []
    own = added = 0

    def catch_up() -> None:  # extra documents until they reach their share of what is out so far
        nonlocal added
        while added < wanted and added * (1 - fraction) <= own * fraction:
            doc, size = next(extras)
            out.append(doc)
            added += size

    for doc, size in zip(documents, lengths, strict=True):
        catch_up()
        out.append(doc)
        own += size
    catch_up()
    return out


def _token_count(tokenizer: Any) -> Callable[[str], int]:
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1  # + the separating EOS


def mix_texts(tokenizer: Any, texts: Sequence[str], answers: Sequence[str], fraction: float = 0.5) -> list[str]:
    """Plain training texts with ``answers`` (cycled, as plain text) interleaved to make ``fraction`` of the tokens.

    With packing, blocks cut from the result hold both kinds of text in about that share wherever the trainer
    samples them. Raises ``ValueError`` for a ``fraction`` outside (0, 1) or an empty list."""
    return _mix(list(texts), list(answers), fraction, _token_count(tokenizer))


def mix_conversations(
    tokenizer: Any,
    conversations: Sequence[list[dict[str, str]]],
    pairs: Sequence[tuple[str, str]],
    fraction: float = 0.5,
) -> list[list[dict[str, str]]]:
    """Chat training data with ``pairs`` (prompt, answer) as user/assistant conversations interleaved to make
    ``fraction`` of the tokens (each conversation counted as its chat-template rendering)."""
    extra = [[{"role": "user", "content": p}, {"role": "assistant", "content": a}] for p, a in pairs]
    count = _token_count(tokenizer)
    return _mix(list(conversations), extra, fraction, lambda messages: count(render_conversation(messages, tokenizer)))


def mixed_dataset(dataset: Any, tokenizer: Any, pairs: Sequence[tuple[str, str]], fraction: float = 0.5):
    """A training ``datasets.Dataset`` like ``dataset`` (from :func:`peft_lisa.data.load_sft_dataset`) with the
    ``(prompt, answer)`` ``pairs`` of :func:`sample_answers` mixed in to make ``fraction`` of the tokens: the answers
    as plain text for a text dataset (:func:`mix_texts`), as user/assistant conversations for a chat dataset
    (:func:`mix_conversations`)."""
    if is_conversational_dataset(dataset):
        return chat_dataset(mix_conversations(tokenizer, dataset["messages"], pairs, fraction))
    return text_dataset(mix_texts(tokenizer, dataset["text"], [answer for _, answer in pairs], fraction))
