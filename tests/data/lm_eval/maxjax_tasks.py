"""Loads the JSONL files next to this file as lm-eval datasets (``custom_dataset``): no download, no cache."""

import json
from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def _load(name: str) -> dict:
    rows = [json.loads(line) for line in (HERE / name).read_text().splitlines() if line.strip()]
    return {"test": datasets.Dataset.from_list(rows)}


def multiple_choice(**kwargs):
    return _load("mc.jsonl")


def generation(**kwargs):
    return _load("gen.jsonl")


def documents(**kwargs):
    return _load("docs.jsonl")
