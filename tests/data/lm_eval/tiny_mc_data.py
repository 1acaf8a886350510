"""Loads the tiny multiple-choice task's JSONL next to this file (lm-eval's ``custom_dataset``)."""

from pathlib import Path

import datasets


def load(**kwargs):
    return datasets.DatasetDict({"test": datasets.Dataset.from_json(str(Path(__file__).with_name("tiny_mc.jsonl")))})
