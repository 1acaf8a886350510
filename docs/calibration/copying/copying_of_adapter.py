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


def main() -> None:
    model, _ = load_model_and_tokenizer()
    peft_model = PeftModel.from_pretrained(model, sys.argv[1]).eval()
    result = {}
    for length in (32, 64, 128):
        with peft_model.disable_adapter():
            base = copying_nll(peft_model, length=length)
        lisa = copying_nll(peft_model, length=length)
        result[length] = {"base": base, "lisa": lisa}
        print(f"runs of {length} random tokens, second occurrence: base {base:.2f} nats, LiSA {lisa:.2f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
