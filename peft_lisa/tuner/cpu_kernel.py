"""The compiled CPU kernel of a shared layer's attention (``csrc/shared_attention.cpp``; ``docs/method.md``, "The CPU
kernel of a shared layer").

On CPU, in inference, a shared layer whose source is folded (:class:`~peft_lisa.tuner.carrier.FoldedScores`) attends
through this kernel: the source's per-head ``q k^T``, the head mixing ``P``, the rank-r terms, the mask, an online
softmax and ``A V``, one tile of queries x keys at a time in the core's cache; on decode steps source and shared
layers attend through its decode rows (:func:`decode_rows`, ``csrc/decode_rows.h``). It is compiled for the machine
with torch's C++ extension builder the first time it is needed (about 40 s; a C++ compiler and ``ninja`` are needed)
and cached by torch (``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``).

The environment variable ``PEFT_LISA_CPU_KERNEL`` chooses:

* ``auto`` (default): build and use the kernel; if it cannot be built, log a warning once (with the compiler's error)
  and attend with torch operations (explicit blocks), which give the same result more slowly;
* ``on``: the kernel is required; a failed build raises :class:`CPUKernelUnavailable`;
* ``off``: never build it; torch operations only.

Under ``torch.compile`` (``generate``'s compiled decoding with a static cache, for one) the kernel's entry points are
the torch operators ``peft_lisa::shared_attention`` and ``peft_lisa::decode_rows``, so that a compiled graph calls
the kernel without a break; the route is chosen once, when the graph is compiled (:func:`process_kernel`).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import threading
from pathlib import Path
from types import ModuleType
from typing import Optional, Union

import torch

logger = logging.getLogger("peft_lisa")

SETTING_VARIABLE = "PEFT_LISA_CPU_KERNEL"
SETTINGS = ("auto", "on", "off")
SOURCE = Path(__file__).parent / "csrc" / "shared_attention.cpp"
# -march=native: the softmax loops vectorize for the machine's widest SIMD. One layer's attention core at 1 x 2048 on
# SmolLM2 shapes, one thread, Zen 4: 80 ms with -march=native (AVX-512), 116 ms with -mavx2 -mfma, 160 ms with the
# compiler's default (SSE2), with the 64-byte vectors of the code then (csrc/softmax_lanes.h now sizes them to the
# target). The build is therefore named after the machine's CPU as well as the source.
# -mprefer-vector-width=512 (x86 only): GCC's tuning for recent Intel CPUs vectorizes with 256-bit registers by
# default; the same core on an Intel Xeon with AVX-512 and AMX, 2 threads, took 1.70x the base's sdpa time in bf16
# and 1.02x in fp32 with 512-bit vectors against 2.11x and 1.14x without (docs/benchmark/cpu_kernel/README.md).
# -fvisibility=hidden: a build exports its module's entry point only (pybind11's advice): builds for two instruction
# sets loaded in one process (the tests load two narrower ones too) define functions of the same names, which Python's
# private (RTLD_LOCAL) loading keeps apart, and which then stay apart under any other loading too.
COMPILE_FLAGS = ("-O3", "-march=native", "-fopenmp", "-fvisibility=hidden") + (
    ("-mprefer-vector-width=512",) if platform.machine().lower() in ("x86_64", "amd64") else ()
)
# Queries x keys per tile: a tile's per-head scores and mixed logits (2 H x 64 x 128 float32: 590 KB on SmolLM2)
# stay in a core's L2 cache. Measured on SmolLM2 shapes at 1 x 2048 tokens (Zen 4, 1 and 2 threads): 64 x 128,
# 32 x 128, 32 x 256 and 64 x 256 within 5% of each other, 128 x 128 slowest.
BLOCK_QUERIES = 64
BLOCK_KEYS = 128


class CPUKernelUnavailable(RuntimeError):
    """``PEFT_LISA_CPU_KERNEL=on`` and the kernel could not be built."""


_lock = threading.Lock()
_built: dict[str, Optional[ModuleType]] = {}


def cpu_kernel_setting() -> str:
    """``PEFT_LISA_CPU_KERNEL`` (``auto`` when unset); a clear error for any other value."""
    setting = os.environ.get(SETTING_VARIABLE, "auto").strip().lower() or "auto"
    if setting not in SETTINGS:
        raise ValueError(
            f"{SETTING_VARIABLE}={os.environ[SETTING_VARIABLE]!r} is not a setting: use one of {', '.join(SETTINGS)} "
            "(auto: build the CPU kernel and use it, torch operations if it cannot be built)."
        )
    return setting


def load_cpu_kernel() -> Optional[ModuleType]:
    """The compiled kernel module, built on first call; None under ``off``, or under ``auto`` when it cannot be
    built (warned once). Raises :class:`CPUKernelUnavailable` under ``on`` when it cannot be built."""
    setting = cpu_kernel_setting()
    if setting == "off":
        return None
    name = _build_name()
    with _lock:
        if name not in _built:
            _built[name] = _build(name, required=setting == "on")
        module = _built[name]
    if module is None and setting == "on":  # built under "auto" before, failed then
        raise CPUKernelUnavailable(f"{SETTING_VARIABLE}=on but the CPU kernel could not be built (see the warning).")
    return module


@torch.compiler.assume_constant_result  # read once when a graph is compiled
def cpu_kernel_expected() -> bool:
    """Whether inference on CPU expects to attend through the kernel, without building it: False under ``off`` or
    once a build of it has failed in this process, else True (built, or to be built at the first input that needs
    it)."""
    if cpu_kernel_setting() == "off":
        return False
    return _built.get(_build_name(), True) is not None


class KernelOperators:
    """The kernel as a graph compiled by ``torch.compile`` calls it: its entry points as the torch operators
    ``peft_lisa::shared_attention`` and ``peft_lisa::decode_rows`` (a pybind function is opaque to the compiler and
    would break the graph at every LiSA layer), its build's answers read once, when the graph is compiled. Eager calls
    go to the extension module itself, without the dispatcher's overhead on a decode step."""

    @staticmethod
    def shared_attention(*args: object) -> torch.Tensor:
        """The extension's ``shared_attention``, as the operator ``peft_lisa::shared_attention``."""
        return torch.ops.peft_lisa.shared_attention(*args)

    @staticmethod
    def decode_rows(*args: object) -> tuple[torch.Tensor, torch.Tensor]:
        """The extension's ``decode_rows``, as the operator ``peft_lisa::decode_rows`` (logits empty unless asked)."""
        return torch.ops.peft_lisa.decode_rows(*args)

    @staticmethod
    def packs(dtype: torch.dtype) -> bool:
        """The extension's ``packs(dtype)``, read when the graph is compiled."""
        return _built_kernel_packs(dtype)


KERNEL_OPERATORS = KernelOperators()
CPUKernel = Union[ModuleType, KernelOperators]  # what the functions below call


def process_kernel() -> Optional[CPUKernel]:
    """The kernel that inference in this process attends through: :func:`load_cpu_kernel` in eager mode; while
    ``torch.compile`` traces, :data:`KERNEL_OPERATORS` where the kernel is built (decided once, at compile time),
    else None."""
    if torch.compiler.is_compiling():
        return KERNEL_OPERATORS if _kernel_is_built() else None
    return load_cpu_kernel()


@torch.compiler.assume_constant_result
def _kernel_is_built() -> bool:
    """Whether :func:`load_cpu_kernel` finds the kernel (read once per compiled graph)."""
    return load_cpu_kernel() is not None


@torch.compiler.assume_constant_result
def _built_kernel_packs(dtype: torch.dtype) -> bool:
    """The built kernel's ``packs(dtype)`` (read once per compiled graph)."""
    return bool(_required_kernel().packs(dtype))


def _required_kernel() -> ModuleType:
    """The built kernel, which the operators call; a clear error where there is none."""
    kernel = load_cpu_kernel()
    if kernel is None:
        raise CPUKernelUnavailable(
            f"a peft_lisa kernel operator was called, but the CPU kernel is not built ({SETTING_VARIABLE}=off, or its "
            "build failed). LiSA layers call these operators only where process_kernel() finds the kernel; a graph "
            f"compiled while it was there needs it still: recompile (torch._dynamo.reset()) after changing "
            f"{SETTING_VARIABLE}."
        )
    return kernel


def cpu_kernel_status() -> str:
    """``"used"``, ``"off"`` or ``"unavailable"`` (``auto`` and the build failed): what a CPU inference run of this
    process gets, for benchmark reports. Builds the kernel if it is not built yet."""
    if cpu_kernel_setting() == "off":
        return "off"
    try:
        return "used" if load_cpu_kernel() is not None else "unavailable"
    except CPUKernelUnavailable:
        return "unavailable"


@functools.cache
def _build_name() -> str:
    """The extension's name: the source and its headers, the flags, torch's version and the machine's CPU, so that a
    build directory shared between machines never hands one a build for another's instruction set."""
    digest = hashlib.sha256(SOURCE.read_bytes())
    for header in sorted(SOURCE.parent.glob("*.h")):  # the headers it includes
        digest.update(header.read_bytes())
    digest.update(" ".join(COMPILE_FLAGS).encode())
    digest.update(torch.__version__.encode())
    digest.update(_cpu_identity().encode())
    return f"peft_lisa_shared_attention_{digest.hexdigest()[:16]}"


def _cpu_identity() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            lines = [line for line in cpuinfo if line.startswith(("model name", "flags"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


# The kernel's narrower builds on x86, by name: its portable vector code (csrc/softmax_lanes.h) on 32-byte vectors
# without AVX-512, as AVX2-only CPUs run it, and on 16-byte ones without AVX, as SSE-only x86 and ARM NEON run it. The
# tests build both; examples/without_avx512.py runs one.
NARROWER_BUILDS = {"portable": "-mno-avx512f", "narrow": "-mno-avx"}


def build_narrower(name: str, install: bool = False) -> ModuleType:
    """The kernel built with ``NARROWER_BUILDS[name]`` added to its flags, as its own extension (built once per
    machine, like the native one); raises :class:`CPUKernelUnavailable` if it cannot be built. ``install``: from now
    on this process's :func:`load_cpu_kernel` returns it instead of the native build."""
    native = _build_name()
    module = _build(f"{native}_{name}", required=True, flags=(*COMPILE_FLAGS, NARROWER_BUILDS[name]))
    if install:
        with _lock:
            _built[native] = module
    return module


def _build(name: str, required: bool, flags: tuple[str, ...] = COMPILE_FLAGS) -> Optional[ModuleType]:
    """The kernel compiled with ``flags`` as extension ``name`` (:func:`build_narrower` passes narrower flags)."""
    from torch.utils import cpp_extension

    logger.info("Building the LiSA CPU attention kernel (once per machine, about 40 s)...")
    try:
        return cpp_extension.load(name, [str(SOURCE)], extra_cflags=list(flags), verbose=False)
    except Exception as error:  # a missing compiler or ninja, a failed compile: all say the same to the user
        message = (
            f"the LiSA CPU attention kernel could not be built ({type(error).__name__}: {error}). It needs a C++ "
            "compiler (g++ or clang) and ninja (pip install ninja)."
        )
        if required:
            raise CPUKernelUnavailable(f"{SETTING_VARIABLE}=on but {message}") from error
        logger.warning(
            "%s LiSA layers attend with torch operations instead: same results, slower prefill and decode. Set %s=off "
            "to skip the build, or =on to make this an error.",
            message[0].upper() + message[1:],
            SETTING_VARIABLE,
        )
        return None


def kernel_mask(attention_mask: Optional[torch.Tensor], k_len: int) -> tuple[bool, Optional[torch.Tensor]]:
    """The mask as the kernel reads it: ``(True, None)`` for causal without padding, ``(True, mask)`` with mask
    B_m x T_q x T_k (bool, True where allowed, or float32 additive; a view where possible), ``(False, None)`` for a
    mask with a head axis, or of a dtype neither bool nor floating, which the kernel does not take."""
    if attention_mask is None:
        return True, None
    if attention_mask.dim() != 4 or attention_mask.shape[1] != 1:
        return False, None
    mask = attention_mask[:, 0, :, :k_len]
    if mask.dtype not in (torch.bool, torch.float32):
        if not mask.is_floating_point():
            return False, None  # the torch route names what it takes
        mask = mask.float()  # an additive mask in the model's dtype (eager, bf16)
    return True, mask


def packs(kernel: CPUKernel, dtype: torch.dtype) -> bool:
    """Whether the kernel runs ``dtype``'s products on packed operands on this CPU (bf16/fp16 where torch packs them
    for its own flash attention: bf16 on a CPU with AMX, for one)."""
    return dtype in (torch.bfloat16, torch.float16) and bool(kernel.packs(dtype))


def last_dim_contiguous(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` as it is if its last dimension is contiguous (the kernel takes any other strides), else a copy."""
    return tensor if tensor.stride(-1) == 1 else tensor.contiguous()


def shared_attention(
    kernel: CPUKernel,
    mixed: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    terms: list[tuple[torch.Tensor, torch.Tensor]],
    value: torch.Tensor,
    mask: Optional[torch.Tensor],
    pack: bool = True,
) -> torch.Tensor:
    """``softmax(S + M) V`` -> B x T_q x (H d_v) in the values' dtype, for per head h
    ``S[h] = sum_i sum_g mix_i[h, g] q_i[g] k_i[kv_i(g)]^T + sum_e q_e[h] k_e[kv_e(h)]^T``.

    ``mixed``: triples of queries B x H x T_q x D_i, keys B x H_i x T_k x D_i and an H x H mixing (its scale
    included), the chain's source first (its rotary query/key) then its earlier links' rank-r parts; ``terms``: pairs
    of queries B x H x T_q x W_e, already mixed and scaled, and keys B x H_e x T_k x W_e (a link's own rank-r term);
    value: B x H_kv x T_k x d_v; mask from :func:`kernel_mask` (None: causal, the queries are the last T_q of the T_k
    positions). Query head g reads key head ``g // (H / H_i)``. The mixed parts are read in the values' dtype (float32
    for all if one of them differs, as an fp32 adapter on a bf16 base), the terms' queries in float32.

    Sums, the head mixing and the softmax are float32. In bf16/fp16, where the CPU runs torch's own flash attention
    on packed operands (:func:`packs`: bf16 with AMX, for one), ``pack`` is true and every part's and term's size is
    even, the products ``q k^T`` and ``A V`` run in that dtype as torch's sdpa does (the probabilities rounded to it
    for ``A V``); queries the kernel gets in float32 or mixes itself (the terms', the spread parts') are rounded to
    that dtype, as a bf16 model's projections round theirs. Otherwise the products are computed in float32 (and
    so for a term or part of odd size: LiSA's rank is even).
    """
    dtype = value_dtype = value.dtype
    if any(query.dtype != dtype or key.dtype != dtype for query, key, _ in mixed):
        dtype = torch.float32
    sizes = [query.shape[-1] for query, _, _ in mixed] + [query.shape[-1] for query, _ in terms]
    pack = pack and packs(kernel, dtype) and BLOCK_KEYS % 2 == 0 and all(size % 2 == 0 for size in sizes)
    term_key_dtype = dtype if pack else torch.float32
    value = last_dim_contiguous(value.to(dtype))
    queries = [last_dim_contiguous(query.to(dtype)) for query, _, _ in mixed]
    keys = [last_dim_contiguous(key.to(dtype)) for _, key, _ in mixed]  # as they lie
    mixes = [mix.float().contiguous() for _, _, mix in mixed]
    term_queries = [term_query.float().contiguous() for term_query, _ in terms]
    term_keys = [last_dim_contiguous(key.to(term_key_dtype)) for _, key in terms]
    output = kernel.shared_attention(
        queries, keys, mixes, term_queries, term_keys, value, mask, BLOCK_QUERIES, BLOCK_KEYS, pack
    )  # B x T_q x H x d_v
    return output.flatten(2).to(value_dtype)


def decode_rows_route(
    value: torch.Tensor, attention_mask: Optional[torch.Tensor]
) -> Optional[tuple[CPUKernel, Optional[torch.Tensor]]]:
    """The kernel and the mask as it reads it (:func:`kernel_mask`) where an attention of ``value``
    (B x H_kv x T_k x d_v) under ``attention_mask`` may run through the kernel's decode rows: inference (no autograd)
    on CPU, the kernel built (:func:`process_kernel`), values in float32 or bf16, a mask the kernel takes; else None.
    float16 values are converted one at a time: they keep torch's operations. Every build takes the rows: on the
    Intel Xeon held to AVX2 (or SSE) with the kernel built for it, one decode step of a source or shared layer
    against 2048 keys read from memory, batch 1 and 8, ran faster through them than through torch's operations
    (``docs/benchmark/cpu_kernel/README.md``, "Without AVX-512")."""
    if torch.is_grad_enabled() or value.device.type != "cpu" or value.dtype not in (torch.float32, torch.bfloat16):
        return None
    kernel = process_kernel()
    if kernel is None:
        return None
    supported, mask = kernel_mask(attention_mask, value.shape[-2])
    return (kernel, mask) if supported else None


def decode_rows(
    kernel: CPUKernel,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: Optional[torch.Tensor],
    handed: Optional[torch.Tensor] = None,
    mix: Optional[torch.Tensor] = None,
    softcap: Optional[float] = None,
    hand_on: bool = True,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """A few query rows (decode steps) of ``softmax(S + M) V`` in one kernel call (``csrc/decode_rows.h``), for per
    query head h ``S[h] = sum_g mix[h, g] handed[g] + query[h] key[kv(h)]^T``, softcapped where ``softcap`` is given.

    query: B x H x T_q x W, scaled (a source layer's rotary query, a shared layer's rank-r one); key: B x H_e x T_k x W
    (the cache, read as it lies); value: B x H_kv x T_k x d_v; mask from :func:`kernel_mask` (None: causal, the
    queries are the last T_q positions); handed: B x H_s x T_q x T_k float32 logits of the layer before, with mix:
    H x H_s. Returns the output B x T_q x (H d_v) in the values' dtype and S before the mask, B x H x T_q x T_k
    float32 (None unless ``hand_on``). Sums, the mixing and the softmax are float32.
    """
    key = last_dim_contiguous(key if key.dtype in (torch.float32, value.dtype) else key.to(value.dtype))
    if handed is not None:
        handed, mix = last_dim_contiguous(handed.float()), mix.float().contiguous()
    output, logits = kernel.decode_rows(
        handed, mix, query.float().contiguous(), key, last_dim_contiguous(value), mask, softcap or 0.0, hand_on
    )  # B x T_q x H x d_v, B x H x T_q x T_k
    return output.flatten(2), logits if hand_on else None


# The kernel's entry points as torch operators, for compiled graphs (:class:`KernelOperators`): same arguments and
# results as the extension's functions, except that decode_rows' logits are an empty tensor when not asked for.
@torch.library.custom_op(
    "peft_lisa::shared_attention",
    mutates_args=(),
    device_types="cpu",
    schema="(Tensor[] queries, Tensor[] keys, Tensor[] mixes, Tensor[] term_queries, Tensor[] term_keys, "
    "Tensor value, Tensor? mask, int block_queries, int block_keys, bool pack) -> Tensor",
)
def _shared_attention_operator(
    queries: list[torch.Tensor],
    keys: list[torch.Tensor],
    mixes: list[torch.Tensor],
    term_queries: list[torch.Tensor],
    term_keys: list[torch.Tensor],
    value: torch.Tensor,
    mask: Optional[torch.Tensor],
    block_queries: int,
    block_keys: int,
    pack: bool,
) -> torch.Tensor:
    return _required_kernel().shared_attention(
        queries, keys, mixes, term_queries, term_keys, value, mask, block_queries, block_keys, pack
    )


@_shared_attention_operator.register_fake
def _(queries, keys, mixes, term_queries, term_keys, value, mask, block_queries, block_keys, pack):
    batch, heads, q_len, _ = queries[0].shape
    return value.new_empty(batch, q_len, heads, value.shape[-1])  # B x T_q x H x d_v


@torch.library.custom_op(
    "peft_lisa::decode_rows",
    mutates_args=(),
    device_types="cpu",
    schema="(Tensor? handed, Tensor? mix, Tensor query, Tensor key, Tensor value, Tensor? mask, float softcap, "
    "bool want_logits) -> (Tensor, Tensor)",
)
def _decode_rows_operator(
    handed: Optional[torch.Tensor],
    mix: Optional[torch.Tensor],
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: Optional[torch.Tensor],
    softcap: float,
    want_logits: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    output, logits = _required_kernel().decode_rows(handed, mix, query, key, value, mask, softcap, want_logits)
    return output, logits if logits is not None else query.new_empty(0)


@_decode_rows_operator.register_fake
def _(handed, mix, query, key, value, mask, softcap, want_logits):
    batch, heads, q_len, _ = query.shape
    logits_shape = (batch, heads, q_len, value.shape[-2]) if want_logits else (0,)
    output = value.new_empty(batch, q_len, heads, value.shape[-1])  # B x T_q x H x d_v
    return output, query.new_empty(logits_shape, dtype=torch.float32)  # B x H x T_q x T_k
