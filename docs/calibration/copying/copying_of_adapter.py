"""In-context copying of a saved LiSA adapter against its base (``peft_lisa.evaluation.copying_nll``).

python docs/calibration/copying/copying_of_adapter.py runs/train_lisa/adapter
"""

from __future__ import annotations

import json
import sys

from peft import PeftModel

import peft_lisa  # noqa: F401  (registers the LiSA tuner with peft)
from peft_lisa.evaluation import copying_nll
from peft_lisa.resources import load_model_and_tokenizer


def copying_against_base(peft_model, lengths: tuple[int, ...] = (32, 64, 128)) -> dict[int, dict[str, float]]:
    """``{L: {"base": nats, "lisa": nats}}``: :func:`copying_nll` with the adapter disabled and active, per length."""
    result = {}
    for length in lengths:
        with peft_model.disable_adapter():
            base = copying_nll(peft_model, length=length)
        result[length] = {"base": base, "lisa": copying_nll(peft_model, length=length)}
    return result


def main() -> None:
    model, _ = load_model_and_tokenizer()
    peft_model = PeftModel.from_pretrained(model, sys.argv[1]).eval()
    result = copying_against_base(peft_model)
    for length, nats in result.items():
        print(
            f"runs of {length} random tokens, second occurrence: base {nats['base']:.2f} nats, LiSA {nats['lisa']:.2f}"
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
