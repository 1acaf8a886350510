"""The compiled CPU kernel of a shared layer's attention (``peft_lisa/tuner/cpu_kernel.py``), against
``softmax(S + M) V`` computed densely from the same folded logits, and its setting ``PEFT_LISA_CPU_KERNEL``.

Whole models through the kernel are checked against the independent reference by the tests that take the
``shared_logits_route`` fixture (its ``kernel`` route)."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from peft_lisa.tuner import cpu_kernel
from peft_lisa.tuner.carrier import FoldedPart, FoldedScores
from peft_lisa.tuner.functional import additive_mask, causal_allowed, grouped_attend, kv_group_mask
from tests.conftest import BUILD_FLAGS, REPO_ROOT, X86


def folded_chain(
    batch: int,
    q_len: int,
    k_len: int,
    heads: int,
    kv_heads: int,
    links: int,
    kv_group: bool,
    seed: int = 0,
    rank: int = 3,
) -> FoldedScores:
    """A source's logits (head size 8) under ``links`` shared layers, each mixing them by a random P (restricted to
    KV groups under ``kv_group``) and adding a rank-``rank`` term: the kernel's first part plus terms of both
    layouts (a link's own rank-r term reads its query head's key head; an earlier link's is fully mixed, all key
    heads side by side)."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=generator)

    group_map = list(reversed(range(kv_heads))) if kv_group else None
    mask = kv_group_mask(group_map, heads) if kv_group else torch.ones(heads, heads)
    logits = FoldedScores.from_query_key(rand(batch, heads, q_len, 8), rand(batch, kv_heads, k_len, 8), 8**-0.5)
    for _ in range(links):
        logits = logits.mixed(rand(heads, heads) * mask, group_map)
        logits = logits.with_lowrank(rand(batch, heads, q_len, rank), rand(batch, kv_heads, k_len, rank), rank**-0.5)
    return logits


def float_reference(logits: FoldedScores, kernel, dtype: torch.dtype, pack: bool = True) -> FoldedScores:
    """``logits`` in float32 as the kernel's route in ``dtype`` (the values') reads them. On the packed route
    (:func:`cpu_kernel.packs`) the queries it mixes are rounded to ``dtype``, as it rounds them: a term's (its mixed,
    scaled queries, :meth:`FoldedPart.kernel_term`; its keys in ``dtype`` too) and a fully mixed earlier link's that
    is spread (no wider than the source against all its key heads: its queries mixed per key head,
    :meth:`FoldedPart.spread_query`, against those key heads side by side). The source and wider mixed parts keep
    their per-head scores and float32 mixing. (Callers pass parts in the values' dtype and even sizes: the kernel
    reads everything in float32 otherwise, which this does not model.)"""
    source, *others = [replace(part, query=part.query.float(), key=part.key.float()) for part in logits.parts]
    if not (pack and dtype != torch.float32 and kernel.packs(dtype)):
        return FoldedScores([source, *others])
    parts = [source]
    for part in others:
        if part.key_index is not None:  # a term
            query, key = part.kernel_term(part.key.shape[2])
            parts.append(FoldedPart(query.to(dtype).float(), key.to(dtype).float()))
        elif part.spread_width <= source.query.shape[-1]:  # spread: one key head of H_k D for every query head
            query = part.spread_query(slice(None)).to(dtype).float()
            parts.append(FoldedPart(query, part.spread_key(part.key.shape[2])[:, None]))
        else:
            parts.append(part)
    return FoldedScores(parts)


def dense_attention(logits: FoldedScores, allowed: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``softmax(S + M) V`` from the whole T_q x T_k logits, in float32."""
    q_len, k_len = allowed.shape[-2:]
    probs = torch.softmax(logits.rows(slice(None)) + additive_mask(allowed, q_len, k_len, None), dim=-1)
    return grouped_attend(probs, value.float())


@pytest.mark.parametrize(
    "batch, q_len, k_len, heads, kv_heads",
    [(1, 200, 200, 4, 2), (3, 67, 67, 6, 3), (2, 150, 190, 4, 4), (2, 130, 130, 4, 1), (1, 1, 40, 4, 2)],
    ids=["gqa-tiles", "odd-sizes", "mha-after-cache", "mqa", "one-query"],
)
@pytest.mark.parametrize("links", [1, 3])
@pytest.mark.parametrize("kv_group", [False, True], ids=["full", "kv_group"])
def test_kernel_equals_dense_attention_causal(kernel, batch, q_len, k_len, heads, kv_heads, links, kv_group):
    """Causal without a mask (the queries are the last T_q of T_k positions: a prefill continuing a cache too),
    over several tiles of 64 queries x 128 keys and partial ones, GQA, MHA and MQA, chains of 1 and 3 links."""
    logits = folded_chain(batch, q_len, k_len, heads, kv_heads, links, kv_group)
    value = torch.randn(batch, kv_heads, k_len, 8)
    allowed = causal_allowed(slice(None), q_len, k_len, value.device)
    with torch.no_grad():
        got = logits.attend_by_kernel(kernel, None, value)
    assert got.shape == (batch, q_len, heads * 8) and got.dtype == value.dtype
    torch.testing.assert_close(got, dense_attention(logits, allowed, value), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_kernel_where_later_keys_raise_the_row_maximum(kernel, dtype):
    """Logits that climb in steps along the keys (every 64 keys), by a height per head, against the kernel's slack
    of 8 over a row's running maximum (tiles of 128 keys): at 0 per step the maximum is never raised after a row's
    first tile; at 3 some tiles keep it (probabilities above one) and later ones raise it once the steps add up beyond
    the slack; at 6 and 24 nearly every tile raises it and rescales the row's sum and output so far (at 24 the logits
    would overflow float32's exp within a row whose maximum were never raised). In bf16 on the route the CPU takes,
    within the rounding of the reduced-precision test below."""
    q_len, heads, steps = 400, 4, torch.tensor([0.0, 3.0, 6.0, 24.0])
    generator = torch.Generator().manual_seed(5)
    query, key = torch.randn(1, heads, q_len, 8, generator=generator), torch.randn(1, 2, q_len, 8, generator=generator)
    query[..., 0] = steps[:, None] * 8**0.5  # scaled by 8^-0.5 below
    key[..., 0] = torch.arange(q_len) // 64
    logits = FoldedScores.from_query_key(query.to(dtype), key.to(dtype), 8**-0.5).mixed(torch.eye(heads), None)
    logits = logits.with_lowrank(torch.randn(1, heads, q_len, 2), torch.randn(1, 2, q_len, 2), 0.5)
    value = torch.randn(1, 2, q_len, 8).to(dtype)
    reference = float_reference(logits, kernel, dtype)
    allowed = causal_allowed(slice(None), q_len, q_len, value.device)
    with torch.no_grad():
        got = logits.attend_by_kernel(kernel, None, value)
    expected = dense_attention(reference, allowed, value)
    eps = torch.finfo(dtype).eps
    atol = 2e-5 if dtype == torch.float32 else eps / 2 * value.float().abs().max().item()
    torch.testing.assert_close(got.float(), expected, atol=atol, rtol=eps if dtype != torch.float32 else 2e-5)


@pytest.mark.parametrize("mask_kind", ["bool", "additive"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_kernel_equals_dense_attention_with_padding(kernel, mask_kind, dtype):
    """Left padding as transformers hands it (a bool mask, or an additive float one for eager), with a sequence whose
    first query rows see no key at all (they attend evenly, as the torch route's additive mask makes them), and a
    mask one key wider than the values (the kernel reads its first T_k columns). In bf16 on the route the CPU takes
    (packed where it packs bf16), within the rounding of the reduced-precision test below."""
    batch, q_len, heads, kv_heads = 3, 140, 6, 3
    logits = folded_chain(batch, q_len, q_len, heads, kv_heads, 2, False, seed=1, rank=4)
    logits = FoldedScores([replace(part, query=part.query.to(dtype), key=part.key.to(dtype)) for part in logits.parts])
    value = torch.randn(batch, kv_heads, q_len, 8).to(dtype)
    allowed = causal_allowed(slice(None), q_len, q_len, value.device).expand(batch, 1, q_len, q_len).clone()
    allowed[1, ..., :70] = False  # sequence 1: 70 padding tokens, over the first key tile
    allowed[1, ..., :70, 69] = True  # its padded rows see one key...
    allowed[2, ..., :5] = False  # ...sequence 2's see none
    wider = torch.cat([allowed, torch.zeros(batch, 1, q_len, 1, dtype=torch.bool)], dim=-1)
    mask = wider if mask_kind == "bool" else additive_mask(wider, q_len, q_len + 1, None)
    supported, kernel_mask = cpu_kernel.kernel_mask(mask, q_len)
    assert supported
    with torch.no_grad():
        got = logits.attend_by_kernel(kernel, kernel_mask, value)
    reference = float_reference(logits, kernel, dtype)
    expected = dense_attention(reference, allowed, value)
    if dtype == torch.float32:
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=2e-5)
    else:
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(got.float(), expected, atol=eps / 2 * value.float().abs().max().item(), rtol=eps)


def test_kernel_reads_a_mask_shared_by_the_batch(kernel):
    """A mask of one row of sequences (B_m = 1) for a batch of three, as a causal mask built once: every sequence
    reads it."""
    batch, q_len = 3, 90
    logits = folded_chain(batch, q_len, q_len, 4, 2, 1, False, seed=3)
    value = torch.randn(batch, 2, q_len, 8)
    allowed = causal_allowed(slice(None), q_len, q_len, value.device)
    allowed[:, :3] = False  # the first three keys hidden from every query but the first three
    allowed[:3, :3] = True
    _, mask = cpu_kernel.kernel_mask(allowed[None, None], q_len)
    with torch.no_grad():
        got = logits.attend_by_kernel(kernel, mask, value)
    torch.testing.assert_close(got, dense_attention(logits, allowed, value), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_kernel_reads_keys_as_they_lie(kernel, dtype):
    """Keys that are views, as caches hand them: a slice of a longer buffer along the positions (the source's), and
    heads laid out within positions (``B x T x H x r`` transposed: the rank-r keys of an earlier link, spread where
    packed, and of the last link's term). The kernel reads them in place; the result equals, bit for bit, the one
    from contiguous copies."""
    generator = torch.Generator().manual_seed(6)
    batch, heads, kv_heads, q_len, rank = 2, 4, 2, 150, 4

    def rand(*shape):
        return torch.randn(*shape, generator=generator).to(dtype)

    source_key = rand(batch, kv_heads, q_len + 40, 8)[:, :, :q_len]
    lowrank_keys = [rand(batch, q_len, kv_heads, rank).transpose(1, 2) for _ in range(2)]
    assert not (source_key.is_contiguous() or any(key.is_contiguous() for key in lowrank_keys))
    logits = FoldedScores.from_query_key(rand(batch, heads, q_len, 8), source_key, 8**-0.5)
    for key in lowrank_keys:
        logits = logits.mixed(torch.randn(heads, heads, generator=generator), None)
        logits = logits.with_lowrank(rand(batch, heads, q_len, rank), key, rank**-0.5)
    copies = FoldedScores([replace(part, key=part.key.contiguous()) for part in logits.parts])
    value = rand(batch, kv_heads, q_len, 8)
    with torch.no_grad():
        assert torch.equal(logits.attend_by_kernel(kernel, None, value), copies.attend_by_kernel(kernel, None, value))


def test_kernel_with_float32_parts_and_bf16_values(kernel):
    """An fp32 adapter on a bf16 base: the rank-r parts are float32, the source's query/key and the values bf16.
    Everything is read in float32, the output written in bf16."""
    logits = folded_chain(2, 70, 70, 4, 2, 2, False, seed=4)
    source = logits.parts[0]
    logits = FoldedScores(
        [replace(source, query=source.query.bfloat16(), key=source.key.bfloat16()), *logits.parts[1:]]
    )
    value = torch.randn(2, 2, 70, 8).bfloat16()
    reference = FoldedScores([replace(part, query=part.query.float(), key=part.key.float()) for part in logits.parts])
    allowed = causal_allowed(slice(None), 70, 70, value.device)
    with torch.no_grad():
        got = logits.attend_by_kernel(kernel, None, value)
    assert got.dtype == torch.bfloat16
    expected = dense_attention(reference, allowed, value)
    torch.testing.assert_close(got.float(), expected, atol=1e-5, rtol=torch.finfo(torch.bfloat16).eps)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("q_len, k_len", [(150, 150), (67, 130)], ids=["prefill", "after-cache-odd"])
@pytest.mark.parametrize("pack", [False, True], ids=["converted", "packed"])
@pytest.mark.parametrize("links", [2, 4])
@pytest.mark.parametrize("kv_group", [False, True], ids=["full", "kv_group"])
@pytest.mark.parametrize("rank", [4, 18], ids=["rank4", "rank18"])
def test_kernel_in_reduced_precision_equals_dense_attention_of_the_same_tensors(
    kernel, dtype, q_len, k_len, pack, links, kv_group, rank
):
    """A bf16/fp16 model's queries, keys and values are read in their dtype, the output written in their dtype.

    Converted (``pack=False``, and any CPU where torch does not pack the dtype): everything is computed in float32
    from the (rounded) tensors, so the result equals float32 dense attention of them within the output's rounding.
    Packed (where the CPU packs the dtype, e.g. bf16 with AMX): ``q k^T`` and ``A V`` run in the dtype on packed keys
    and values, the probabilities rounded to it for ``A V`` as torch's sdpa does; each probability's rounding moves
    the output by at most half an epsilon of the largest value. Odd key counts and tiles cut by the causal mask
    exercise the packing's padding. Packed, a chain's earlier links (1 or 3 of them) are spread when fully
    mixed and no wider than the source (rank 4): their queries mixed per block, rounded to the dtype, one product
    against all their key heads side by side; under kv_group they are terms, their queries mixed in float32 (by
    products of up to four random mixings) and rounded to the dtype. The reference rounds them the same way
    (:func:`float_reference`; left unrounded there, the 4-link chains miss the tolerance by 2-3x). Rank 18 gives
    rounded rows of whole and partial vectors (18 values against 16 lanes)."""
    if pack and not kernel.packs(dtype):
        pytest.skip(f"this CPU does not pack {dtype} for brgemm (torch's own sdpa does not either)")
    logits = folded_chain(2, q_len, k_len, 4, 2, links, kv_group, seed=2, rank=rank)
    logits = FoldedScores([replace(part, query=part.query.to(dtype), key=part.key.to(dtype)) for part in logits.parts])
    value = torch.randn(2, 2, k_len, 8).to(dtype)
    reference = float_reference(logits, kernel, dtype, pack)
    allowed = causal_allowed(slice(None), q_len, k_len, value.device)
    with torch.no_grad():
        got = logits.attend_by_kernel(kernel, None, value, pack=pack)
    assert got.dtype == dtype
    expected = dense_attention(reference, allowed, value)
    eps = torch.finfo(dtype).eps
    atol = eps / 2 * value.float().abs().max().item() if pack else 1e-5
    torch.testing.assert_close(got.float(), expected, atol=atol, rtol=eps)  # within rounding
    if pack:  # the packed products ran: their rounding differs from the converted route's
        assert not torch.equal(got, logits.attend_by_kernel(kernel, None, value, pack=False))


def test_a_build_names_the_instructions_it_targets(kernel, request):
    """Each build takes the code for what its flags target, as the compiler reports it (``-dM -E``): the portable
    code without AVX-512, the AVX-512 code where ``-march=native`` targets AVX-512 (with AVX512-BF16 where it targets
    that too), so that the kernel tests run both where both exist; and vectors as wide as the target's registers (16
    float32 lanes on AVX-512, 8 on AVX2, 4 elsewhere): wider ones are split through the stack, which made one
    layer's attention core on AVX2 take 1.76x the base's sdpa time instead of 1.08x."""
    flags = BUILD_FLAGS[request.node.callspec.params["kernel"]]
    compiler = os.environ.get("CXX", "c++")
    defined = subprocess.run(
        [compiler, *flags, "-dM", "-E", "-x", "c++", os.devnull], capture_output=True, text=True, check=True
    ).stdout.split()
    if "__AVX512BF16__" in defined:
        expected = "avx512-bf16"
    else:
        expected = "avx512" if "__AVX512F__" in defined else "portable"
    assert kernel.vector_instructions() == expected
    assert kernel.vector_bytes() == (64 if "__AVX512F__" in defined else 32 if "__AVX2__" in defined else 16)


@pytest.mark.skipif(shutil.which("nm") is None, reason="needs nm (binutils) to read a build's symbol table")
def test_a_build_exports_its_entry_point_only(kernel):
    """Functions of the native and the portable build have the same names; of the functions a build defines itself
    (``T`` in ``nm``), only the module's ``PyInit_`` may be exported."""
    listing = subprocess.run(
        ["nm", "-D", "--defined-only", kernel.__file__], capture_output=True, text=True, check=True
    ).stdout
    functions = [line.split()[-1] for line in listing.splitlines() if line.split()[1:2] == ["T"]]
    assert functions == [f"PyInit_{kernel.__name__}"]


def test_kernel_mask_takes_masks_without_a_head_axis():
    bool_mask = torch.ones(2, 1, 5, 7, dtype=torch.bool)
    supported, mask = cpu_kernel.kernel_mask(bool_mask, 6)
    assert supported and mask.shape == (2, 5, 6) and mask.dtype == torch.bool
    supported, mask = cpu_kernel.kernel_mask(torch.zeros(1, 1, 5, 6, dtype=torch.bfloat16), 6)
    assert supported and mask.dtype == torch.float32
    assert cpu_kernel.kernel_mask(torch.zeros(2, 4, 5, 6), 6) == (False, None)
    assert cpu_kernel.kernel_mask(None, 6) == (True, None)


def test_setting_rejects_unknown_values(monkeypatch):
    monkeypatch.setenv(cpu_kernel.SETTING_VARIABLE, "fast")
    with pytest.raises(ValueError, match="PEFT_LISA_CPU_KERNEL='fast' is not a setting: use one of auto, on, off"):
        cpu_kernel.load_cpu_kernel()


def test_off_never_builds(monkeypatch):
    monkeypatch.setenv(cpu_kernel.SETTING_VARIABLE, "off")
    monkeypatch.setattr(cpu_kernel, "_build", lambda *args: pytest.fail("built under off"))
    assert cpu_kernel.load_cpu_kernel() is None


def test_short_inputs_hand_logits_on_up_to_the_bound_of_the_route_longer_inputs_take(monkeypatch):
    """``handed_logits_max_keys``: ``HANDED_LOGITS_MAX_KEYS`` where the kernel attends longer inputs (built, or not
    yet tried), ``HANDED_LOGITS_MAX_KEYS_WITHOUT_KERNEL`` under ``off`` or after a failed build; it never builds."""
    from peft_lisa.tuner import attention

    assert attention.HANDED_LOGITS_MAX_KEYS < attention.HANDED_LOGITS_MAX_KEYS_WITHOUT_KERNEL
    monkeypatch.setattr(cpu_kernel, "_build", lambda *args: pytest.fail("the bound built the kernel"))
    monkeypatch.setattr(cpu_kernel, "_built", {})
    monkeypatch.setenv(cpu_kernel.SETTING_VARIABLE, "auto")
    assert attention.handed_logits_max_keys() == attention.HANDED_LOGITS_MAX_KEYS  # not yet tried
    monkeypatch.setenv(cpu_kernel.SETTING_VARIABLE, "off")
    assert attention.handed_logits_max_keys() == attention.HANDED_LOGITS_MAX_KEYS_WITHOUT_KERNEL
    monkeypatch.setenv(cpu_kernel.SETTING_VARIABLE, "auto")
    monkeypatch.setattr(cpu_kernel, "_built", {cpu_kernel._build_name(): None})  # a build that failed
    assert attention.handed_logits_max_keys() == attention.HANDED_LOGITS_MAX_KEYS_WITHOUT_KERNEL


def test_a_failed_build_warns_under_auto_and_raises_under_on(monkeypatch, caplog):
    """A machine without a compiler: under ``auto`` one warning that names the cause and the settings, then the torch
    route; under ``on`` an error."""
    from torch.utils import cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    monkeypatch.setattr(cpu_kernel, "_built", {})
    monkeypatch.setenv(cpu_kernel.SETTING_VARIABLE, "auto")
    with caplog.at_level(logging.WARNING, logger="peft_lisa"):
        assert cpu_kernel.load_cpu_kernel() is None
        assert cpu_kernel.load_cpu_kernel() is None
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "Ninja is required" in warnings[0] and "PEFT_LISA_CPU_KERNEL=off" in warnings[0]
    monkeypatch.setenv(cpu_kernel.SETTING_VARIABLE, "on")
    with pytest.raises(cpu_kernel.CPUKernelUnavailable, match="could not be built"):
        cpu_kernel.load_cpu_kernel()
    monkeypatch.setattr(cpu_kernel, "_built", {})
    with pytest.raises(cpu_kernel.CPUKernelUnavailable, match="Ninja is required"):
        cpu_kernel.load_cpu_kernel()


def test_build_name_follows_the_source_and_its_headers(tmp_path, monkeypatch):
    """A cached build is reused only for the same source and headers: changing either names a new build (the kernel's
    softmax lives in a header, ``softmax_lanes.h``)."""
    source, header = tmp_path / "shared_attention.cpp", tmp_path / "softmax_lanes.h"
    source.write_text("// source")
    header.write_text("// header")
    monkeypatch.setattr(cpu_kernel, "SOURCE", source)
    names = []
    for path, text in ((None, None), (header, "// header, changed"), (source, "// source, changed")):
        if path is not None:
            path.write_text(text)
        cpu_kernel._build_name.cache_clear()
        names.append(cpu_kernel._build_name())
    cpu_kernel._build_name.cache_clear()  # the real source's name is computed afresh after the test
    assert len(set(names)) == 3


@pytest.mark.skipif(not X86 or "avx2" not in cpu_kernel._cpu_identity(), reason="needs an x86 CPU with AVX2")
@pytest.mark.parametrize("mode", ["avx2", "narrow"])
def test_without_avx512_example_runs_the_narrower_builds(mode):
    """``examples/without_avx512.py`` runs a script with torch held to AVX2 (or its baseline) and the kernel built
    without AVX-512 (or AVX), as it says; ``attention_core.py --decode`` times the kernel's decode rows there."""
    command = [sys.executable, "examples/without_avx512.py", *(["--narrow"] if mode == "narrow" else [])]
    command += ["examples/attention_core.py", "--decode", "--tokens", "256", "--repeats", "1"]
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler: the CPU kernel cannot be built here")
    python_path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, cpu_kernel.SETTING_VARIABLE: "on", "PYTHONPATH": python_path}
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr
    torch_kernels, vector_bytes = ("AVX2", 32) if mode == "avx2" else ("DEFAULT", 16)
    assert f"torch kernels {torch_kernels}, LiSA kernel portable with {vector_bytes}-byte vectors" in result.stderr
    assert "| shared row, kernel decode rows |" in result.stdout
