"""Shared fixtures: tiny random models and a tokenizer trained in-process (no hub, no network).

The functions behind them live in helpers.py; test files import those from there.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from helpers import SHARED_DATA_DIR, make_tokenizer, tiny_bert_dir, tiny_llama  # noqa: E402  (after the env)


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
