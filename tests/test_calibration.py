"""Layer-wise calibration (``peft_lisa.calibrate``) on tiny models."""

from __future__ import annotations

import random

import pytest
import torch
from peft import get_peft_model

from peft_lisa import CalibrationReport, LiSAConfig, calibrate
from peft_lisa.calibration_blocks import copy_run_blocks, mixed_token_blocks
from peft_lisa.calibration_step import LiSACalibrationConfig, calibration_seq_len
from peft_lisa.tuner.functional import permutation_matrix

from .conftest import VOCAB, tiny_model

FAST = dict(num_sequences=4, seq_len=32, batch_size=2, lbfgs_steps=15, adam_steps=20, lr=1e-2, progress=False)


class WordTokenizer:
    """``"w17 w3"`` -> ``[17, 3]``: all :func:`calibrate` needs of a tokenizer."""

    eos_token_id = 1

    def __call__(self, text: str, add_special_tokens: bool = False, verbose: bool = False) -> dict:
        return {"input_ids": [int(word[1:]) for word in text.split()]}


def texts(count: int = 8, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(f"w{rng.randrange(3, VOCAB)}" for _ in range(40)) for _ in range(count)]


def permuted_layer_model(layer: int, permutation: list[int], kv_permutation: list[int]):
    """A tiny Llama whose layer ``layer`` attends exactly as layer ``layer - 1`` with its heads permuted.

    Layer ``layer - 1`` adds nothing to the residual stream (zero o_proj and down_proj), and both layers share the
    input norm, so they see the same input; layer ``layer``'s query head ``i`` is query head ``permutation[i]`` of
    layer ``layer - 1`` and its key head ``j`` is key head ``kv_permutation[j]``, consistent with the KV groups.
    """
    model = tiny_model("llama")
    previous, current = model.model.layers[layer - 1], model.model.layers[layer]
    head_dim = previous.self_attn.head_dim
    with torch.no_grad():
        previous.self_attn.o_proj.weight.zero_()
        previous.mlp.down_proj.weight.zero_()
        current.input_layernorm.weight.copy_(previous.input_layernorm.weight)
        q_rows = torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in permutation])
        k_rows = torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in kv_permutation])
        current.self_attn.q_proj.weight.copy_(previous.self_attn.q_proj.weight[q_rows])
        current.self_attn.k_proj.weight.copy_(previous.self_attn.k_proj.weight[k_rows])
    return model


def test_calibration_recovers_an_exact_head_permutation():
    # 4 query heads in 2 KV groups ({0, 1} -> kv 0, {2, 3} -> kv 1): head i of layer 2 is head perm[i] of layer 1.
    permutation, kv_permutation = [3, 2, 0, 1], [1, 0]
    model = permuted_layer_model(2, permutation, kv_permutation)
    peft_model = get_peft_model(model, LiSAConfig(share_layers=[2], rank=4, align_hidden=0))
    report = calibrate(peft_model, WordTokenizer(), texts(), **FAST)
    (row,) = report.layers
    assert row.layer == 2 and row.source == 1
    assert row.kl_before > 0.05  # identity P: the heads do not match
    assert row.kl_after_p < 1e-3 and row.kl_after < 1e-3
    permute = peft_model.base_model.model.model.layers[2].self_attn.lisa_substitute["default"].align.permute
    assert torch.allclose(permute.detach(), permutation_matrix(permutation), atol=0.05)


def test_kl_never_rises_and_adapter_stays_trainable():
    model = tiny_model("llama")
    peft_model = get_peft_model(model, LiSAConfig(share_layers=[2, 3, 4], rank=4, align_hidden=8))
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    flags = {n: p.requires_grad for n, p in peft_model.named_parameters()}
    report = calibrate(peft_model, WordTokenizer(), texts(), **FAST)
    assert isinstance(report, CalibrationReport)
    assert [row.layer for row in report.layers] == [2, 3, 4]
    for row in report.layers:
        assert row.kl_after_p <= row.kl_before + 1e-6
        assert row.kl_after <= row.kl_after_p + 1e-6
    assert report.mean_kl_after < 0.8 * report.mean_kl_before
    after = dict(peft_model.named_parameters())
    assert {n: p.requires_grad for n, p in after.items()} == flags
    changed = {n for n, p in after.items() if not torch.equal(p.detach(), before[n])}
    assert changed and all("lisa_substitute" in n for n in changed)  # the base model is untouched
    assert any("q_lowrank" in n for n in changed) and any("align.up" in n for n in changed)
    # Trainable afterwards: a backward pass reaches the adapter.
    ids = torch.randint(3, VOCAB, (2, 16))
    peft_model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for n, p in peft_model.named_parameters() if p.requires_grad)
    assert "| layer |" in report.to_markdown() and report.to_dict()["layers"][0]["layer"] == 2


def test_only_hidden_states_are_stored():
    model = tiny_model("llama")
    peft_model = get_peft_model(model, LiSAConfig(share_layers=[2, 3], rank=4, align_hidden=0))
    report = calibrate(peft_model, WordTokenizer(), texts(), **{**FAST, "adam_steps": 0, "lbfgs_steps": 0})
    # Wrapped layers 1, 2, 3: one num_sequences x seq_len x hidden float32 tensor each, nothing T x T.
    assert report.stored_bytes == 3 * 4 * 32 * model.config.hidden_size * 4
    assert all(row.kl_after == row.kl_before for row in report.layers)


def test_calibration_on_a_4bit_base(tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_model(intermediate_size=128).save_pretrained(tmp_path / "tiny")  # whole 64-blocks for the CPU kernel
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny", quantization_config=quantization)
    assert type(model.model.layers[2].self_attn.q_proj).__name__ == "Linear4bit"
    peft_model = get_peft_model(model, LiSAConfig(share_layers=[2, 3], rank=4, align_hidden=0))
    report = calibrate(peft_model, WordTokenizer(), texts(), **FAST)
    assert {p.dtype for n, p in peft_model.named_parameters() if "lisa_" in n} == {torch.float32}
    assert all(row.kl_after <= row.kl_before + 1e-6 for row in report.layers)
    assert report.mean_kl_after < report.mean_kl_before


def test_token_blocks_calibrate_as_the_texts_they_come_from():
    """A num_blocks x block_len tensor of token ids is used as is: the same fit as the texts that give those blocks."""
    ids = [int(word[1:]) for text in texts() for word in (text + " w1").split()][: 4 * 32]
    fitted = []
    for source in (" ".join(f"w{i}" for i in ids), torch.tensor(ids).view(4, 32)):
        torch.manual_seed(0)
        peft_model = get_peft_model(tiny_model("llama"), LiSAConfig(share_layers=[2], rank=4, align_hidden=0))
        report = calibrate(peft_model, WordTokenizer(), [source] if isinstance(source, str) else source, **FAST)
        assert report.num_sequences == 4 and report.seq_len == 32
        fitted.append({n: p.detach().clone() for n, p in peft_model.named_parameters() if "lisa_" in n})
    assert fitted[0].keys() == fitted[1].keys()
    assert all(torch.equal(fitted[0][n], fitted[1][n]) for n in fitted[0])
    peft_model = get_peft_model(tiny_model("llama"), LiSAConfig(share_layers=[2], rank=4, align_hidden=0))
    for bad in (torch.tensor(ids), torch.rand(4, 32), torch.zeros(4, 1, dtype=torch.long)):
        with pytest.raises(ValueError, match="num_blocks x block_len"):
            calibrate(peft_model, WordTokenizer(), bad, **FAST)


def test_mixed_token_blocks_take_equal_shares_of_each_source_interleaved_and_read_lazily():
    """Blocks of several sources: the first blocks of each, source by source, the first sources taking the remainder;
    a source is read only as far as its share needs."""
    read = []

    def source(first_word: int, documents: int = 1000):
        for index in range(documents):  # each document: 10 tokens of this source's own words
            read.append((first_word, index))
            yield " ".join(f"w{first_word + (index + i) % 10}" for i in range(10))

    blocks = mixed_token_blocks(WordTokenizer(), [source(10), source(30), source(50)], num_sequences=8, seq_len=16)
    assert blocks.shape == (8, 16) and blocks.dtype == torch.long
    # shares 3, 3, 2, interleaved: sources 1 2 3 1 2 3 1 2
    owners = [
        sorted({token // 10 * 10 for token in row if token != WordTokenizer.eos_token_id}) for row in blocks.tolist()
    ]
    assert owners == [[10], [30], [50], [10], [30], [50], [10], [30]]
    # the first blocks of each source, in order: its stream joined by EOS
    first = list(source(10, 5))
    stream = [int(w[1:]) for w in first[0].split()] + [1] + [int(w[1:]) for w in first[1].split()]
    assert blocks[0].tolist() == stream[:16]
    # 3 blocks x 16 tokens need 5 documents of 10 tokens (+ EOS) from the first source, not 1000
    assert max(index for owner, index in read if owner == 10) < 6
    with pytest.raises(ValueError, match="2 calibration sources need at least as many sequences, got 1"):
        mixed_token_blocks(WordTokenizer(), [source(10), source(30)], num_sequences=1, seq_len=16)
    # a source too short for its share is refused, naming it: none of it (1 document < 1 block) or part of it
    for documents, blocks in ((1, 0), (2, 1)):
        with pytest.raises(ValueError, match=f"calibration b.txt gives {blocks} of the 2 blocks of 16 tokens"):
            mixed_token_blocks(WordTokenizer(), [source(10), source(30, documents)], 4, 16, names=["a.txt", "b.txt"])
    with pytest.raises(TypeError, match="source 2 of 2 is one string"):
        mixed_token_blocks(WordTokenizer(), [list(source(10, 20)), "w30 w31 w32"], 4, 16)


def test_calibration_sequence_length_before_training():
    """The trainer's rule, stated once: the budget's seq_len, else the training's max_length capped at 256."""
    assert calibration_seq_len(LiSACalibrationConfig(), 1024) == 256
    assert calibration_seq_len(LiSACalibrationConfig(), None) == 256
    assert calibration_seq_len(LiSACalibrationConfig(), 64) == 64
    assert calibration_seq_len(LiSACalibrationConfig(seq_len=512), 64) == 512


def test_copy_run_blocks_are_runs_each_followed_by_its_repeat():
    blocks = copy_run_blocks(3, 200, 5000, torch.Generator().manual_seed(0), run_lengths=(16, 40))
    assert blocks.shape == (3, 200) and blocks.min() >= 100 and blocks.max() < 5000
    for block in blocks.tolist():
        start, lengths = 0, []
        while start < len(block):
            # the shortest run length whose run repeats right after it (the last pair may be cut)
            length = next(
                n
                for n in range(16, 41)
                if block[start : start + n][: len(block) - start - n] == block[start + n : start + 2 * n]
            )
            lengths.append(length)
            start += 2 * length
        assert len(set(lengths)) > 1  # lengths vary
    again = copy_run_blocks(3, 200, 5000, torch.Generator().manual_seed(0), run_lengths=(16, 40))
    assert torch.equal(blocks, again)


def test_calibrate_with_copy_blocks_adds_them_to_the_text_blocks():
    fitted, reports = [], []
    for copies in (0, 3):
        torch.manual_seed(0)
        peft_model = get_peft_model(tiny_model("llama"), LiSAConfig(share_layers=[2], rank=4, align_hidden=0))
        reports.append(calibrate(peft_model, WordTokenizer(), texts(), copy_blocks=copies, **FAST))
        fitted.append({n: p.detach().clone() for n, p in peft_model.named_parameters() if "lisa_" in n})
    assert (reports[0].num_sequences, reports[1].num_sequences) == (4, 7)
    assert (reports[0].copy_blocks, reports[1].copy_blocks) == (0, 3) and reports[1].seq_len == 32
    assert any(not torch.equal(fitted[0][n], fitted[1][n]) for n in fitted[0])  # fitted on other data
    with pytest.raises(ValueError, match="copy_blocks >= 0"):
        calibrate(peft_model, WordTokenizer(), texts(), copy_blocks=-1, **FAST)


def test_calibrate_rejects_a_model_without_a_lisa_adapter():
    with pytest.raises(ValueError, match="active LiSA adapter"):
        calibrate(tiny_model("llama"), WordTokenizer(), texts(), **FAST)


def test_adapter_and_merged_model_saved_with_first_frequencies_load_as_first(tmp_path):
    # The default rotary_frequencies may change; what was saved explicitly must load unchanged.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from peft_lisa.tuner.functional import lowrank_frequency_index

    from .conftest import random_ids, randomize_adapter

    first = lowrank_frequency_index(16, 4, "first")
    assert first != lowrank_frequency_index(16, 4, "strided")  # head size 16, rank 4: the choice matters
    peft_model = get_peft_model(
        tiny_model("llama"), LiSAConfig(share_layers=[2, 3], rank=4, rotary_frequencies="first")
    )
    randomize_adapter(peft_model)
    ids = random_ids()
    expected = peft_model(input_ids=ids).logits
    peft_model.save_pretrained(tmp_path / "adapter")
    assert LiSAConfig.from_pretrained(tmp_path / "adapter").rotary_frequencies == "first"
    loaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "adapter").eval()
    substitute = loaded.base_model.model.model.layers[2].self_attn.lisa_substitute["default"]
    assert substitute.frequency_index == first
    torch.testing.assert_close(loaded(input_ids=ids).logits, expected)
    loaded.merge_and_unload().save_pretrained(tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert merged.config.lisa["rotary_frequencies"] == "first"
    torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text", "phi3"])
def test_calibration_runs_on_other_families(family):
    """Softcapped logits (Gemma 2), per-layer-type rotary and masks (Gemma 3), a fused qkv projection (Phi-3)."""
    from .test_families import family_model, lisa_config

    peft_model = get_peft_model(family_model(family), lisa_config(family))
    report = calibrate(peft_model, WordTokenizer(), texts(), **FAST)
    for row in report.layers:
        assert row.kl_after <= row.kl_before + 1e-6
    assert report.mean_kl_after < report.mean_kl_before


def test_teacher_rows_kl_equals_the_dense_kl_and_its_gradient():
    """The prepared teacher (probabilities and entropy computed once) gives the KL of the two masked softmaxes, with
    the same gradient; rows without an allowed key (left padding) count for nothing."""
    from peft_lisa.calibration import TeacherRows
    from peft_lisa.tuner.functional import additive_mask

    torch.manual_seed(0)
    batch, heads, length = 2, 3, 6
    allowed = torch.ones(length, length).tril().bool().expand(batch, 1, length, length).clone()
    allowed[1, :, :, :2] = False  # sequence 1 is left-padded by two tokens
    allowed[1, :, :2, :] = False  # ... and its padding rows see nothing
    mask = additive_mask(allowed, length, length, torch.device("cpu"))
    teacher = torch.randn(batch, heads, length, length)
    student = torch.randn(batch, heads, length, length, requires_grad=True)

    rows = allowed.any(-1).expand(batch, heads, length)  # B x H x T_q
    p = torch.softmax(teacher.masked_fill(~allowed, float("-inf")), -1)[rows]  # N x T_k
    log_q = torch.log_softmax(student.masked_fill(~allowed, float("-inf")), -1)[rows]
    dense = (p * (p.clamp(min=1e-30).log() - log_q)).masked_fill(p == 0, 0.0).sum(-1).mean()
    (dense_grad,) = torch.autograd.grad(dense, student)

    prepared = TeacherRows.of(teacher, mask)
    kl = prepared.kl(student)
    (grad,) = torch.autograd.grad(kl, student)
    assert kl.item() == pytest.approx(dense.item(), rel=1e-5)
    torch.testing.assert_close(grad, dense_grad, rtol=1e-4, atol=1e-7)
    assert prepared.kl(teacher).item() == pytest.approx(0.0, abs=1e-6)
