"""Shared fixtures: tiny random models and a tokenizer trained in-process (no hub, no network)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_DIR = Path(__file__).resolve().parents[1]
SHARED_DATA_DIR = REPO_DIR.parent / "shared" / "data"

_CORPUS = [
    "Please choose the correct answer to the question: the correct answer is true false",
    "solution1 solution2 option1 option2 answer1 answer2 answer3 answer4 answer5 ending1 ending2",
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction: ### Response: The answer is 12. 3 + 4 = 7 and 0.5 * 10 = 5, so -2 apples (A) (B)",
    "the quick brown fox jumps over the lazy dog; a man is playing a guitar. entailment not_entailment",
]


def make_tokenizer(pad_is_eos: bool = True, padding_side: str = "right"):
    """A byte-level BPE tokenizer trained on a tiny corpus; pad = eos like SmolLM2 when pad_is_eos."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<s>"] if pad_is_eos else ["<|endoftext|>", "<s>", "<pad>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        bos_token="<s>",
        pad_token="<|endoftext|>" if pad_is_eos else "<pad>",
        padding_side=padding_side,
    )
    return fast


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tokenizer()


def tiny_llama_config(vocab_size: int = 400, **overrides):
    from transformers import LlamaConfig

    values = dict(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=1, eos_token_id=0, pad_token_id=0, tie_word_embeddings=False,
    )
    values.update(overrides)
    return LlamaConfig(**values)


def tiny_llama(seed: int = 0, **overrides):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**overrides)).eval()


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
    from glue_fixtures import tiny_bert_dir

    return tiny_bert_dir(tmp_path_factory.mktemp("tiny-bert"))
