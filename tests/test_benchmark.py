"""The benchmark (peft_lisa.benchmark, examples/benchmark.py): structure, cache accounting, outputs, skip logic,
and benchmark_model (peft-lisa bench as a library call).

Tiny models and sizes only; nothing here asserts on timings.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import logging

import pytest
import torch
from peft import get_peft_model
from torch._dynamo.utils import counters
from transformers import CompileConfig

from peft_lisa import AttentionAnalysis, LiSAConfig, LiSAFullAttention
from peft_lisa.benchmark import (
    BenchmarkResult,
    ModelShape,
    PeakMemory,
    TensorPeak,
    analytic_breakdown,
    base_on_decode_rows,
    benchmark_model,
    cache_bytes,
    ceilings,
    default_share_layers,
    estimate_working_bytes,
    run_benchmark,
    synthetic_cache,
)
from peft_lisa.benchmark.controls import decode_rows_in_use, plain_full_layers
from peft_lisa.benchmark.cost_model import chain_depths, earlier_link_pair_flops
from peft_lisa.benchmark.layer_clock import _alternating_layer_times, decode_layer_times, prefill_layer_times
from peft_lisa.tuner import cpu_kernel

from .conftest import REPO_ROOT, require_cpu_kernel, tiny_model

SHARE, RANK = [2, 3], 4
SMALL = dict(batch_sizes=(1, 2), contexts=(8, 16), decode_tokens=2, repeats=1, warmup=0, progress=False)


_THREADS = torch.get_num_threads()


def setup_module():
    """One torch thread for the whole module (before its fixtures): the shared CI machines make multi-threaded tiny
    ops very slow."""
    torch.set_num_threads(1)


def teardown_module():
    torch.set_num_threads(_THREADS)


@pytest.fixture(scope="module")
def models():
    base = tiny_model("llama")
    merged = get_peft_model(
        copy.deepcopy(base), LiSAConfig(share_layers=SHARE, rank=RANK, align_hidden=None)
    ).merge_and_unload()
    return base, merged.eval()


@pytest.fixture(scope="module")
def result(models) -> BenchmarkResult:
    return run_benchmark(*models, device="cpu", **SMALL)


def analytic_bytes_per_token(config, share_layers, rank, element_bytes=4):
    kv_heads, head_dim = config.num_key_value_heads, config.hidden_size // config.num_attention_heads
    full = 2 * kv_heads * head_dim * element_bytes
    shared = kv_heads * (rank + head_dim) * element_bytes
    return (config.num_hidden_layers - len(share_layers)) * full + len(share_layers) * shared


def test_result_structure(result):
    assert {(r.model, r.batch, r.context) for r in result.runs} == {
        (model, batch, context) for model in ("base", "merged") for batch in (1, 2) for context in (8, 16)
    }
    for run in result.runs:
        assert len(run.prefill_seconds) == len(run.decode_seconds) == 1
        assert run.prefill_tokens_per_s > 0 and run.decode_tokens_per_s > 0
        assert run.decode_cache == "prefill"
        assert run.peak_memory_bytes >= result.models[run.model].weight_bytes
    assert not result.skipped
    assert result.machine["torch"] == torch.__version__ and result.machine["cpu"]
    assert result.machine["torch_threads"] == 1
    assert result.models["base"].attn_implementation == "sdpa"
    assert result.models["merged"].share_layers == SHARE and result.models["merged"].source_layers == [1]
    assert result.models["merged"].num_parameters < result.models["base"].num_parameters
    assert result.compression["ratio"] > 1


def test_cache_bytes_per_token_match_the_config(result, models):
    config = models[0].config
    expected_base = analytic_bytes_per_token(config, [], RANK)
    expected_merged = analytic_bytes_per_token(config, SHARE, RANK)
    assert expected_merged < expected_base
    for run in result.runs:
        expected = expected_base if run.model == "base" else expected_merged
        assert run.kv_cache_bytes_per_token == expected
        assert run.kv_cache_bytes == expected * run.batch * run.context
    assert result.models["base"].kv_cache_bytes_per_token_analytic == expected_base
    assert result.models["merged"].kv_cache_bytes_per_token_analytic == expected_merged


def test_max_throughput(result):
    mt = result.max_throughput
    assert mt is not None and mt.context == 16
    base, merged = mt.points["base"], mt.points["merged"]
    assert base.max_batch == 2  # the default budget is the base model at the largest batch and context
    assert merged.max_batch >= base.max_batch
    for point in (base, merged):
        assert point.method.startswith("measured") and point.decode_tokens_per_s > 0
        assert point.weight_bytes + point.kv_cache_bytes <= mt.budget_bytes
    assert mt.ratio == pytest.approx(merged.decode_tokens_per_s / base.decode_tokens_per_s)


def test_outputs_written(result, tmp_path):
    data = json.loads(result.to_json(tmp_path / "out" / "results.json").read_text())
    assert set(data) >= {"machine", "settings", "models", "runs", "skipped", "compression", "max_throughput"}
    assert data["runs"][0]["prefill_tokens_per_s"] > 0 and "kv_cache_bytes_per_token" in data["runs"][0]
    assert data["max_throughput"]["ratio"] > 0
    markdown = result.to_markdown()
    assert "| batch | context |" in markdown and result.machine["cpu"] in markdown
    assert "Analytic cost per query token" in markdown and "align FFN" in markdown
    png = result.plot(tmp_path / "plot.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_notes_name_merged_layers_that_keep_the_base_attention(models, monkeypatch):
    """A merged model's full layers that feed no shared layer decode by the kernel's rows (LiSAFullAttention), and the
    notes say so; a file merged before their layouts were saved keeps the base's attention module there, which
    decodes through sdpa: the notes name those layers and the fix instead of claiming every layer takes the rows."""
    require_cpu_kernel(monkeypatch)
    base, merged = models
    older = copy.deepcopy(merged)
    plain = [idx for idx, layer in enumerate(older.model.layers) if type(layer.self_attn) is LiSAFullAttention]
    assert plain  # the tiny model has full layers that feed no shared layer
    for idx in plain:
        older.model.layers[idx].self_attn = copy.deepcopy(base.model.layers[idx].self_attn)
    assert plain_full_layers(merged) == [] and plain_full_layers(older) == plain
    point = {**SMALL, "batch_sizes": (1,), "contexts": (8,), "max_throughput": False}
    notes = " ".join(run_benchmark(base, merged, device="cpu", **point).notes)
    assert "Every other layer of the merged model runs sdpa on prefill and, like the source and shared layers" in notes
    notes = " ".join(run_benchmark(base, older, device="cpu", **point).notes)
    assert f"The merged model's layers {plain} keep the base's attention module, sdpa on decode steps too" in notes
    assert "merge the adapter again" in notes and "Every other layer of the merged model" not in notes
    control = base_on_decode_rows(copy.deepcopy(base))  # against the control those layers' sdpa is in the ratios
    notes = " ".join(run_benchmark(control, older, device="cpu", **point).notes)
    assert "the decode ratios are LiSA's share and those layers' sdpa" in notes


def test_skip_logic(models):
    base, merged = models
    shapes = {"base": ModelShape.of(base), "merged": ModelShape.of(merged)}
    # A limit between the two models' prefill needs at (2, 16): the merged prefill is skipped, its decode runs on a
    # synthetic cache; the base runs normally.
    merged_prefill = estimate_working_bytes(shapes["merged"], 2, 16, 2, "prefill")
    limit = merged_prefill - 1
    assert estimate_working_bytes(shapes["base"], 2, 16, 2, "prefill") <= limit
    assert estimate_working_bytes(shapes["merged"], 2, 16, 2, "decode") <= limit
    assert estimate_working_bytes(shapes["merged"], 1, 16, 2, "prefill") <= limit
    result = run_benchmark(base, merged, device="cpu", memory_limit_bytes=limit, **{**SMALL, "batch_sizes": (1, 2)})
    skipped = {(s.model, s.batch, s.context, s.phase) for s in result.skipped}
    assert ("merged", 2, 16, "prefill") in skipped
    assert all(s.estimated_bytes > s.limit_bytes == limit and "exceeds the limit" in s.reason for s in result.skipped)
    run = result.run("merged", 2, 16)
    assert run.decode_cache == "synthetic" and run.prefill_tokens_per_s is None and run.decode_tokens_per_s > 0
    assert result.run("base", 2, 16).decode_cache == "prefill"
    markdown = result.to_markdown()
    assert "### Skipped" in markdown and "synthetic cache" in markdown

    capped = run_benchmark(base, merged, device="cpu", max_prefill_tokens=16, max_throughput=False, **SMALL)
    # Above the cap the prefill is skipped and decoding is timed on a synthetic cache of the same size.
    assert {(r.batch, r.context) for r in capped.runs} == {(1, 8), (2, 8), (1, 16), (2, 16)}
    [cap] = capped.skipped
    assert (cap.model, cap.batch, cap.context, cap.phase) == ("both", 2, 16, "prefill")
    assert "max_prefill_tokens=16" in cap.reason
    for key in ("base", "merged"):
        run = capped.run(key, 2, 16)
        assert run.decode_cache == "synthetic" and run.prefill_tokens_per_s is None and run.decode_tokens_per_s > 0
        assert capped.run(key, 1, 16).decode_cache == "prefill"
    assert capped.max_throughput is None

    # Nothing fits: everything is listed as skipped, the outputs still render.
    nothing = run_benchmark(base, merged, device="cpu", memory_limit_bytes=1, **SMALL)
    assert not nothing.runs
    grid_skips = {(s.batch, s.context) for s in nothing.skipped if s.phase != "max-throughput decode"}
    assert grid_skips == {(b, c) for b in (1, 2) for c in (8, 16)}
    assert all(not p.method.startswith("measured") for p in nothing.max_throughput.points.values())
    assert "### Skipped" in nothing.to_markdown()


def test_static_cache_run(models, monkeypatch):
    """``cache="static"``: every timed decode (after a prefill, on a synthetic cache, and the max-throughput measure)
    runs on a ``StaticCache``, the cache bytes count the prompt's tokens (not the slots kept free for decoding), and
    the settings and the report say which cache."""
    import peft_lisa.benchmark.measure as measure_module

    base, merged = models
    decoded_on, real_timed_decode = [], measure_module.timed_decode

    def recording(model, kv_cache, *args):
        decoded_on.append((type(kv_cache).__name__, int(kv_cache.get_seq_length())))
        return real_timed_decode(model, kv_cache, *args)

    monkeypatch.setattr(measure_module, "timed_decode", recording)
    # The merged prefill at (2, 16) does not fit the limit: its decode runs on a synthetic static cache.
    limit = estimate_working_bytes(ModelShape.of(merged), 2, 16, 2, "prefill") - 1
    result = run_benchmark(base, merged, device="cpu", cache="static", memory_limit_bytes=limit, **SMALL)
    assert result.run("merged", 2, 16).decode_cache == "synthetic"
    assert {name for name, _ in decoded_on} == {"StaticCache"}
    assert {length for _, length in decoded_on} >= {8, 16}  # decoding starts after the prompt, not at the slots' end
    expected = {key: analytic_bytes_per_token(model.config, SHARE if key == "merged" else [], RANK) for key, model in
                (("base", base), ("merged", merged))}  # fmt: skip
    for run in result.runs:
        assert run.kv_cache_bytes == expected[run.model] * run.batch * run.context
    assert all(p.method.endswith("16-token static cache)") for p in result.max_throughput.points.values())
    assert result.settings["cache"] == "static" and "decode steps on a static cache" in result.to_markdown()
    with pytest.raises(ValueError, match="cache must be one of 'dynamic', 'static', 'compiled', got 'paged'"):
        run_benchmark(base, merged, device="cpu", cache="paged", **SMALL)


def test_compiled_decode_run(models, monkeypatch):
    """``cache="compiled"``: the decode steps of both models run as ``generate`` compiles them (their
    ``get_compiled_call``), one whole graph per model and shape, compiled in an untimed repetition, on a static
    cache; prefills stay eager; the report says so. (The eager backend here: ``tests/test_compile.py`` runs the
    inductor one.)"""
    import peft_lisa.benchmark.measure as measure_module

    base, merged = models
    monkeypatch.setattr(
        measure_module, "COMPILED_DECODING", CompileConfig(backend="eager", fullgraph=True, dynamic=False)
    )
    torch._dynamo.reset()
    counters.clear()
    compiled_calls = []
    for model in (base, merged):
        real = model.get_compiled_call

        def recording(config, model=model, real=real):
            compiled_calls.append((model, config.backend))
            return real(config)

        monkeypatch.setattr(model, "get_compiled_call", recording)
    # more decode steps than the tensor-counting pass takes (16), no warm-up asked for
    small = {**SMALL, "batch_sizes": (2,), "contexts": (8,), "decode_tokens": 20, "warmup": 0}
    result = run_benchmark(base, merged, device="cpu", cache="compiled", max_throughput=False, **small)
    assert {id(model) for model, _ in compiled_calls} == {id(base), id(merged)}
    assert {backend for _, backend in compiled_calls} == {"eager"}
    # one graph per model and shape: the warm start's and the point's; the tensor-counting pass decodes on the timed
    # passes' cache shape, and a warm-up repetition compiles before the timed one
    assert counters["stats"]["unique_graphs"] == 4
    assert result.settings["warmup"] == 1
    assert all(run.decode_tokens_per_s > 0 and run.prefill_tokens_per_s > 0 for run in result.runs)
    assert "decode steps on a static cache, compiled (torch.compile)" in result.to_markdown()
    with pytest.raises(ValueError, match="cache must be one of 'dynamic', 'static', got 'compiled'"):
        decode_layer_times(base, merged, batch=1, context=8, steps=1, repeats=1, cache="compiled")


def test_max_throughput_extrapolates_when_too_big(models):
    base, merged = models
    shape = ModelShape.of(merged)
    limit = estimate_working_bytes(shape, 2, 16, 2, "prefill")  # the grid fits ...
    budget = shape.weight_bytes + 100 * shape.cache_bytes_per_token * 18  # ... a batch of ~100 at context 16 does not
    result = run_benchmark(
        base, merged, device="cpu", memory_limit_bytes=limit, memory_budget_bytes=budget, **SMALL
    )  # fmt: skip
    for point in result.max_throughput.points.values():
        assert point.max_batch > 2
        assert point.method.startswith("EXTRAPOLATED") and point.decode_tokens_per_s > 0
    assert "EXTRAPOLATED" in result.to_markdown()


def test_synthetic_cache_has_the_prefill_shapes(models):
    _, merged = models
    ids = torch.randint(3, 100, (2, 7))
    with torch.inference_mode():
        real = merged(input_ids=ids, use_cache=True).cache
        fake = synthetic_cache(merged, 2, 7, torch.device("cpu"))
    shapes = [[(layer.keys.shape, layer.values.shape) for layer in cache.layers] for cache in (real, fake)]
    assert shapes[0] == shapes[1]
    assert [layer.keys.shape[-1] for layer in fake.layers] == [16, 16, RANK, RANK, 16]
    assert cache_bytes(fake) == cache_bytes(real) == ModelShape.of(merged).cache_bytes_per_token * 2 * 7


def test_static_synthetic_cache_decodes_as_the_dynamic_one(models):
    """``static_slots``: a StaticCache whose first ``context`` slots hold the dynamic synthetic cache's random keys
    and values (the same seed), rank-r keys in shared layers; a decode step on it gives the logits the dynamic one
    gives, and writes its token in place. Too few slots are refused."""
    _, merged = models
    device = torch.device("cpu")
    next_ids = torch.tensor([[5], [9]])
    with torch.inference_mode():
        dynamic = synthetic_cache(merged, 2, 7, device, seed=3)
        static = synthetic_cache(merged, 2, 7, device, seed=3, static_slots=10)
        for fake, real in zip(static.layers, dynamic.layers, strict=True):
            assert fake.keys.shape[-2:] == (10, real.keys.shape[-1]) and fake.get_seq_length() == 7
            assert torch.equal(fake.keys[:, :, :7], real.keys) and torch.equal(fake.values[:, :, :7], real.values)
        keys = static.layers[2].keys
        assert keys.shape[-1] == RANK
        expected = merged(input_ids=next_ids, cache=dynamic, use_cache=True).logits
        torch.testing.assert_close(merged(input_ids=next_ids, cache=static, use_cache=True).logits, expected)
        assert static.layers[2].keys is keys and static.get_seq_length() == 8
    with pytest.raises(ValueError, match="no slot to decode into"):
        synthetic_cache(merged, 2, 7, device, static_slots=7)


def test_static_cache_run_with_sliding_window_layers():
    """``cache="static"`` on a model whose layers have sliding windows (4 tokens, shorter than the contexts): the
    decodes on a synthetic cache (above ``max_prefill_tokens``) and the max-throughput measure run there too."""
    base = tiny_model("mistral", sliding_window=4)
    merged = get_peft_model(copy.deepcopy(base), LiSAConfig(share_layers=SHARE, rank=RANK)).merge_and_unload()
    result = run_benchmark(base, merged.eval(), device="cpu", cache="static", max_prefill_tokens=8, **SMALL)
    assert {r.decode_cache for r in result.runs if r.batch * r.context > 8} == {"synthetic"}
    assert all(r.decode_tokens_per_s > 0 for r in result.runs)
    assert all(p.method.startswith("measured") for p in result.max_throughput.points.values())


@pytest.mark.parametrize("window", [16, 4])
def test_static_synthetic_cache_of_sliding_window_layers(window):
    """Sliding-window layers in a static synthetic cache: ``min(window, slots)`` slots, the tokens seen counted. With
    the window beyond the context a decode step gives the logits of the dynamic synthetic cache (the same random
    keys); with the window full it writes its token in place too."""
    base = tiny_model("mistral", sliding_window=window)
    merged = get_peft_model(base, LiSAConfig(share_layers=SHARE, rank=RANK)).merge_and_unload().eval()
    device, next_ids = torch.device("cpu"), torch.tensor([[5], [9]])
    with torch.inference_mode():
        static = synthetic_cache(merged, 2, 7, device, seed=3, static_slots=10)
        assert [layer.keys.shape[-2] for layer in static.layers] == [min(window, 10)] * 5
        assert static.get_seq_length() == 7
        keys = static.layers[2].keys
        logits = merged(input_ids=next_ids, cache=static, use_cache=True).logits
        assert static.layers[2].keys is keys and static.get_seq_length() == 8
        if window > 7:
            dynamic = synthetic_cache(merged, 2, 7, device, seed=3)
            torch.testing.assert_close(logits, merged(input_ids=next_ids, cache=dynamic, use_cache=True).logits)


def test_analytic_breakdown(models):
    _, merged = models
    shape = ModelShape.of(merged)
    heads, m, dh, r = 4, 16, 16, RANK
    assert shape.align_hidden == m and shape.rank == r
    analytic = analytic_breakdown(shape, contexts=(8, 64))
    rows = {row["layer_type"]: row for row in analytic["layer_types"]}
    shared = rows["shared (LiSA)"]
    assert shared["per_key_flops"]["align P"] == 2 * heads * heads
    assert shared["per_key_flops"]["align FFN"] >= 4 * heads * m
    assert shared["per_key_flops"]["low-rank QK^T"] == 2 * heads * r
    assert rows["full (sdpa)"]["per_key_flops"] == {"QK^T": 2 * heads * dh, "AV": 2 * heads * dh}
    assert shared["kv_cache_bytes_per_token"] == 2 * (r + dh) * 4
    assert rows["full (sdpa)"]["layers_merged"] + rows["source (full, hands its logits on)"]["layers_merged"] == 3
    assert shared["layers_merged"] == len(shape.share_layers)
    assert shared["projection_flops"] < rows["full (sdpa)"]["projection_flops"]
    for row in analytic["per_context"]:
        assert row["kv_read_ratio_base_over_merged"] > 1


def test_peak_memory_sees_an_allocation():
    with PeakMemory(torch.device("cpu")) as peak:
        block = torch.ones(8 * 1024 * 1024)  # 32 MiB, touched
        del block
    if peak.method.startswith("psutil"):
        pytest.skip("RSS sampling can miss short peaks")
    assert peak.peak >= 24 * 1024 * 1024


def test_tensor_peak_counts_live_tensors_only():
    """Two tensors alive at once (4 + 2 MiB), then one freed and a smaller one made: the peak is their sum, 6 MiB,
    not the 7 MiB allocated in all; a tensor alive before the block does not count."""
    before = torch.ones(1024 * 1024)  # 4 MiB
    with TensorPeak(torch.device("cpu")) as tensors:
        big = torch.ones(1024 * 1024)
        small = torch.ones(512 * 1024)
        del big
        other = torch.ones(256 * 1024)
        del small, other
    assert before.numel() and tensors.peak == pytest.approx(6 * 2**20, abs=64 * 1024)


def test_runs_record_peak_tensor_bytes(result):
    """Every grid point measures the peak bytes of live tensors of each model; at least the KV cache it built."""
    for run in result.runs:
        assert run.peak_tensor_bytes is not None and run.peak_tensor_bytes >= run.kv_cache_bytes
    assert "peak tensors" in result.to_markdown()


def test_max_throughput_ceiling_is_batch_over_bytes_read(result):
    mt = result.max_throughput
    base, merged = mt.points["base"], mt.points["merged"]
    for point in (base, merged):
        assert point.step_bytes == point.weight_bytes + point.kv_cache_bytes
    expected = (merged.max_batch / merged.step_bytes) / (base.max_batch / base.step_bytes)
    assert mt.ceiling == pytest.approx(expected) and mt.to_dict()["ceiling"] == pytest.approx(expected)
    assert f"ceiling {mt.ceiling:.3f}x" in result.to_markdown()


def test_default_share_layers():
    assert default_share_layers(30, 0.5) == list(range(1, 30, 2))
    assert default_share_layers(30, 0.25) == [14, 16, 18, 20, 23, 25, 27, 29]
    for layers, fraction in ((30, 0.84), (5, 0.5), (2, 0.5), (12, 0.1)):
        chosen = default_share_layers(layers, fraction)
        assert 0 not in chosen and len(chosen) == len(set(chosen)) == max(1, min(round(fraction * layers), layers - 1))
    with pytest.raises(ValueError):
        default_share_layers(30, 1.0)


def test_example_script_quick(tmp_path, capsys):
    """examples/benchmark.py end to end on a saved tiny model."""
    model_dir = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(model_dir)
    out = tmp_path / "bench"
    spec = importlib.util.spec_from_file_location("benchmark_example", REPO_ROOT / "examples" / "benchmark.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    argv = ["--model", str(model_dir), "--share-layers", "2,3", "--rank", "4", "--quick", "--batch-sizes", "1"]
    argv += ["--contexts", "8", "--threads", "1", "--device", "cpu", "--quiet", "--output-dir", str(out)]
    assert example.main(argv) == 0
    data = json.loads((out / "results.json").read_text())
    assert data["models"]["merged"]["share_layers"] == [2, 3] and data["settings"]["batch_sizes"] == [1]
    assert data["settings"]["decode_tokens"] == 4 and data["settings"]["repeats"] == 1  # --quick defaults
    assert "--share-layers" in data["settings"]["command"]
    assert (out / "results.md").read_text().startswith("# LiSA benchmark")
    assert (out / "benchmark.png").stat().st_size > 0
    assert "| batch | context |" in capsys.readouterr().out


def test_cache_accounting_follows_the_lowrank_dtype():
    """Merging a bf16 base casts the LiSA modules to bf16 (rank-r keys cached in bf16); casting them back to float32
    by hand gives float32 keys, and the accounting follows either way."""
    base = tiny_model("llama").to(torch.bfloat16)
    merged = get_peft_model(
        copy.deepcopy(base), LiSAConfig(share_layers=SHARE, rank=RANK, align_hidden=None)
    ).merge_and_unload()
    mixed = copy.deepcopy(merged)
    for layer_idx in SHARE:
        for part in ("q_lowrank", "k_lowrank"):
            getattr(mixed.model.layers[layer_idx].self_attn, part).float()
    for model, key_bytes in ((merged, 2), (mixed, 4)):
        shape = ModelShape.of(model)
        assert shape.element_bytes == 2 and shape.lowrank_key_bytes == key_bytes
        assert shape.mixed_dtype == (key_bytes == 4)
        with torch.inference_mode():
            cache = model(input_ids=torch.randint(3, 100, (2, 5)), use_cache=True).cache
        assert cache_bytes(cache) == shape.cache_bytes_per_token * 2 * 5


TINY_GRID = dict(batch_sizes=(1,), contexts=(8,), decode_tokens=1, repeats=1, warmup=0, max_throughput=False)


def test_benchmark_model_writes_outputs(tmp_path, caplog):
    """benchmark_model loads the base, merges an untrained adapter, benchmarks and writes; progress goes to the
    peft_lisa logger."""
    model_dir = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(model_dir)
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="peft_lisa"):
        outputs = benchmark_model(
            str(model_dir), share_layers=[2, 3], rank=RANK, device="cpu", output_dir=out, command="cmd", **TINY_GRID
        )
    assert outputs.files == [out / "results.json", out / "results.md", out / "benchmark.png"]
    data = json.loads((out / "results.json").read_text())
    assert data == json.loads(json.dumps(outputs.result.to_dict()))
    merged = data["models"]["merged"]
    assert (merged["share_layers"], merged["rank"], merged["align_hidden"], merged["dtype"]) == (
        [2, 3],
        RANK,
        0,
        "float32",
    )
    assert data["settings"]["command"] == "cmd" and data["settings"]["model_path"] == str(model_dir)
    assert "merged_model_path" not in data["settings"]
    assert outputs.markdown == (out / "results.md").read_text() and "**Command:** `cmd`" in outputs.markdown
    messages = "\n".join(caplog.messages)
    assert f"loading {model_dir}" in messages and "shared layers [2, 3] (given)" in messages
    assert "machine: " in messages and "B=1 T=8: base prefill" in messages

    # A saved merged model of the same base is loaded instead of making one; the default layer choice otherwise.
    merged_dir = tmp_path / "merged"
    get_peft_model(tiny_model("llama"), LiSAConfig(share_layers=[3], rank=RANK)).merge_and_unload().save_pretrained(
        merged_dir
    )
    again = benchmark_model(
        str(model_dir), merged=merged_dir, device="cpu", output_dir=out, progress=False, **TINY_GRID
    )
    assert again.result.models["merged"].share_layers == [3]
    assert again.result.settings["merged_model_path"] == str(merged_dir)
    default = benchmark_model(str(model_dir), device="cpu", output_dir=out, progress=False, **TINY_GRID)
    assert default.result.models["merged"].share_layers == default_share_layers(5, 0.5)
    # With an analysis: its best round(0.4 * 5) layers from layer 2 on (default_share_layers would give [1, 4]).
    js = [None, 0.5, 0.4, 0.1, 0.2]
    analysis = AttentionAnalysis(
        model_name="tiny", num_layers=5, num_heads=4, num_kv_heads=2, seq_len=8, num_sequences=1, num_tokens=8,
        query_rows=8, matrix_rows=8, js_indexed=js, js_matched=js, js_matched_grouped=js, permutations=[None] * 5,
        js_heads=[None] * 5, js_layers=[[0.0] * 5 for _ in range(5)],
    )  # fmt: skip
    chosen = benchmark_model(
        str(model_dir), analysis=analysis, share_fraction=0.4, device="cpu", output_dir=out, progress=False,
        **TINY_GRID,
    )  # fmt: skip
    assert chosen.result.models["merged"].share_layers == [3, 4] != default_share_layers(5, 0.4)


def test_benchmark_model_errors(tmp_path):
    model_dir, other_dir = tmp_path / "tiny", tmp_path / "other"
    tiny_model("llama").save_pretrained(model_dir)
    with pytest.raises(ValueError, match=r"share_layers contains \[7\], but the model has 5 layers"):
        benchmark_model(str(model_dir), share_layers=[2, 7], device="cpu", output_dir=tmp_path, **TINY_GRID)
    other = tiny_model("llama", num_hidden_layers=4)
    get_peft_model(other, LiSAConfig(share_layers=[3], rank=RANK)).merge_and_unload().save_pretrained(other_dir)
    with pytest.raises(ValueError, match="is not a merged model of"):
        benchmark_model(str(model_dir), merged=other_dir, device="cpu", output_dir=tmp_path, **TINY_GRID)
    with pytest.raises(OSError, match="could not load the model"):
        benchmark_model(str(tmp_path / "missing"), device="cpu", output_dir=tmp_path, **TINY_GRID)
    assert not (tmp_path / "results.json").exists()


def test_runs_record_kernel_time_and_ceilings(result):
    """Every run carries the process's kernel time per repetition and the arithmetic bounds of its grid point; the
    decode bound is the ratio of the bytes a step reads (weights + the KV cache the run measured)."""
    base_info, merged_info = result.models["base"], result.models["merged"]
    for run in result.runs:
        assert len(run.kernel_seconds) == 1 and run.kernel_seconds[0] >= 0
        base_run, merged_run = result.run("base", run.batch, run.context), result.run("merged", run.batch, run.context)
        read_base = base_info.weight_bytes + base_run.kv_cache_bytes
        read_merged = merged_info.weight_bytes + merged_run.kv_cache_bytes
        assert run.ceilings["decode"] == pytest.approx(read_base / read_merged, rel=1e-6)
        assert run.ceilings["prefill"] > 0
    assert "ceiling" in result.to_markdown() and "kernel s" in result.to_markdown()


def test_prefill_ceiling_counts_the_shared_layers_arithmetic(models):
    """Hand count on the tiny model: 2 of 5 layers shared, d=64, I=96, H=4, H_kv=2, d_h=16, r=4, m=16, V=128."""
    base, merged = (ModelShape.of(model) for model in models)
    context = 10
    pairs = context * (context + 1) / 2
    mlp = 6 * 64 * 96
    full = (2 * 64 * 64 + 4 * 64 * 32 + 2 * 64 * 64 + mlp) * context + 4 * 4 * 16 * pairs
    shared = (2 * 64 * 6 * 4 + 2 * 64 * 32 + 2 * 64 * 64 + mlp) * context
    shared += (4 * 4 * 16 + 2 * 16 + 4 * 4 * 16 + 2 * 4 * 4) * pairs
    head = 2 * 64 * 128
    # layer 3 follows shared layer 2: its source logits need layer 2's alignment (P, FFN) and low-rank term again
    earlier_link = (2 * 16 + 4 * 4 * 16 + 2 * 4 * 4) * pairs
    bounds = ceilings(base, merged, 1, context)
    assert bounds["prefill"] == pytest.approx((5 * full + head) / (3 * full + 2 * shared + earlier_link + head))
    assert bounds["prefill_no_chain"] == pytest.approx((5 * full + head) / (3 * full + 2 * shared + head))


def test_chain_depths_and_the_cheaper_recomputation_of_an_earlier_link(models):
    """A chain link's depth counts the shared layers before it; an earlier link costs the cheaper of its own-basis
    alignment + low-rank term and its rank-r queries spread against all KV heads (linear alignment only)."""
    assert chain_depths((4, 5, 6, 9, 13, 14)) == {4: 1, 5: 2, 6: 3, 9: 1, 13: 1, 14: 2}
    shape = ModelShape.of(models[1])
    smollm2 = dataclasses.replace(shape, num_heads=9, num_kv_heads=3, rank=8, align_hidden=0)
    assert earlier_link_pair_flops(smollm2) == 2 * 81 + 2 * 9 * 8  # < 2 * 9 * 3 * 8
    multi_query = dataclasses.replace(smollm2, num_kv_heads=1)
    assert earlier_link_pair_flops(multi_query) == 2 * 9 * 1 * 8  # < 2 * 81 + 2 * 9 * 8
    with_ffn = dataclasses.replace(multi_query, align_hidden=16)  # a nonlinear alignment recomputes in its basis
    assert earlier_link_pair_flops(with_ffn) == 2 * 81 + 4 * 9 * 16 + 2 * 9 * 8


TINY_GEOMETRY = dict(
    model_type="llama", hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=128, num_hidden_layers=8,
)  # fmt: skip


@pytest.mark.parametrize("cache, rows_control", [("dynamic", None), ("static", None), ("dynamic", False)])
def test_geometry_layer_times_and_full_depth_estimate(monkeypatch, cache, rows_control):
    """The per-layer decode clock on a tiny stand-in geometry, on either cache, with the control where the decode
    rows run (the base on the rows) or without it: every layer kind is timed, cache bytes per kind are the model's,
    and the full-depth estimate adds them up as documented."""
    from peft_lisa.benchmark import geometry

    monkeypatch.setitem(geometry.GEOMETRIES, "tiny", TINY_GEOMETRY)
    built, controls = [], []  # the caches the clock decoded on; the models made the control

    def recorded_cache(*args, **kwargs):
        built.append(synthetic_cache(*args, **kwargs))
        return built[-1]

    def recorded_control(model):
        controls.append(base_on_decode_rows(model))
        return controls[-1]

    monkeypatch.setattr(geometry, "synthetic_cache", recorded_cache)
    monkeypatch.setattr(geometry, "base_on_decode_rows", recorded_control)
    times = geometry.layer_decode_times(
        "tiny", batch=2, context=32, decode_tokens=2, repeats=1, dtype=torch.float32, cache=cache,
        rows_control=rows_control,
    )  # fmt: skip
    control = rows_control is None and decode_rows_in_use(torch.device("cpu"))  # where the rows run, by default
    assert len(controls) == int(control)
    assert all(isinstance(layer.self_attn, LiSAFullAttention) for model in controls for layer in model.model.layers)
    assert times.cache == cache and len(built) == 2 * (3 if control else 2)  # a warm-up and one repetition
    expected = "StaticCache" if cache == "static" else "DynamicCache"
    assert {type(kv).__name__ for kv in built} == {expected}
    kinds = {"full", "source", "shared"} | ({"rows"} if control else set())
    assert set(times.seconds) == kinds and all(s > 0 for s in times.seconds.values())
    full, shared = 2 * 2 * 16 * 4, 2 * (8 + 16) * 4  # fp32: K and V of 2 KV heads x 16; rank-8 keys and V
    rows = {"rows": full} if control else {}
    assert times.cache_bytes_per_token == {"full": full, "source": full, "shared": shared, **rows}
    estimate = geometry.full_depth_estimate(times, share_fraction=0.5)
    merged = estimate["models"]["merged"]
    assert merged["layers"] == {"full": 0, "source": 4, "shared": 4}
    step = times.outside_layers["merged"] + 4 * times.seconds["source"] + 4 * times.seconds["shared"]
    assert merged["decode_step_seconds"] == pytest.approx(step)
    assert estimate["models"]["base"]["budget_max_batch"] == 2 and merged["budget_max_batch"] >= 2
    table = geometry.geometry_markdown([(times, estimate)])
    assert f"| tiny | 2 x 32, {cache} cache |" in table
    if control:
        on_rows = estimate["models"]["base rows"]
        assert on_rows["layers"] == {"rows": 8} and on_rows["budget_max_batch"] == 2
        rows_step = times.outside_layers["base rows"] + 8 * times.seconds["rows"]
        assert on_rows["decode_step_seconds"] == pytest.approx(rows_step)
        assert estimate["decode_speedup_over_rows"] == pytest.approx(rows_step / step)
        budgeted = merged["budget_tokens_per_s"] / on_rows["budget_tokens_per_s"]
        assert estimate["budget_throughput_ratio_over_rows"] == pytest.approx(budgeted)
        assert f"| {times.seconds['full'] * 1e3:.1f} | {times.seconds['rows'] * 1e3:.1f} |" in table
    else:
        assert "base rows" not in estimate["models"] and "Control" not in table
    with pytest.raises(ValueError, match="cache must be one of 'dynamic', 'static', got 'paged'"):
        geometry.layer_decode_times("tiny", cache="paged")


def test_geometry_control_only_where_the_decode_rows_run(monkeypatch, tmp_path):
    """With the kernel off the base on rows would decode as the base does: the control is left out by default and
    refused when asked for; the example's command line records the choice."""
    from peft_lisa.benchmark import geometry

    monkeypatch.setitem(geometry.GEOMETRIES, "tiny", TINY_GEOMETRY)
    monkeypatch.setenv(cpu_kernel.SETTING_VARIABLE, "off")
    with pytest.raises(ValueError, match="rows_control=True: the base on rows decodes through the CPU kernel's"):
        geometry.layer_decode_times("tiny", rows_control=True)
    with pytest.raises(ValueError, match="which meta does not run"):
        geometry.layer_decode_times("tiny", rows_control=True, device="meta")
    spec = importlib.util.spec_from_file_location("geometry_example", REPO_ROOT / "examples" / "geometry_benchmark.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    argv = ["--geometries", "tiny", "--batch", "2", "--context", "16", "--decode-tokens", "1", "--repeats", "1"]
    example.main([*argv, "--no-rows-control", "--output-dir", str(tmp_path)])
    data = json.loads((tmp_path / "geometry.json").read_text())
    assert data["command"].endswith("--no-rows-control --output-dir " + str(tmp_path))
    assert set(data["rows"][0]["seconds"]) == {"full", "source", "shared"}
    assert "Control" not in (tmp_path / "geometry.md").read_text()


def test_prefill_by_layer_example_on_a_geometry(monkeypatch, tmp_path):
    """``examples/prefill_by_layer.py --geometry`` end to end on a tiny stand-in geometry: the truncated base and its
    merged copy in bf16, every shared layer after a source layer, timed layer by layer, the command and the models
    recorded; a model or layers of its own are refused with it."""
    from peft_lisa.benchmark import geometry

    monkeypatch.setitem(geometry.GEOMETRIES, "tiny", TINY_GEOMETRY)
    base, merged = geometry.geometry_models("tiny", 4, torch.bfloat16)
    assert {p.dtype for p in (*base.parameters(), *merged.parameters())} == {torch.bfloat16}
    spec = importlib.util.spec_from_file_location("prefill_example", REPO_ROOT / "examples" / "prefill_by_layer.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = tmp_path / "layers"
    argv = ["--geometry", "tiny", "--context", "16", "--repeats", "1", "--threads", "1", "--output-dir", str(out)]
    assert example.main(argv) == 0
    data = json.loads((out / "layer_times.json").read_text())
    assert data["kinds"] == ["source", "shared", "source", "shared"] and data["depths"] == [0, 1, 0, 1]
    assert data["models"].startswith("tiny geometry, 4 random-weight layers") and data["models"].endswith("bfloat16")
    assert "--geometry tiny" in data["command"] and "--geometry tiny" in (out / "layer_times.md").read_text()
    chain = tmp_path / "chain"
    assert example.main([*argv[:-1], str(chain), "--share-layers", "1,2,3"]) == 0
    data = json.loads((chain / "layer_times.json").read_text())
    assert data["kinds"] == ["source", "shared", "shared", "shared"] and data["depths"] == [0, 1, 2, 3]
    assert "layers [1, 2, 3] shared" in data["models"]
    with pytest.raises(SystemExit):
        example.main(["--geometry", "tiny", "--analysis", "analysis.json"])


def test_time_outside_the_layers_is_a_median_of_repetitions(models):
    """A spike in a different layer in each repetition moves the median whole forward but no layer's median; the time
    outside the layers (here 0.5 s in every repetition) is taken per repetition, not as the difference of the medians
    (which would read 4.5 s)."""
    base, merged = models
    spikes = iter([[1.0] * 5, [5.0, 1, 1, 1, 1], [1, 5.0, 1, 1, 1], [1.0] * 5])  # warm-up, then three repetitions

    def timed(model, clock):
        clock.spent = list(next(spikes)) if model is base else [1.0] * 5
        return sum(clock.spent) + 0.5

    times = _alternating_layer_times(base, merged, timed, repeats=3, batch=1, context=16)
    assert times.base_total == 9.5 and times.base_seconds == [1.0] * 5
    assert times.base_outside == pytest.approx(0.5) and times.merged_outside == pytest.approx(0.5)
    assert "| outside the layers (embeddings, norm, LM head) | | | | +0.0 ms |" in times.to_markdown()


def test_prefill_layer_times_name_each_layer_and_its_chain_depth(models):
    """The per-layer prefill clock: one median per decoder layer of each model, the merged model's layer kinds and
    chain depths (layer 3 follows shared layer 2), layer times inside the forward's, and no hook left behind."""
    base, merged = models
    times = prefill_layer_times(base, merged, batch=1, context=16, repeats=2)
    assert times.kinds == ["full", "source", "shared", "shared", "full"]
    assert times.depths == [0, 0, 1, 2, 0]
    for seconds, total in ((times.base_seconds, times.base_total), (times.merged_seconds, times.merged_total)):
        assert len(seconds) == 5 and all(s > 0 for s in seconds) and sum(seconds) < total
    assert 0 < times.base_outside < times.base_total and 0 < times.merged_outside < times.merged_total
    rows = {row["layers"]: row["indices"] for row in times.by_depth()}
    assert rows == {"full": [0, 4], "source": [1], "shared, depth 1": [2], "shared, depth 2": [3]}
    assert "| shared, depth 2 (3) | 1 |" in times.to_markdown()
    for model in models:
        for layer in model.model.layers:
            assert not layer._forward_hooks and not layer._forward_pre_hooks
    with pytest.raises(ValueError, match="repeats must be at least 1"):
        prefill_layer_times(base, merged, repeats=0)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_decode_layer_times_clock_each_layer_per_decode_step(models, cache, monkeypatch):
    """The per-layer decode clock: ``steps`` single-token steps a repetition after an untimed prefill, each layer's
    time per step (the layers' sum below the step's own time, which fails when the prefill is counted or the steps
    are not divided out), on the cache asked for, and the report says so."""
    from peft_lisa.benchmark import layer_clock

    base, merged = models
    calls: list[list[int]] = [[], []]  # the query length of each forward, base and merged
    decoded_on, real_timed_decode = [], layer_clock.timed_decode

    def recording(model, kv_cache, *args):
        decoded_on.append(type(kv_cache).__name__)
        return real_timed_decode(model, kv_cache, *args)

    monkeypatch.setattr(layer_clock, "timed_decode", recording)
    hooks = [
        model.model.layers[0].register_forward_pre_hook(lambda m, args, seen=seen: seen.append(args[0].shape[1]))
        for model, seen in zip(models, calls, strict=True)
    ]
    try:
        times = decode_layer_times(base, merged, batch=2, context=16, steps=3, repeats=2, cache=cache)
    finally:
        for hook in hooks:
            hook.remove()
    assert calls == [[16, 1, 1, 1] * 3] * 2  # warm-up + 2 repetitions, each a prefill of 16 tokens and 3 steps of one
    assert decoded_on == ["StaticCache" if cache == "static" else "DynamicCache"] * 6
    assert (times.phase, times.decode_steps, times.batch, times.context, times.cache) == ("decode", 3, 2, 16, cache)
    assert times.kinds == ["full", "source", "shared", "shared", "full"]
    for seconds, total in ((times.base_seconds, times.base_total), (times.merged_seconds, times.merged_total)):
        assert len(seconds) == 5 and all(s > 0 for s in seconds) and sum(seconds) < total
    assert f"A decode step on a {cache} cache after a prefill of 2 x 16 tokens (3 steps)" in times.to_markdown()
    with pytest.raises(ValueError, match="steps must be at least 1"):
        decode_layer_times(base, merged, steps=0)
    with pytest.raises(ValueError, match="cache must be one of 'dynamic', 'static', got 'paged'"):
        decode_layer_times(base, merged, cache="paged")


def test_tensor_counting_pass_decodes_at_most_its_cap(models, monkeypatch):
    """The untimed pass under torch's profiler decodes at most ``TENSOR_PEAK_DECODE_STEPS`` steps (the profiler holds
    on to memory in long runs); the timed runs decode all of them, and the settings record the cap."""
    import peft_lisa.benchmark.run as run_module

    calls, counting = [], []
    real_decode, real_peak = run_module.prefill_then_decode, run_module.TensorPeak

    class RecordingPeak(real_peak):
        def __enter__(self):
            counting.append(True)
            return super().__enter__()

        def __exit__(self, *exc):
            counting.pop()
            return super().__exit__(*exc)

    def recording(model, ids, steps, *args):
        calls.append((bool(counting), steps))
        return real_decode(model, ids, steps, *args)

    monkeypatch.setattr(run_module, "prefill_then_decode", recording)
    monkeypatch.setattr(run_module, "TensorPeak", RecordingPeak)
    monkeypatch.setattr(run_module, "TENSOR_PEAK_DECODE_STEPS", 2)
    options = {**SMALL, "batch_sizes": (1,), "contexts": (8,), "decode_tokens": 5, "max_throughput": False}
    result = run_benchmark(*models, device="cpu", **options)
    counted = [steps for under_peak, steps in calls if under_peak]
    timed = [steps for under_peak, steps in calls if not under_peak]
    assert counted == [2, 2]  # base and merged
    assert timed.count(5) == 2  # one timed repetition of each model (the warm start decodes 2 steps of its own)
    assert result.settings["tensor_peak_decode_steps"] == 2
    assert "prefill + 2 decode steps" in result.to_markdown()


def test_paired_speedups_pair_the_models_repetition_by_repetition(result):
    """The section of per-repetition speedups pairs each repetition's base time with the merged model's time of the
    same repetition. The times are chosen so that neither the ratio of the medians (2x) nor ratios of the sorted
    times (1x-2x) give the expected cell."""
    run = dataclasses.replace(
        result,
        runs=[
            dataclasses.replace(result.run("base", 1, 8), prefill_seconds=[1.0, 2.0, 4.0], decode_seconds=[3.0]),
            dataclasses.replace(result.run("merged", 1, 8), prefill_seconds=[1.0, 4.0, 1.0], decode_seconds=[]),
        ],
        skipped=[],
    )
    ratios = sorted(b / m for b, m in zip([1.0, 2.0, 4.0], [1.0, 4.0, 1.0], strict=True))  # 0.5, 1, 4
    section = run.to_markdown().split("### Speedup repetition by repetition")[1]
    assert f"| 1 | 8 | {ratios[1]:.2f}x ({ratios[0]:.2f}-{ratios[2]:.2f}x) | - |" in section


def test_paired_decode_speedup_on_a_synthetic_cache_is_marked(result):
    """As in the main table, a decode timed on a synthetic cache says so in the per-repetition section."""
    base = dataclasses.replace(result.run("base", 1, 8), decode_seconds=[3.0, 2.0])
    merged = dataclasses.replace(result.run("merged", 1, 8), decode_seconds=[1.5, 2.0], decode_cache="synthetic")
    section = dataclasses.replace(result, runs=[base, merged], skipped=[]).to_markdown().split("repetition by")[1]
    assert "| 1.50x (1.00-2.00x) (synthetic cache) |" in section


def test_merged_models_are_made_from_a_second_load_not_a_deep_copy(tmp_path, monkeypatch):
    """The benchmark's merged model is made from a second load of the base (a geometry's from a second model built
    the same way), so that its weights lie in memory as the base's do: a deep copy's made the merged model prefill
    3% slower on the Intel Xeon. The base stays untouched, and the merged model's weights outside its LiSA layers
    equal the base's without sharing their memory."""
    from peft_lisa.benchmark import geometry, pipeline

    def refuse(_):
        raise AssertionError("the benchmark deep-copied the base model")

    monkeypatch.setattr(pipeline, "copy", type("NoDeepCopy", (), {"deepcopy": staticmethod(refuse)}))
    model_dir = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(model_dir)
    base, merged, _ = pipeline.load_benchmark_models(str(model_dir), share_layers=[2, 3], rank=RANK, device="cpu")
    monkeypatch.setitem(geometry.GEOMETRIES, "tiny", TINY_GEOMETRY)
    built, truncated_model = [], geometry.truncated_model
    monkeypatch.setattr(geometry, "truncated_model", lambda *args: built.append(args) or truncated_model(*args))
    geometry_base, geometry_merged = geometry.geometry_models("tiny", 4, torch.bfloat16)
    assert len(built) == 2
    for base_model, merged_model in ((base, merged), (geometry_base, geometry_merged)):
        assert base_model.config.model_type == "llama" and merged_model.config.model_type == "lisa_llama"
        weight, merged_weight = base_model.model.embed_tokens.weight, merged_model.model.embed_tokens.weight
        assert torch.equal(weight, merged_weight) and weight.data_ptr() != merged_weight.data_ptr()
