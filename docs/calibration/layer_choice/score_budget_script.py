"""Does a cheaper calibrated-sensitivity score choose the same layers as the default (4 x 25 fit, 4 scoring sequences)?

    taskset -c 1 python docs/calibration/layer_choice/score_budget_script.py

Compares with ``an_kl4x25.json`` (the default's analysis) and writes ``score_budget.json`` beside this file. The
CPU times include the untrained sensitivity, which these analyses also measure.
"""

import json
import time
from pathlib import Path

import torch

from peft_lisa.analysis import analyze
from peft_lisa.data import load_texts
from peft_lisa.resources import load_model_and_tokenizer
from peft_lisa.tuner.layer_choice import choose_layers

HERE = Path(__file__).parent
VARIANTS = [(4, 10, 4), (2, 25, 4), (4, 25, 2), (2, 10, 2)]  # fit sequences, Adam steps, scoring sequences


def pick(scores: list, fraction: float) -> list[int]:
    return sorted(choose_layers(scores, 30, fraction=fraction, keep_first=2))


def main() -> None:
    torch.set_num_threads(1)
    model, tokenizer = load_model_and_tokenizer()
    texts = load_texts("pydoc", split="train")
    reference = json.loads((HERE / "an_kl4x25.json").read_text())["sensitivity_calibrated"]
    out = {}
    for fit_sequences, steps, scoring_sequences in VARIANTS:
        start = time.process_time()
        analysis = analyze(
            model,
            tokenizer,
            texts,
            max_batches=2,
            sensitivity_sequences=scoring_sequences,
            calibration_sequences=fit_sequences,
            calibration_steps=steps,
            calibrated_sensitivity=True,
            progress=False,
        )
        scores = analysis.sensitivity_calibrated
        row = {"cpu_min": (time.process_time() - start) / 60, "scores": scores}
        for fraction, name in ((0.5, "50"), (0.7, "70")):
            row[f"p{name}"] = pick(scores, fraction)
            row[f"same{name}"] = len(set(row[f"p{name}"]) & set(pick(reference, fraction)))
        key = f"cal{fit_sequences}x{steps}_score{scoring_sequences}"
        out[key] = row
        print(key, f"{row['cpu_min']:.2f} CPU-min", row["p50"], row["same50"], row["p70"], row["same70"], flush=True)
        (HERE / "score_budget.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
