"""Tiny random-weight models of every supported architecture, built from configs (no downloads)."""

from __future__ import annotations

import functools
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

import peft_lisa  # noqa: F401  (registers the tuner)
from peft_lisa.tuner import attention as attention_module
from peft_lisa.tuner import cpu_kernel

REPO_ROOT = Path(__file__).resolve().parents[1]
VOCAB = 128
X86 = platform.machine().lower() in ("x86_64", "amd64")
# The flags of each kernel build the tests run (on x86): the machine's own; without AVX-512 (the portable vector code
# on 32-byte AVX2 vectors); without AVX (16-byte vectors, as SSE-only and ARM NEON builds have).
BUILD_FLAGS = {
    "native": cpu_kernel.COMPILE_FLAGS,
    **{name: (*cpu_kernel.COMPILE_FLAGS, flag) for name, flag in cpu_kernel.NARROWER_BUILDS.items()},
}


# The geometry every tiny test model shares: 5 layers, 4 query heads, 2 KV heads, head size 16, 128 tokens.
TINY_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=5,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=2,
    tie_word_embeddings=False,
)


def tiny_config(model_type: str = "llama", **overrides):
    common = {**TINY_COMMON, **overrides}
    if model_type == "llama":
        return LlamaConfig(**common)
    if model_type == "mistral":
        return MistralConfig(**{"sliding_window": None, **common})
    if model_type == "qwen2":
        return Qwen2Config(**common)
    if model_type == "qwen3":
        return Qwen3Config(**{"head_dim": 24, **common})  # explicit head_dim != hidden / heads
    raise ValueError(model_type)


def tiny_model(model_type: str = "llama", seed: int = 0, attn_implementation: str = "sdpa", **overrides):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(
        tiny_config(model_type, **overrides), attn_implementation=attn_implementation
    )
    # Random init gives near-uniform attention; sharpen q/k so that attention patterns (and errors) are visible.
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
            layer.self_attn.k_proj.weight.mul_(4.0)
    return model.eval()


def random_ids(batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=generator)


def left_padded_batch(seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts of lengths 9 and 5, left-padded with pad id 0."""
    ids = random_ids(2, 9, seed)
    mask = torch.ones_like(ids)
    ids[1, :4] = 0
    mask[1, :4] = 0
    return ids, mask


def randomize_adapter(model, seed: int = 0, scale: float = 0.3) -> None:
    """Give every LiSA parameter random values, as if trained, so tests see a non-trivial adapter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lisa_" in name:
                param.add_(torch.randn(param.shape, generator=generator) * scale)


def run_python(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh Python process (repo on the path) and return the finished process."""
    script = tmp_path / "fresh_process.py"
    script.write_text(code)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)


def require_cpu_kernel(monkeypatch) -> None:
    """``PEFT_LISA_CPU_KERNEL=on`` for this test: the compiled kernel is built (once per machine) and used, and a
    failed build fails the test. Skipped only on a machine without a C++ compiler."""
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler: the CPU kernel cannot be built here")
    monkeypatch.setenv(cpu_kernel.SETTING_VARIABLE, "on")


def set_handed_logits_bound(monkeypatch, keys: int) -> None:
    """``handed_logits_max_keys()`` = ``keys`` for this test, whether or not the CPU kernel is used."""
    monkeypatch.setattr(attention_module, "HANDED_LOGITS_MAX_KEYS", keys)
    monkeypatch.setattr(attention_module, "HANDED_LOGITS_MAX_KEYS_WITHOUT_KERNEL", keys)


@pytest.fixture
def llama():
    return tiny_model("llama")


@pytest.fixture(params=["handed", "kernel", "blocks"])
def shared_logits_route(request, monkeypatch):
    """The three inference routes of a shared layer's logits: computed whole by torch operations and handed on to the
    next link (inputs of at most ``HANDED_LOGITS_MAX_KEYS`` keys, as the tiny tests' are; the kernel off), or kept
    folded (every longer input; ``HANDED_LOGITS_MAX_KEYS = 0`` here) and attended by the compiled CPU kernel
    (required: a build failure fails the test; decode steps through its decode rows) or, with the kernel off, block
    by block / by the fused call."""
    if request.param != "handed":
        set_handed_logits_bound(monkeypatch, 0)
    if request.param == "kernel":
        require_cpu_kernel(monkeypatch)
    else:
        monkeypatch.setenv(cpu_kernel.SETTING_VARIABLE, "off")
    return request.param


def record_decode_rows(monkeypatch, kernel) -> list[tuple[int, bool, bool]]:
    """Route inference to ``kernel`` (none while ``PEFT_LISA_CPU_KERNEL=off``) and record each decode-rows call the
    layers make, as (query rows, handed logits given, logits handed on)."""
    build = lambda: None if cpu_kernel.cpu_kernel_setting() == "off" else kernel  # noqa: E731  (the setting holds)
    monkeypatch.setattr(cpu_kernel, "load_cpu_kernel", build)
    calls = []
    original = cpu_kernel.decode_rows

    def counting(kernel, query, *args, **kwargs):
        calls.append((query.shape[2], kwargs.get("handed") is not None, kwargs.get("hand_on", True)))
        return original(kernel, query, *args, **kwargs)

    monkeypatch.setattr(attention_module, "decode_rows", counting)
    return calls


@functools.cache
def kernel_build(build: str):
    """The kernel built with ``BUILD_FLAGS[build]`` (``cpu_kernel.NARROWER_BUILDS``: the portable vector code,
    ``softmax_lanes.h``, what CPUs without AVX-512 or without AVX run), once per test session."""
    return cpu_kernel.build_narrower(build)


@pytest.fixture(params=list(BUILD_FLAGS))
def kernel(request, monkeypatch):
    """The kernel as this machine builds it (``-march=native``: with AVX-512 and AVX512-BF16 where the CPU has them)
    and, on x86, built without AVX-512 and without AVX too: every vector width the kernel has."""
    require_cpu_kernel(monkeypatch)
    if request.param == "native":
        return cpu_kernel.load_cpu_kernel()
    if not X86:
        pytest.skip("off x86 the native build is the only one the tests make")
    return kernel_build(request.param)
