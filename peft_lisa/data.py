"""Text and dataset loading: the one place where ``peft-lisa`` reads training and evaluation data.

Sources (the ``--data`` of the command line, ``source`` here): ``None`` or ``"pydoc"`` (the documentation prose of
Python's standard library, built in so that everything works offline), a ``.txt`` file (documents separated by blank
lines), a ``.jsonl``/``.json`` file (a text field, or chat ``messages``), or a ``datasets`` name or directory.

* Plain text: :func:`load_texts` (with the deterministic held-out split of :func:`split_texts`),
  :func:`pydoc_texts`, :func:`chunk_token_ids` (fixed-length token blocks).
* Evaluation: :func:`load_evaluation_texts` (plain texts of any source, chat rendered with the chat template),
  :func:`license_text` (a second held-out text from another domain: legal English shipped with a package).
* Training (``datasets.Dataset`` for TRL's ``SFTTrainer``): :func:`load_sft_dataset`, :func:`text_dataset`,
  :func:`chat_dataset`, :func:`load_conversations`, :func:`is_conversational_dataset`, :func:`evaluation_texts`.
* Text the model writes itself, and mixing it into training data: :mod:`peft_lisa.generated_text`.

This module imports neither ``trl`` nor (until a function needs it) ``datasets``: analysing and evaluating need no
training extras.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import torch

_SPLITS = ("train", "test", "all")


# --------------------------------------------------------------------------------------------------------------
# Plain text
# --------------------------------------------------------------------------------------------------------------


def _normalise(text: str) -> str:
    """Strip trailing spaces from lines, collapse runs of blank lines, strip the ends; indentation is kept."""
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def pydoc_texts() -> list[str]:
    """The standard library's documentation topics (``pydoc_data.topics.topics``): one text per topic, sorted by
    topic name, whitespace lightly normalised, empty ones dropped."""
    from pydoc_data.topics import topics

    texts = (_normalise(topics[name]) for name in sorted(topics))
    return [text for text in texts if text]


def _stable_hash(text: str, seed: int) -> int:
    digest = hashlib.sha256(f"{seed}\0{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def split_texts(texts: Sequence[str], held_out_fraction: float = 0.1, seed: int = 0) -> tuple[list[str], list[str]]:
    """Split ``texts`` into ``(train, held_out)`` deterministically, by a stable (sha256) hash of each text.

    The distinct texts with the smallest hashes are held out: ``round(held_out_fraction * n)`` of them, at least one
    when ``held_out_fraction > 0`` and there are two or more distinct texts, and never all of them. Copies of one
    text always land on the same side, so no held-out text is ever seen in training. Input order is kept.
    """
    if not 0.0 <= held_out_fraction < 1.0:
        raise ValueError(f"held_out_fraction must be in [0, 1), got {held_out_fraction}")
    unique = sorted(set(texts), key=lambda text: (_stable_hash(text, seed), text))
    count = round(held_out_fraction * len(unique))
    if held_out_fraction > 0 and len(unique) >= 2:
        count = min(max(count, 1), len(unique) - 1)
    held_out_set = set(unique[:count])
    train = [text for text in texts if text not in held_out_set]
    held_out = [text for text in texts if text in held_out_set]
    return train, held_out


def _select(texts: Sequence[str], split: str, held_out_fraction: float) -> list[str]:
    if split == "all":
        return list(texts)
    train, held_out = split_texts(texts, held_out_fraction)
    return train if split == "train" else held_out


def _read_txt(path: Path) -> list[str]:
    """Documents of a text file: paragraph groups separated by one or more blank lines."""
    documents = re.split(r"\n[ \t]*\n", path.read_text(encoding="utf-8").replace("\r\n", "\n"))
    return [document.strip() for document in documents if document.strip()]


def _record_text(record: Any, text_field: str, where: str) -> str:
    """The text of one record: ``record[text_field]``, else the joined contents of a ``messages`` list."""
    if not isinstance(record, Mapping):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    value = record.get(text_field)
    if isinstance(value, str):
        return value
    messages = record.get("messages")
    if value is None and isinstance(messages, list):
        contents = [message.get("content") for message in messages if isinstance(message, Mapping)]
        return "\n\n".join(content for content in contents if isinstance(content, str) and content)
    if value is not None:
        raise ValueError(f"{where}: field {text_field!r} is a {type(value).__name__}, not a string")
    raise ValueError(
        f"{where}: no {text_field!r} field and no 'messages' list; available keys: {sorted(record)}. "
        f"Pass text_field= to choose another field."
    )


def _json_records(path: Path) -> Iterable[tuple[str, Any]]:
    """``(location, record)`` pairs: one record per line, or the items of a top-level JSON array."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        for index, record in enumerate(json.loads(text)):
            yield f"{path}: record {index}", record
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}, line {number}: not valid JSON ({error.msg})") from error
        yield f"{path}, line {number}", record


def _read_jsonl(path: Path, text_field: str) -> list[str]:
    texts = (_record_text(record, text_field, where) for where, record in _json_records(path))
    return [text for text in texts if text.strip()]


def _hf_split_texts(dataset: Any, text_field: str, source: str) -> list[str]:
    texts = (_record_text(record, text_field, f"dataset {source!r}, row {i}") for i, record in enumerate(dataset))
    return [text for text in texts if text.strip()]


def _load_hf_dataset(source: str, split: str, text_field: str, held_out_fraction: float) -> list[str]:
    """Texts of a ``datasets`` dataset; "test" is its test (or validation) split, else a held-out part of train."""
    try:
        import datasets

        splits = datasets.load_dataset(source)
    except Exception as error:
        raise ValueError(
            f"Could not load {source!r} with datasets.load_dataset ({type(error).__name__}: {error}). Local files "
            f"are supported too: pass a path ending in .txt, .jsonl or .json, or None for the built-in pydoc texts."
        ) from error
    if split == "all":
        return [text for name in splits for text in _hf_split_texts(splits[name], text_field, source)]
    test_name = next((name for name in ("test", "validation") if name in splits), None)
    if "train" not in splits:
        raise ValueError(f"Dataset {source!r} has no 'train' split (it has: {sorted(splits)})")
    train = _hf_split_texts(splits["train"], text_field, source)
    if test_name is None:
        return _select(train, split, held_out_fraction)
    return train if split == "train" else _hf_split_texts(splits[test_name], text_field, source)


def load_texts(
    source: str | os.PathLike | None = None,
    split: str = "train",
    text_field: str = "text",
    held_out_fraction: float = 0.1,
) -> list[str]:
    """Load documents as a list of strings.

    ``source`` is ``None`` or ``"pydoc"`` (the built-in :func:`pydoc_texts`), a ``.txt`` file (documents separated
    by blank lines), a ``.jsonl`` / ``.json`` file (one record per line, text in ``text_field`` or the joined
    contents of a ``messages`` list), or else a ``datasets.load_dataset`` name or directory. ``split`` is "train",
    "test" or "all"; except where a dataset has its own test/validation split, "test" is the
    ``held_out_fraction`` of documents chosen by :func:`split_texts`, and "train" is the rest.
    """
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {', '.join(_SPLITS)}; got {split!r}")
    if source is None or source == "pydoc":
        return _select(pydoc_texts(), split, held_out_fraction)
    path = Path(source).expanduser()
    if path.suffix.lower() in (".txt", ".jsonl", ".json"):
        if not path.is_file():
            raise FileNotFoundError(f"Text file not found: {path}")
        texts = _read_txt(path) if path.suffix.lower() == ".txt" else _read_jsonl(path, text_field)
        return _select(texts, split, held_out_fraction)
    return _load_hf_dataset(os.fspath(source), split, text_field, held_out_fraction)


def chunk_token_ids(tokenizer: Any, texts: Sequence[str], seq_len: int) -> torch.LongTensor:
    """Tokenise ``texts``, join them with the tokenizer's EOS token between documents, and cut the stream into a
    ``[N, seq_len]`` LongTensor of consecutive blocks (the incomplete last block is dropped)."""
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("The tokenizer has no eos_token_id to separate documents with")
    encoded = tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"] if texts else []
    stream: list[int] = []
    for index, ids in enumerate(encoded):
        if index:
            stream.append(eos)
        stream.extend(ids)
    blocks = len(stream) // seq_len
    if blocks == 0:
        raise ValueError(f"The texts give {len(stream)} tokens, fewer than seq_len={seq_len}")
    return torch.tensor(stream[: blocks * seq_len], dtype=torch.long).view(blocks, seq_len)


# --------------------------------------------------------------------------------------------------------------
# Datasets for training, and texts for evaluation
# --------------------------------------------------------------------------------------------------------------


def text_dataset(texts: Sequence[str]):
    """A ``datasets.Dataset`` with one ``"text"`` column, one row per document (for packing)."""
    from datasets import Dataset

    texts = [text for text in texts if isinstance(text, str) and text.strip()]
    if not texts:
        raise ValueError("text_dataset() got no non-empty texts.")
    return Dataset.from_dict({"text": texts})


def _normalise_messages(messages: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects.")
    normalised = []
    for message in messages:
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise ValueError(f"{where}: every message needs 'role' and 'content', got {message!r}.")
        normalised.append({"role": str(message["role"]), "content": str(message["content"])})
    return normalised


def chat_dataset(conversations: Sequence[Any]):
    """A conversational ``datasets.Dataset`` (one ``"messages"`` column) from lists of ``{"role", "content"}``
    messages, or from records holding such a list under ``"messages"``. ``SFTTrainer`` applies the chat template."""
    from datasets import Dataset

    rows = []
    for index, item in enumerate(conversations):
        messages = item.get("messages") if isinstance(item, Mapping) else item
        rows.append(_normalise_messages(messages, f"conversation {index}"))
    if not rows:
        raise ValueError("chat_dataset() got no conversations.")
    return Dataset.from_dict({"messages": rows})


def _read_chat_records(path: Path) -> Optional[list[list[dict[str, str]]]]:
    """The conversations of a JSONL/JSON file whose records have ``"messages"``; None if they have not."""
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        records = json.loads(text)
    else:
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    if not records or not all(isinstance(r, Mapping) and "messages" in r for r in records):
        return None
    return [_normalise_messages(r["messages"], f"{path}, record {i}") for i, r in enumerate(records)]


def _split_conversations(
    conversations: list[list[dict[str, str]]], split: str, held_out_fraction: float
) -> list[list[dict[str, str]]]:
    if split == "all":
        return conversations
    keys = [json.dumps(conversation, sort_keys=True) for conversation in conversations]
    train, held_out = split_texts(keys, held_out_fraction)
    chosen = set(train if split == "train" else held_out)
    return [conversation for conversation, key in zip(conversations, keys, strict=True) if key in chosen]


def load_conversations(
    source: str | os.PathLike, split: str = "train", held_out_fraction: float = 0.1
) -> Optional[list[list[dict[str, str]]]]:
    """Conversations of a chat-format source, or None if ``source`` is not one.

    A ``.jsonl``/``.json`` file whose every record has ``"messages"``, or a ``datasets`` name/directory with a
    ``"messages"`` column, is chat data. ``split`` ("train", "test", "all") follows
    :func:`load_texts`: a dataset's own test/validation split, else a deterministic held-out
    ``held_out_fraction`` of the conversations.
    """
    if source is None or source == "pydoc":
        return None
    path = Path(source).expanduser()
    if path.suffix.lower() in (".jsonl", ".json"):
        if not path.is_file():
            raise FileNotFoundError(f"Data file not found: {path}")
        conversations = _read_chat_records(path)
        return None if conversations is None else _split_conversations(conversations, split, held_out_fraction)
    if path.suffix.lower() == ".txt":
        return None
    import datasets

    try:
        splits = datasets.load_dataset(os.fspath(source))
    except Exception as error:  # load_texts gives the user-facing error for a bad name
        raise ValueError(f"Could not load {os.fspath(source)!r} with datasets.load_dataset: {error}") from error
    if "train" not in splits or "messages" not in splits["train"].column_names:
        return None
    train = [_normalise_messages(m, f"{source} train") for m in splits["train"]["messages"]]
    test_name = next((name for name in ("test", "validation") if name in splits), None)
    if test_name is None or split == "train":
        return train if test_name is not None else _split_conversations(train, split, held_out_fraction)
    test = [_normalise_messages(m, f"{source} {test_name}") for m in splits[test_name]["messages"]]
    return test if split == "test" else train + test


def load_sft_dataset(
    source: str | os.PathLike | None = None,
    split: str = "train",
    text_field: str = "text",
    held_out_fraction: float = 0.1,
):
    """A training (or held-out) dataset for ``SFTTrainer`` from any source ``load_texts`` reads.

    Chat data (records with ``"messages"``) gives a conversational dataset (:func:`chat_dataset`); everything else a
    plain-text dataset (:func:`text_dataset`) for packing. ``None`` or ``"pydoc"`` is the built-in pydoc text.
    """
    conversations = load_conversations(source, split, held_out_fraction) if source is not None else None
    if conversations is not None:
        return chat_dataset(conversations)
    return text_dataset(load_texts(source, split=split, text_field=text_field, held_out_fraction=held_out_fraction))


def is_conversational_dataset(dataset: Any) -> bool:
    """Whether ``dataset`` has a ``"messages"`` column (chat format)."""
    return "messages" in getattr(dataset, "column_names", [])


def render_conversation(messages: Sequence[Mapping[str, str]], tokenizer: Any = None) -> str:
    """One conversation as plain text: the tokenizer's chat template when it has one, else the joined contents."""
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(list(messages), tokenize=False)
    return "\n\n".join(message["content"] for message in messages)


def evaluation_texts(dataset: Any, tokenizer: Any = None) -> list[str]:
    """Plain texts of a dataset made by :func:`load_sft_dataset`, for perplexity: its ``"text"`` column, or each
    conversation rendered by :func:`render_conversation`."""
    if not is_conversational_dataset(dataset):
        return list(dataset["text"])
    return [render_conversation(messages, tokenizer) for messages in dataset["messages"]]


# (distribution, file): long license texts shipped inside installed wheels; the first one found is used.
LICENSE_TEXTS = (
    ("pyarrow", "licenses/LICENSE.txt"),
    ("pillow", "licenses/LICENSE"),
    ("matplotlib", "LICENSE"),
    ("numpy", "licenses/LICENSE.txt"),
)


def license_text() -> tuple[str, str]:
    """``(name, text)`` of a long held-out text from another domain than the training data (legal English): the
    first of :data:`LICENSE_TEXTS` that an installed package ships. Raises ``FileNotFoundError`` if none is."""
    import importlib.metadata

    for name, relative in LICENSE_TEXTS:
        try:
            distribution = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        for file in distribution.files or ():
            if str(file).endswith(relative) and ".dist-info" in str(file):
                path = Path(distribution.locate_file(file))
                if path.is_file():
                    return f"{name} {distribution.version} {relative}", path.read_text(encoding="utf-8")
    raise FileNotFoundError(f"None of these license files is installed: {LICENSE_TEXTS}")


def load_evaluation_texts(
    source: str | os.PathLike | None = None,
    split: str = "test",
    text_field: str = "text",
    held_out_fraction: float = 0.1,
    tokenizer: Any = None,
) -> list[str]:
    """Plain texts of any source for perplexity or a calibration analysis, without building a ``datasets.Dataset``.

    The same texts as ``evaluation_texts(load_sft_dataset(source, split, ...), tokenizer)``: the documents of
    :func:`load_texts`, or for chat data every conversation rendered by :func:`render_conversation`. Needs
    ``datasets`` only for a ``datasets`` name or directory.

    Raises:
        ValueError: the source gives no non-empty text for ``split``.
    """
    conversations = load_conversations(source, split, held_out_fraction) if source is not None else None
    if conversations is not None:
        texts = [render_conversation(messages, tokenizer) for messages in conversations]
    else:
        texts = load_texts(source, split=split, text_field=text_field, held_out_fraction=held_out_fraction)
    texts = [text for text in texts if text.strip()]
    if not texts:
        name = "pydoc" if source is None else os.fspath(source)
        raise ValueError(f"The data {name!r} has no non-empty text in its {split!r} part: choose other data or split.")
    return texts
