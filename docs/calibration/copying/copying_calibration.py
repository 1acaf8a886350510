"""In-context copying after calibration, with and without repeated random-token runs in the calibration data.

The base model copies a run of random tokens it has seen earlier in its context (induction heads); this measures how
much of that a calibrated LiSA adapter keeps, and whether calibrating also on runs that repeat restores it. For each
setting: the default layers for 50% shared on SmolLM2-135M-Instruct, rank 8, ``calibrate()`` on ``--pydoc`` blocks of
256 pydoc train tokens plus ``--copies`` blocks of 128 random tokens repeated once (shuffled in; with
``--mixed-lengths`` the library's copy blocks, ``calibrate(copy_blocks=N)``: runs of 16-96 tokens), then

* perplexity on held-out pydoc and on the license text (window 256, stride 128, first 4,096 tokens), and the
  per-token gap split into copyable tokens (whose bigram occurred earlier in the window) and the rest;
* copying: the mean NLL of the second occurrence of 8 runs of random tokens (32, 64 and 128 long), base and LiSA.

    taskset -c 0 python docs/calibration/copying/copying_calibration.py --copies 8 --out copies8.json
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
from copying_of_adapter import copying_against_base  # this folder's script (its own directory is on sys.path)
from peft import get_peft_model

from peft_lisa import LiSAConfig, calibrate
from peft_lisa.calibration_blocks import copy_run_blocks, token_blocks
from peft_lisa.data import license_text, pydoc_texts, split_texts
from peft_lisa.resources import load_model_and_tokenizer

LAYERS = [5, 6, 7, 9, 13, 15, 16, 18, 21, 22, 25, 26, 27, 28, 29]  # the main job's choice at 50%


def stream(tokenizer, texts, count: int = 4096) -> torch.Tensor:
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
        if len(ids) >= count:
            break
    return torch.tensor(ids[:count])


def token_nll(model, ids: torch.Tensor, window: int = 256, stride: int = 128) -> list[tuple[float, bool]]:
    """(NLL, copyable) of every scored token of sliding windows, as the library's perplexity scores them."""
    scored = []
    with torch.no_grad():
        for start in range(0, len(ids) - 1, stride):
            end = min(start + window, len(ids))
            x = ids[start:end]
            logp = torch.log_softmax(model(x[None]).logits[0, :-1].float(), -1)
            nll = -logp.gather(-1, x[1:, None])[:, 0]
            seq = x.tolist()
            first = 0 if start == 0 else window - stride - 1
            for p in range(first, len(seq) - 1):
                t = p + 1
                seen = {(seq[j - 1], seq[j]) for j in range(1, t)}
                scored.append((nll[p].item(), (seq[t - 1], seq[t]) in seen))
            if end == len(ids):
                break
    return scored


def gaps(base, lisa) -> dict:
    rows = {}
    for label, keep in (("all", lambda c: True), ("copyable", bool), ("not_copyable", lambda c: not c)):
        b = [n for n, c in base if keep(c)]
        o = [n for n, c in lisa if keep(c)]
        rows[label] = {"tokens": len(b), "base_nll": sum(b) / len(b), "lisa_nll": sum(o) / len(o)}
        rows[label]["gap"] = rows[label]["lisa_nll"] - rows[label]["base_nll"]
    rows["ppl_base"], rows["ppl_lisa"] = math.exp(rows["all"]["base_nll"]), math.exp(rows["all"]["lisa_nll"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pydoc", type=int, default=32, help="pydoc calibration blocks of 256 tokens")
    parser.add_argument("--copies", type=int, default=0, help="blocks of a 128-token random run repeated once")
    parser.add_argument(
        "--mixed-lengths",
        action="store_true",
        help="the library's copy blocks (calibrate(copy_blocks=N)): runs of 16-96 tokens, each repeated",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model_and_tokenizer()
    model.eval()
    train, test = split_texts(pydoc_texts())
    blocks = token_blocks(tokenizer, train, 256, args.pydoc)
    copy_blocks = args.copies if args.mixed_lengths else 0  # calibrate(copy_blocks=...): runs of 16-96 tokens
    if args.copies and not args.mixed_lengths:  # one 128-token run and its repeat per block, shuffled in
        generator = torch.Generator().manual_seed(0)
        fixed = copy_run_blocks(args.copies, 256, len(tokenizer), generator, run_lengths=(128, 128))
        blocks = torch.cat([blocks, fixed])
        blocks = blocks[torch.randperm(len(blocks), generator=generator)]
    peft_model = get_peft_model(model, LiSAConfig(share_layers=LAYERS, rank=8))
    started = time.process_time()
    report = calibrate(peft_model, tokenizer, blocks, copy_blocks=copy_blocks, progress=False, log=False)
    cpu_minutes = (time.process_time() - started) / 60
    result = {
        "pydoc_blocks": args.pydoc,
        "copy_blocks": args.copies,
        "calibration_cpu_minutes": cpu_minutes,
        "mean_kl_after": report.mean_kl_after,
        "texts": {},
    }
    texts = {"pydoc": stream(tokenizer, test), "license": stream(tokenizer, [license_text()[1]])}
    for name, ids in texts.items():
        with peft_model.disable_adapter():
            base = token_nll(peft_model, ids)
        result["texts"][name] = gaps(base, token_nll(peft_model, ids))
    result["copying"] = copying_against_base(peft_model)
    print(json.dumps(result, indent=1))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
