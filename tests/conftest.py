"""Shared fixtures: tiny random models and a tokenizer trained in-process (no hub, no network).

The functions behind them live in helpers.py; test files import those from there.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from helpers import (  # noqa: E402  (after the env)
    SHARED_DATA_DIR, make_tokenizer, overrides, tiny_bert_dir, tiny_llama, write_train_rows,
)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tokenizer()


@pytest.fixture
def tiny_llama_dir(tmp_path, tiny_tokenizer):
    """A tiny random Llama saved with its tokenizer as a local model directory."""
    path = tmp_path / "tiny-llama"
    tiny_llama().save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def shared_data_dir():
    if not (SHARED_DATA_DIR / "llm_adapters").is_dir():
        pytest.skip(f"{SHARED_DATA_DIR} is not present on this machine")
    return SHARED_DATA_DIR


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory) -> Path:
    """A tiny random BERT checkpoint folder with its WordPiece tokenizer (read-only for tests)."""
    return tiny_bert_dir(tmp_path_factory.mktemp("tiny-bert"))


# ------------------------------------------------------- the fault matrix (tests/test_faults*.py)
@pytest.fixture
def fresh_log_handler():
    """cli.main binds its note handler to the sys.stdout of its first call (a closed capture later): drop it."""
    import logging

    logger = logging.getLogger("neuroada_cli")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    yield


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """A tiny Llama, its data and one finished run (4 steps, checkpoints at 2 and 4; only step-4 kept)."""
    root = tmp_path_factory.mktemp("faults")
    model = root / "model"
    tiny_llama().save_pretrained(model)
    make_tokenizer().save_pretrained(model)
    data = write_train_rows(root / "data")
    write_train_rows(data, n=2, seed=3, stem="boolq")  # an eval test file: llm_adapters/boolq/test.json
    (data / "llm_adapters" / "boolq" / "train.json").rename(data / "llm_adapters" / "boolq" / "test.json")
    values = {"model": model, "data": data, "root": root}
    from neuroada_cli.cli import main

    assert main(["train", *overrides(values, root / "run")]) == 0
    values["run"] = root / "run"
    return values


@pytest.fixture
def run(setup, tmp_path) -> Path:
    """A private copy of the finished run."""
    copy = tmp_path / "run"
    shutil.copytree(setup["run"], copy)
    return copy
