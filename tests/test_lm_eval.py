"""lm-evaluation-harness through ``peft_lisa.lm_eval_harness.evaluate_tasks`` and ``peft-lisa eval --tasks``, on a
tiny local multiple-choice task (tests/data/lm_eval: task YAML + JSONL, no hub) and tiny models: the base model, a
LiSA adapter and the merged model. The loglikelihoods lm-eval reports are checked against a forward pass by hand."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel, get_peft_model

from peft_lisa import LiSAConfig
from peft_lisa.cli import main

from .conftest import REPO_ROOT, randomize_adapter, tiny_model
from .test_training import tiny_tokenizer

pytest.importorskip("lm_eval")

from peft_lisa.lm_eval_harness import evaluate_tasks, task_metrics, task_table  # noqa: E402

TASK_DIR = REPO_ROOT / "tests" / "data" / "lm_eval"
TASK = "lisa_tiny_mc"
ATOL = 1e-4  # float32 loglikelihoods of one model computed in two batchings / paths


def setup_module():
    global THREADS
    THREADS = torch.get_num_threads()
    torch.set_num_threads(1)


def teardown_module():
    torch.set_num_threads(THREADS)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """``tiny/`` (base + tokenizer), ``adapter/`` (a random LiSA adapter on it) and ``merged/`` (peft-lisa merge)."""
    root = tmp_path_factory.mktemp("lm_eval")
    tiny_model().save_pretrained(root / "tiny")
    tiny_tokenizer().save_pretrained(root / "tiny")
    peft_model = get_peft_model(tiny_model(), LiSAConfig(share_layers=[2, 3], rank=4, task_type="CAUSAL_LM"))
    randomize_adapter(peft_model, scale=1.0)
    peft_model.peft_config["default"].base_model_name_or_path = str(root / "tiny")
    peft_model.save_pretrained(root / "adapter")
    merge = ["merge", "--adapter", root / "adapter", "--output", root / "merged", "--model", root / "tiny"]
    assert main([str(item) for item in merge]) == 0
    return root


def loglikelihoods_by_hand(model, tokenizer, docs) -> list[list[float]]:
    """log p(" " + choice | context) for every choice of every document: one forward pass per choice."""
    scores = []
    for doc in docs:
        context = tokenizer(doc["context"], add_special_tokens=False)["input_ids"]
        row = []
        for choice in doc["choices"]:
            whole = tokenizer(doc["context"] + " " + choice, add_special_tokens=False)["input_ids"]
            assert whole[: len(context)] == context
            with torch.no_grad():
                logits = model(torch.tensor([whole])).logits[0].float()
            log_probs = torch.log_softmax(logits[:-1], dim=-1)
            targets = torch.tensor(whole[len(context) :])
            row.append(log_probs[len(context) - 1 :].gather(1, targets[:, None]).sum().item())
        scores.append(row)
    return scores


def reported_loglikelihoods(results) -> list[list[float]]:
    samples = sorted(results["samples"][TASK], key=lambda sample: sample["doc_id"])
    return [[response[0] for response in sample["filtered_resps"]] for sample in samples]


def docs() -> list[dict]:
    return [json.loads(line) for line in (TASK_DIR / "tiny_mc.jsonl").read_text().splitlines()]


def test_lm_eval_loglikelihoods_and_accuracy_match_a_forward_pass_by_hand(work):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(work / "tiny").eval()
    tokenizer = tiny_tokenizer()
    results = evaluate_tasks(model, tokenizer, [TASK], task_dir=TASK_DIR, batch_size=8, log_samples=True)
    by_hand = loglikelihoods_by_hand(model, tokenizer, docs())
    reported = reported_loglikelihoods(results)
    assert len(reported) == len(by_hand) == 12
    assert torch.allclose(torch.tensor(reported), torch.tensor(by_hand), atol=ATOL)
    # acc: the argmax choice is the label; acc_norm: the same with loglikelihood / characters of the choice.
    acc = [max(range(4), key=lambda i: row[i]) == doc["label"] for row, doc in zip(by_hand, docs(), strict=True)]
    acc_norm = [
        max(range(4), key=lambda i: row[i] / len(doc["choices"][i])) == doc["label"]
        for row, doc in zip(by_hand, docs(), strict=True)
    ]
    metrics = task_metrics(results)[TASK]
    assert metrics["acc"] == pytest.approx(sum(acc) / len(acc))
    assert metrics["acc_norm"] == pytest.approx(sum(acc_norm) / len(acc_norm))


def test_adapter_and_merged_model_give_the_same_loglikelihoods(work):
    from transformers import AutoModelForCausalLM

    tokenizer = tiny_tokenizer()
    base = AutoModelForCausalLM.from_pretrained(work / "tiny").eval()
    adapter = PeftModel.from_pretrained(base, str(work / "adapter")).eval()
    with_adapter = evaluate_tasks(adapter, tokenizer, [TASK], task_dir=TASK_DIR, batch_size=8, log_samples=True)
    merged_model = AutoModelForCausalLM.from_pretrained(work / "merged").eval()
    merged = evaluate_tasks(merged_model, tokenizer, [TASK], task_dir=TASK_DIR, batch_size=8, log_samples=True)
    assert type(merged_model).__name__.startswith("LiSA")  # the compact merged class, not the base class
    a, m = torch.tensor(reported_loglikelihoods(with_adapter)), torch.tensor(reported_loglikelihoods(merged))
    assert torch.allclose(a, m, atol=ATOL)
    by_hand = torch.tensor(loglikelihoods_by_hand(merged_model, tokenizer, docs()))
    assert torch.allclose(m, by_hand, atol=ATOL)
    with adapter.disable_adapter():
        base_scores = torch.tensor(loglikelihoods_by_hand(adapter, tokenizer, docs()))
    assert (base_scores - m).abs().max() > 1e-2  # the adapter changes the model: the test can tell them apart


def test_peft_lisa_eval_tasks_base_vs_merged_table(work, capsys):
    common = ["--no-perplexity", "--max-new-tokens", "0", "--tasks", TASK, "--task-dir", TASK_DIR]
    common += ["--task-batch-size", "8"]
    runs = {"base model": ["--model", work / "tiny"], "merged LiSA model": ["--merged", work / "merged"]}
    results = {}
    for label, which in runs.items():
        out = work / f"{label.replace(' ', '_')}.json"
        assert main([str(item) for item in ["eval", *which, *common, "--json", out]]) == 0
        printed = capsys.readouterr().out
        assert "lm-evaluation-harness:" in printed and TASK in printed
        results[label] = {"results": json.loads(out.read_text())["lm_eval"]}
    table = task_table(results)
    print("\n" + table)
    for label, values in results.items():
        assert any(line.startswith(label) and TASK in line for line in table.splitlines())
        metrics = task_metrics(values)[TASK]
        assert 0.0 <= metrics["acc"] <= 1.0 and "acc_norm" in metrics


def test_unknown_task_and_missing_task_dir_are_clear_errors(work, capsys):
    model = tiny_model()
    with pytest.raises(ValueError, match="unknown lm-eval task"):
        evaluate_tasks(model, tiny_tokenizer(), ["no_such_task_xyz"], task_dir=TASK_DIR)
    code = main(["eval", "--model", str(work / "tiny"), "--no-perplexity", "--task-dir", str(work / "nope")])
    assert code == 2 and "--task-dir" in capsys.readouterr().err
