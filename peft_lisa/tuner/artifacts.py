"""Hub-ready artifacts: atomic saving and model cards for LiSA adapters and merged models."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

from torch import nn

from .compression import qk_compression_report

# Written last when a save is committed: a directory holding them is complete. Loaders look for them first.
_CONFIG_FILES = ("config.json", "adapter_config.json")


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a scratch directory whose files are moved into ``path`` only once the block finished without error.

    Files already in ``path`` that the save does not write (a tokenizer, say) stay. The config file goes in last and
    an older one is removed first, so an interrupted save never leaves a directory that loads with half-written or
    mixed weights: at worst it has no config and refuses to load. The scratch directory is removed on error.
    """
    final = Path(path)
    final.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield scratch
        for name in _CONFIG_FILES:
            (final / name).unlink(missing_ok=True)
        for item in sorted(scratch.iterdir(), key=lambda p: p.name in _CONFIG_FILES):
            if (final / item.name).is_dir():
                shutil.rmtree(final / item.name)
            os.replace(item, final / item.name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def model_card(
    model: nn.Module,
    *,
    kind: str,
    base_model: Optional[str] = None,
    metrics: Optional[dict[str, Any]] = None,
) -> str:
    """A README.md for a LiSA adapter (``kind="adapter"``) or merged model (``kind="merged"``)."""
    report = qk_compression_report(model)
    shared = [row.layer for row in report.layers]
    key_dims = next(iter({row.key_cache_dims_lisa for row in report.layers}), 0)
    base_line = f"base_model: {base_model}\n" if base_model else ""
    load = (
        "import peft_lisa  # registers LiSA with peft\n"
        "from peft import PeftModel\n"
        "from transformers import AutoModelForCausalLM\n"
        f'model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{base_model or "BASE"}"), "PATH")'
        if kind == "adapter"
        else "import peft_lisa  # registers the lisa_* model types\n"
        "from transformers import AutoModelForCausalLM\n"
        'model = AutoModelForCausalLM.from_pretrained("PATH")'
    )
    lines = [
        "---",
        f"{base_line}library_name: {'peft' if kind == 'adapter' else 'transformers'}",
        "tags:",
        "- peft-lisa",
        "- lisa",
        "- attention-sharing",
        "---",
        "",
        f"# LiSA {'adapter' if kind == 'adapter' else 'merged model'}" + (f" for {base_model}" if base_model else ""),
        "",
        "Cross-layer attention sharing (LiSA, arXiv 2408.01890) made with peft-lisa: the shared layers below compute "
        "their attention from the previous layer's logits, realigned by a small head-alignment network, plus a "
        "low-rank rotary Q/K correction." + (" Their `q_proj`/`k_proj` are removed." if kind == "merged" else ""),
        "",
        f"- Shared layers ({len(shared)}): {shared}",
        f"- Key-cache dims per token in a shared layer: {key_dims} (full layers: "
        f"{report.layers[0].key_cache_dims_original if report.layers else 0})",
        f"- Q/K parameters of the shared layers: {report.qk_params_original:,} -> {report.qk_params_lisa:,} "
        f"(**{report.ratio:.2f}x** compression)",
    ]
    for name, value in (metrics or {}).items():
        lines.append(f"- {name}: {value}")
    if not metrics:
        lines.append("- Perplexity: not measured for this artifact")
    lines += ["", "## Load", "", "```python", load, "```", ""]
    return "\n".join(lines)


def save_adapter(
    peft_model: nn.Module, path: str | os.PathLike, *, metrics: Optional[dict[str, Any]] = None, **kwargs: Any
) -> Path:
    """``peft_model.save_pretrained(path)``, atomically, with a LiSA model card."""
    base_model = getattr(peft_model.peft_config[peft_model.active_adapter], "base_model_name_or_path", None)
    with atomic_directory(path) as scratch:
        peft_model.save_pretrained(scratch, **kwargs)
        (scratch / "README.md").write_text(
            model_card(peft_model, kind="adapter", base_model=base_model, metrics=metrics)
        )
    return Path(path)
