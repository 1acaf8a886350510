"""The explicit blocks' buffers and block size, measured in one process (``docs/benchmark/README.md``; issue 10).

A prefill of ``--batch`` x ``--tokens`` random ids (one forward, the cache built, the last token's logits, as the
benchmark times it). Subjects, alternating, ``--repeats`` rounds after a warm-up each:

* ``base``: SmolLM2-135M-Instruct;
* ``merged``: an untrained LiSA adapter merged (50% shared, layers from ``docs/analysis``, ``head_mixing="full"``),
  as the library runs it: every block's logits in the same buffers (``BlockBuffers``), blocks of at least
  ``EXPLICIT_MIN_BLOCK_ROWS`` (sequence, query) rows;
* ``merged, fresh tensors per block``: the same model with a new tensor for each block's logits, as before the
  buffers;
* ``merged, 64 queries per block``: the same model with ``EXPLICIT_MIN_BLOCK_ROWS = 0`` (a block of one sequence
  takes ``EXPLICIT_QUERY_BLOCK`` = 64 queries, as before);
* with ``--kv-group``, ``merged, kv_group``: a second merged model with ``head_mixing="kv_group"`` (fused calls of
  head size ``d_h + r``).

Prints the times and the ratio base / subject (median of the per-round ratios; timing and table shared with
``chunked_prefill.py``). Run from the repository root::

    python docs/benchmark/prefill_variants/explicit_blocks.py --threads 2 --tokens 2048 --kv-group
"""

from __future__ import annotations

import argparse

import torch
from chunked_prefill import (  # this folder's (run as a script)
    compare_prefills,
    prefill_call,
    prefill_header,
    smollm2_models,
    with_setting,
)

import peft_lisa.tuner.carrier as lisa_carrier
from peft_lisa.analysis import AttentionAnalysis
from peft_lisa.benchmark import untrained_merged


class FreshBuffers(lisa_carrier.BlockBuffers):
    """A new tensor for every block's logits: what the explicit blocks allocated before ``BlockBuffers``."""

    def take(self, role: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device=self.device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--kv-group", action="store_true", help="add a merged model with head_mixing='kv_group'")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base, merged, ids = smollm2_models(getattr(torch, args.dtype), args.batch, args.tokens)

    subjects = {
        "base": prefill_call(base, ids),
        "merged": prefill_call(merged, ids),
        "merged, fresh tensors per block": with_setting(
            prefill_call(merged, ids), lisa_carrier, "BlockBuffers", FreshBuffers
        ),
        "merged, 64 queries per block": with_setting(
            prefill_call(merged, ids), lisa_carrier, "EXPLICIT_MIN_BLOCK_ROWS", 0
        ),
    }
    if args.kv_group:
        analysis = AttentionAnalysis.from_json("docs/analysis/smollm2_135m_analysis.json")
        kv_group = untrained_merged(base, None, 0.5, analysis, 8, 0, "kv_group").eval()
        subjects["merged, kv_group"] = prefill_call(kv_group, ids)
    compare_prefills(subjects, args.repeats, prefill_header(args.batch, args.tokens, args.dtype, args.repeats))


if __name__ == "__main__":
    main()
