"""The LM head of an unmerged LiSA adapter model, with and without its input hook, measured in one process
(``docs/benchmark/README.md``; ``docs/method.md``, "Decoding").

peft freezes the base of an adapter model, LM head included. A prefill that keeps only the last token's logits
hands the LM head a slice of the hidden states, and with a frozen weight torch's ``matmul`` multiplies that slice by
the weight expanded over the batch, which on CPU in bf16 copies the weight once per sequence. While LiSA is injected
a forward pre-hook (``foldable_lm_head_input``) hands the LM head a contiguous input instead.

A prefill of ``--batch`` x ``--tokens`` random ids (one forward, the cache built, the last token's logits, as the
benchmark times it). Subjects, alternating, ``--repeats`` rounds after a warm-up each:

* ``base``: SmolLM2-135M-Instruct as loaded (its parameters require grad);
* ``adapter``: an untrained LiSA adapter on a copy of it (50% shared, layers from ``docs/analysis``,
  ``head_mixing="full"``), not merged, as the library runs it;
* ``adapter, no LM-head hook``: the same model with the hook removed for the call.

Prints the times and the ratio base / subject (median of the per-round ratios; timing and table shared with
``chunked_prefill.py``). Run from the repository root::

    python docs/benchmark/prefill_variants/adapter_lm_head.py --threads 2 --batch 8 --tokens 128
"""

from __future__ import annotations

import argparse
import copy

import torch
from chunked_prefill import compare_prefills, prefill_call, prefill_header  # this folder's (run as a script)
from peft import get_peft_model

from peft_lisa import LiSAConfig
from peft_lisa.analysis import AttentionAnalysis, choose_share_layers
from peft_lisa.benchmark.measure import random_ids
from peft_lisa.resources import load_model_and_tokenizer
from peft_lisa.tuner.merged import foldable_lm_head_input


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base, _ = load_model_and_tokenizer(None)
    base = base.to(getattr(torch, args.dtype)).eval()
    analysis = AttentionAnalysis.from_json("docs/analysis/smollm2_135m_analysis.json")
    config = LiSAConfig(share_layers=choose_share_layers(analysis, fraction=0.5), rank=8, head_mixing="full")
    adapter = get_peft_model(copy.deepcopy(base), config).eval()
    tuner, lm_head = adapter.base_model, adapter.get_output_embeddings()
    ids = random_ids(args.batch, args.tokens, base.config.vocab_size, torch.device("cpu"), seed=0)

    def without_hook() -> object:
        tuner._lm_head_pre_hook.remove()
        try:
            return prefill_call(adapter, ids)()
        finally:
            tuner._lm_head_pre_hook = lm_head.register_forward_pre_hook(foldable_lm_head_input)

    subjects = {
        "base": prefill_call(base, ids),
        "adapter": prefill_call(adapter, ids),
        "adapter, no LM-head hook": without_hook,
    }
    compare_prefills(subjects, args.repeats, prefill_header(args.batch, args.tokens, args.dtype, args.repeats))


if __name__ == "__main__":
    main()
