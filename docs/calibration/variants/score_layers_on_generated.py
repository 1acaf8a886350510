"""Layer choice scored on the base model's own answers, or on those mixed with pydoc, instead of pydoc alone
(docs/calibration/variants.md). Measured once and not adopted.

Samples at least 4,096 tokens of the base model's answers to the first 16 generic prompts (temperature 1, as the main
job's training mix does), then runs the default calibrated layer score (``analyze(..., max_batches=2,
calibrated_sensitivity=True)``) on ``gen`` (the answers alone) or ``mix`` (pydoc train documents and answers,
alternating), and writes the layers it chooses at 50% and 70% shared with the CPU-minutes, to ``OUT``. The chosen
layers are then calibrated and measured with ``examples/calibration_curves.py --share-layers ...``.

    taskset -c 0 python docs/calibration/variants/score_layers_on_generated.py mix \
        docs/calibration/variants/score_mix.json
"""

from __future__ import annotations

import json
import sys
import time

import torch

from peft_lisa.analysis import analyze, choose_share_layers
from peft_lisa.data import load_texts
from peft_lisa.generated_text import GENERIC_PROMPTS, sample_answers
from peft_lisa.resources import load_model_and_tokenizer


def main() -> None:
    if len(sys.argv) != 3 or sys.argv[1] not in ("gen", "mix"):
        raise SystemExit("usage: score_layers_on_generated.py {gen,mix} OUT.json")
    variant, out = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    model, tokenizer = load_model_and_tokenizer(None)
    model.eval()
    started = time.process_time()
    answers = [answer for _, answer in sample_answers(model, tokenizer, 4096, GENERIC_PROMPTS[:16])]
    sampling = time.process_time() - started
    if variant == "gen":
        texts = answers
    else:
        texts = [text for pair in zip(load_texts("pydoc", split="train"), answers, strict=False) for text in pair]
    started = time.process_time()
    analysis = analyze(model, tokenizer, texts, max_batches=2, calibrated_sensitivity=True, sensitivity=False)
    result = {
        "variant": variant,
        "sampling_cpu_min": round(sampling / 60, 2),
        "scoring_cpu_min": round((time.process_time() - started) / 60, 2),
        **{
            str(fraction): choose_share_layers(analysis, fraction=fraction, score="sensitivity_calibrated")
            for fraction in (0.5, 0.7)
        },
    }
    print(json.dumps(result))
    with open(out, "w") as handle:
        json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
