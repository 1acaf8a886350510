"""Does a calibrated LiSA adapter carry over to text of another domain? Calibrate on one domain, measure on four.

A diagnostic for issue 12's open gap (the license text stays far above the base after calibration and training),
not a library feature: docs/calibration/domain.md. SmolLM2-135M-Instruct (built in), the main job's layers for 50%
shared (5-7, 9, 13, 15, 16, 18, 21, 22, 25-29), rank 8, linear alignment, the library's defaults otherwise;
``calibrate()`` with its default budget (L-BFGS 10 + Adam 100 steps per layer) on 32 blocks of 256 tokens of
``--data``, no training. Four real texts, each split into a part calibration may read and a held-out part that is
measured (first 4,096 tokens, window 256, stride 128):

* ``pydoc``: Python's own documentation (the library's train / test split);
* ``license``: the license file an installed package ships (``peft_lisa.data.license_text``, legal English). Its
  first 4,096 tokens are measured; calibration reads 8,192 tokens from token 4,352 on (after a gap of 256), never
  the measured ones. Calibrating on it is an in-domain control, not a result for issue 12's target, whose
  out-of-domain text nothing may calibrate on;
* ``news``: the Lee corpus of 299 Australian news articles (``lee_background.cor``); calibration reads articles
  0-199, the measure articles 200 on;
* ``wiki``: 101 English Wikipedia articles (a 2016 dump excerpt, wiki markup stripped here); calibration reads
  articles 0-59, the measure articles 60 on.

The news and Wikipedia texts ship in gensim's wheel as test data (``pip install gensim``; this script only reads the
files, it does not import gensim). ``--data`` names one text or several joined by ``+`` (equal shares, blocks
interleaved); the 32 blocks of a text are spread evenly over its calibration part.

    D=docs/calibration/domain
    taskset -c 0 python $D/domain_transfer.py --data base --out $D/base.json
    taskset -c 0 python $D/domain_transfer.py --data pydoc --out $D/pydoc.json
    ...  (the list in docs/calibration/domain.md)
    python $D/domain_transfer.py --table $D/*.json

``--table`` writes ``table.md`` and ``transfer.png`` next to the first file; ``--export DIR`` writes the texts of the
main-job runs in domain.md (:func:`export`).
"""

from __future__ import annotations

import argparse
import bz2
import html
import importlib.metadata
import json
import re
import time
from pathlib import Path

import torch
from peft import get_peft_model

from peft_lisa import LiSAConfig, calibrate
from peft_lisa.data import chunk_token_ids, license_text, load_texts
from peft_lisa.evaluation import perplexity
from peft_lisa.resources import load_model_and_tokenizer

SHARE_LAYERS = [5, 6, 7, 9, 13, 15, 16, 18, 21, 22, 25, 26, 27, 28, 29]
TEXTS = ("pydoc", "license", "news", "wiki")
BLOCKS, SEQ_LEN, EVAL_TOKENS = 32, 256, 4096
LICENSE_CALIBRATION_START = EVAL_TOKENS + 256  # a gap after the measured tokens
NEWS_SPLIT, WIKI_SPLIT = 200, 60  # documents before: calibration; from here on: measured


def gensim_test_file(name: str) -> Path:
    try:
        distribution = importlib.metadata.distribution("gensim")
    except importlib.metadata.PackageNotFoundError as error:
        raise SystemExit("The news and Wikipedia texts are gensim's test data: pip install gensim") from error
    for file in distribution.files or ():
        if str(file).endswith(f"test/test_data/{name}"):
            return Path(distribution.locate_file(file))
    raise SystemExit(f"gensim {distribution.version} does not ship test_data/{name}")


def news_articles() -> list[str]:
    lines = gensim_test_file("lee_background.cor").read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip()]


def strip_wiki_markup(text: str) -> str:
    """Plain paragraphs of a wikitext article: templates, tables, references, files and markup removed, links
    replaced by their text, and only lines of running text (over 80 characters, not lists or tables) kept."""
    for _ in range(3):  # nested templates, innermost first
        text = re.sub(r"\{\{[^{}]*\}\}", "", text)
    text = re.sub(r"\{\|.*?\|\}", "", text, flags=re.S)
    text = re.sub(r"<ref[^>]*/>|<ref.*?</ref>|<!--.*?-->", "", text, flags=re.S)
    text = re.sub(r"<[^>]+>", "", text)
    text = re.sub(r"\[\[(?:File|Image|Category):[^\]]*(\[\[[^\]]*\]\][^\]]*)*\]\]", "", text)
    text = re.sub(r"\[\[(?:[^\]|]*\|)?([^\]]*)\]\]", r"\1", text)
    text = re.sub(r"\[https?://\S+ ([^\]]*)\]", r"\1", text)
    text = re.sub(r"'{2,}", "", text)
    lines = [line.strip() for line in text.split("\n")]
    return "\n".join(line for line in lines if len(line) > 80 and not line.startswith(("*", "|", "!", "{", "}", ":")))


def wiki_articles() -> list[str]:
    dump = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
    with bz2.open(gensim_test_file(dump), "rt", encoding="utf-8") as file:
        xml = file.read()
    bodies = (html.unescape(body) for body in re.findall(r"<text[^>]*>(.*?)</text>", xml, flags=re.S))
    articles = (strip_wiki_markup(body) for body in bodies if not body.startswith("#REDIRECT"))
    return [article for article in articles if article]


def spread(blocks: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` blocks evenly spread over ``blocks``."""
    if len(blocks) < count:
        raise SystemExit(f"only {len(blocks)} calibration blocks, {count} needed")
    return blocks[torch.linspace(0, len(blocks) - 1, count).round().long()]


def load_domains(tokenizer) -> tuple[dict[str, list[str]], dict[str, torch.Tensor]]:
    """The measured texts and the calibration blocks (all of a text's calibration part, in order) per domain."""
    _, license_body = license_text()
    license_ids = tokenizer(license_body, add_special_tokens=False)["input_ids"]
    news, wiki = news_articles(), wiki_articles()
    measured = {
        "pydoc": load_texts("pydoc", split="test"),
        "license": [license_body],
        "news": news[NEWS_SPLIT:],
        "wiki": wiki[WIKI_SPLIT:],
    }
    license_part = license_ids[LICENSE_CALIBRATION_START:]
    usable = len(license_part) // SEQ_LEN * SEQ_LEN
    calibration = {
        "pydoc": chunk_token_ids(tokenizer, load_texts("pydoc", split="train"), SEQ_LEN),
        "license": torch.tensor(license_part[:usable]).view(-1, SEQ_LEN)[:BLOCKS],  # 8,192 tokens in a row
        "news": chunk_token_ids(tokenizer, news[:NEWS_SPLIT], SEQ_LEN),
        "wiki": chunk_token_ids(tokenizer, wiki[:WIKI_SPLIT], SEQ_LEN),
    }
    return measured, calibration


def calibration_blocks(data: str, calibration: dict[str, torch.Tensor]) -> torch.Tensor:
    names = data.split("+")
    share = [BLOCKS // len(names) + (i < BLOCKS % len(names)) for i in range(len(names))]
    parts = [spread(calibration[name], count) for name, count in zip(names, share, strict=True)]
    rows = [part[i] for i in range(max(share)) for part in parts if i < len(part)]  # interleaved
    return torch.stack(rows)


def measure(model, tokenizer, measured: dict[str, list[str]]) -> dict[str, float]:
    return {
        name: round(perplexity(model, tokenizer, texts, max_tokens=EVAL_TOKENS, progress=False).ppl, 3)
        for name, texts in measured.items()
    }


def run(data: str, out: Path, threads: int) -> None:
    torch.set_num_threads(threads)
    model, tokenizer = load_model_and_tokenizer(None)
    model.eval()
    measured, calibration = load_domains(tokenizer)
    result: dict = {"data": data, "share_layers": SHARE_LAYERS, "rank": 8, "threads": threads}
    if data == "base":
        result["perplexity"] = measure(model, tokenizer, measured)
    else:
        unknown = set(data.split("+")) - set(TEXTS)
        if unknown:
            raise SystemExit(f"--data {data}: unknown {sorted(unknown)}; choose from {TEXTS}, joined by '+'")
        blocks = calibration_blocks(data, calibration)
        peft_model = get_peft_model(model, LiSAConfig(share_layers=SHARE_LAYERS, rank=8))
        started = time.process_time()
        report = calibrate(peft_model, tokenizer, blocks, progress=False, log=False)
        result["calibration_cpu_min"] = round((time.process_time() - started) / 60, 2)
        result["mean_layer_kl_after"] = round(sum(layer.kl_after for layer in report.layers) / len(report.layers), 4)
        peft_model.eval()
        result["perplexity"] = measure(peft_model, tokenizer, measured)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


def table(files: list[Path]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = {r["data"]: r for r in (json.loads(f.read_text()) for f in files)}
    base = results.pop("base")["perplexity"]
    lines = [
        "| calibrated on | CPU-min | " + " | ".join(f"{t} (base {base[t]:.2f})" for t in TEXTS) + " |",
        "|---|---:|" + "---:|" * len(TEXTS),
    ]
    order = sorted(results, key=lambda d: (len(d.split("+")), TEXTS.index(d.split("+")[0]), d))
    grid = []
    for data in order:
        ppl = results[data]["perplexity"]
        gaps = [ppl[t] / base[t] - 1 for t in TEXTS]
        grid.append(gaps)
        cells = " | ".join(f"{ppl[t]:.2f} ({gap:+.1%})" for t, gap in zip(TEXTS, gaps, strict=True))
        lines.append(f"| {data} | {results[data]['calibration_cpu_min']:.2f} | {cells} |")
    out_dir = files[0].parent
    (out_dir / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    fig, ax = plt.subplots(figsize=(6.4, 0.5 * len(order) + 1.6))
    image = ax.imshow([[100 * g for g in row] for row in grid], cmap="Reds", vmin=0, vmax=60, aspect="auto")
    for i, row in enumerate(grid):
        for j, gap in enumerate(row):
            ax.text(j, i, f"{gap:+.0%}", ha="center", va="center", fontsize=9)
    ax.set_xticks(range(len(TEXTS)), [f"{t}\n(measured)" for t in TEXTS])
    ax.set_yticks(range(len(order)), order)
    ax.set_ylabel("calibrated on")
    ax.set_title("Perplexity over the base after calibration alone\n(SmolLM2-135M, 15/30 layers shared, rank 8)")
    fig.colorbar(image, ax=ax, label="% over the base")
    fig.tight_layout()
    fig.savefig(out_dir / "transfer.png", dpi=110)


def export(out_dir: Path) -> None:
    """The texts of the main-job runs in domain.md: the news and Wikipedia calibration parts (``news_train.txt``,
    ``wiki_train.txt``), the news measured part (``news_test.txt``), and ``pydoc_news.jsonl``: the 200 news
    calibration articles and as many tokens of pydoc train documents (shuffled, seed 0), alternating."""
    import random

    out_dir.mkdir(parents=True, exist_ok=True)
    news = news_articles()
    (out_dir / "news_train.txt").write_text("\n\n".join(news[:NEWS_SPLIT]), encoding="utf-8")
    (out_dir / "news_test.txt").write_text("\n\n".join(news[NEWS_SPLIT:]), encoding="utf-8")
    (out_dir / "wiki_train.txt").write_text("\n\n".join(wiki_articles()[:WIKI_SPLIT]), encoding="utf-8")
    _, tokenizer = load_model_and_tokenizer(None)
    news_tokens = sum(len(tokenizer(text)["input_ids"]) for text in news[:NEWS_SPLIT])
    pydoc = load_texts("pydoc", split="train")
    random.Random(0).shuffle(pydoc)
    chosen, tokens = [], 0
    for document in pydoc:
        if tokens >= news_tokens:
            break
        chosen.append(document)
        tokens += len(tokenizer(document)["input_ids"])
    pairs = [(chosen[i : i + 1], news[i : i + 1]) for i in range(max(len(chosen), NEWS_SPLIT))]
    documents = [document for first, second in pairs for document in (*first, *second)]
    lines = "".join(json.dumps({"text": document}) + "\n" for document in documents)
    (out_dir / "pydoc_news.jsonl").write_text(lines, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", help="base, or the calibration text(s): " + ", ".join(TEXTS) + ", joined by +")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--table", type=Path, nargs="+", help="assemble these results into table.md and a plot")
    parser.add_argument("--export", type=Path, help="write the texts of domain.md's main-job runs here")
    args = parser.parse_args()
    if args.table:
        table(args.table)
    elif args.export:
        export(args.export)
    elif args.data and args.out:
        run(args.data, args.out, args.threads)
    else:
        parser.error("give --data and --out, --table FILES, or --export DIR")


if __name__ == "__main__":
    main()
