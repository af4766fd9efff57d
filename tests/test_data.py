"""Prompts, tokenisation/label masking, collation, training-set loading and the packaged sample."""
from __future__ import annotations

import gzip
import json

import pytest
import torch

from neuroada_cli import paths
from neuroada_cli.data.llm_adapters import find_file, load_rows
from neuroada_cli.data.prompts import build_prompt, build_target
from neuroada_cli.data.tokenize import IGNORE_INDEX, collate_causal, tokenize_pairs, tokenize_rows
from neuroada_cli.data.train_sets import load_train_rows
from neuroada_cli.errors import UserError

from helpers import make_tokenizer


def tokenize_example(tokenizer, prompt: str, target: str, max_length: int) -> dict:
    """One (prompt, target) pair through the library's batched tokeniser."""
    return tokenize_pairs([(prompt, target)], tokenizer, max_length)[0]

ROW = {"instruction": "Is the sky blue?", "input": "", "output": "the correct answer is true", "answer": "true"}
EVAL_SETS = ("boolq", "piqa", "social_i_qa", "winogrande", "ARC-Easy", "ARC-Challenge", "openbookqa",
             "MultiArith", "gsm8k", "AddSub", "AQuA", "SingleEq", "SVAMP", "mawps")


# ---------------------------------------------------------------- prompts

def test_commonsense_prompt_and_target_exact():
    assert build_prompt(ROW, "commonsense") == "Is the sky blue?\n"
    assert build_target(ROW, "commonsense") == "the correct answer is true"


def test_alpaca_prompt_exact():
    row = {"instruction": "What is 3 + 4?", "input": "", "output": "3 + 4 = 7. The answer is 7", "answer": "7"}
    assert build_prompt(row, "alpaca") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes "
        "the request.\n\n### Instruction:\nWhat is 3 + 4?\n\n### Response:\n"
    )
    assert build_target(row, "alpaca") == "3 + 4 = 7. The answer is 7"


def test_non_empty_input_is_kept():
    row = dict(ROW, input="Context here")
    assert "### Input:\nContext here\n\n### Response:\n" in build_prompt(row, "alpaca")
    assert build_prompt(row, "commonsense") == "Is the sky blue?\nContext here\n"


def test_unknown_template_lists_valid_ones():
    with pytest.raises(UserError, match="commonsense, alpaca"):
        build_prompt(ROW, "chatml")


# ---------------------------------------------------------------- tokenisation

def _bos_tokenizer():
    """A tokenizer that adds bos by itself, like Llama's."""
    from tokenizers import processors

    tok = make_tokenizer()
    bos = tok.convert_tokens_to_ids("<s>")
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)]
    )
    return tok


def test_prompt_masked_target_and_eos_labelled(tiny_tokenizer):
    prompt, target = build_prompt(ROW, "commonsense"), build_target(ROW, "commonsense")
    example = tokenize_example(tiny_tokenizer, prompt, target, max_length=256)
    prompt_ids = tiny_tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full_ids = tiny_tokenizer(prompt + target, add_special_tokens=False)["input_ids"]
    eos = tiny_tokenizer.eos_token_id
    assert example["input_ids"] == full_ids + [eos]
    assert example["labels"][: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    assert example["labels"][len(prompt_ids):] == full_ids[len(prompt_ids):] + [eos]
    assert tiny_tokenizer.decode(example["labels"][len(prompt_ids):-1]) == target


def test_bos_added_when_tokenizer_adds_it_and_masked():
    tok = _bos_tokenizer()
    bos = tok.convert_tokens_to_ids("<s>")
    example = tokenize_example(tok, "Is the sky blue?\n", "the correct answer is true", max_length=256)
    assert example["input_ids"][0] == bos
    assert example["input_ids"].count(bos) == 1
    assert example["labels"][0] == IGNORE_INDEX
    assert example["labels"][-1] == tok.eos_token_id


def test_no_bos_when_tokenizer_does_not_add_one(tiny_tokenizer):
    example = tokenize_example(tiny_tokenizer, "Is the sky blue?\n", "true", max_length=256)
    assert tiny_tokenizer.bos_token_id not in example["input_ids"]


def test_truncation_keeps_the_start(tiny_tokenizer):
    full = tokenize_example(tiny_tokenizer, "Is the sky blue?\n", "the correct answer is true", 256)
    cut = tokenize_example(tiny_tokenizer, "Is the sky blue?\n", "the correct answer is true", len(full["input_ids"]) - 2)
    assert cut["input_ids"] == full["input_ids"][:-2]
    assert cut["labels"] == full["labels"][:-2]
    assert tiny_tokenizer.eos_token_id not in cut["input_ids"]  # a cut example loses its eos


def test_tokenize_rows_matches_single_example_path(tiny_tokenizer):
    rows = [ROW, dict(ROW, instruction="A man is playing a guitar.", output="the correct answer is false")]
    batched = tokenize_rows(rows, tiny_tokenizer, "commonsense", 256)
    single = [tokenize_example(tiny_tokenizer, build_prompt(r, "commonsense"), build_target(r, "commonsense"), 256)
              for r in rows]
    assert batched == single


def test_tokenize_rows_drops_examples_without_target(tiny_tokenizer, caplog):
    long_row = dict(ROW, instruction="the quick brown fox jumps over the lazy dog " * 20)
    examples = tokenize_rows([ROW, long_row], tiny_tokenizer, "commonsense", max_length=24)
    assert len(examples) == 1
    assert "dropped 1 of 2" in caplog.text
    with pytest.raises(UserError, match="data.max_length=24"):
        tokenize_rows([long_row], tiny_tokenizer, "commonsense", max_length=24)
    with pytest.raises(UserError, match="max_length"):
        tokenize_rows([ROW], tiny_tokenizer, "commonsense", max_length=1)


def test_max_length_has_one_lower_bound(tiny_tokenizer):
    from neuroada_cli.data.tokenize import MIN_MAX_LENGTH

    for too_small in (MIN_MAX_LENGTH - 1, True, 12.0):
        with pytest.raises(UserError, match=f"data.max_length={too_small!r} .*>= {MIN_MAX_LENGTH}"):
            tokenize_example(tiny_tokenizer, "q", "a", max_length=too_small)
    assert len(tokenize_example(tiny_tokenizer, "q " * 40, "a", max_length=MIN_MAX_LENGTH)["input_ids"]) == MIN_MAX_LENGTH


def test_collate_masks_padding_by_attention_mask_when_pad_is_eos(tiny_tokenizer):
    assert tiny_tokenizer.pad_token_id == tiny_tokenizer.eos_token_id
    short = tokenize_example(tiny_tokenizer, "Q\n", "true", 256)
    long = tokenize_example(tiny_tokenizer, "Is the sky blue?\n", "the correct answer is true", 256)
    batch = collate_causal([short, long], pad_id=tiny_tokenizer.pad_token_id)
    width = len(long["input_ids"])
    assert {key: tuple(value.shape) for key, value in batch.items()} == {
        "input_ids": (2, width), "attention_mask": (2, width), "labels": (2, width)}
    assert all(value.dtype == torch.long for value in batch.values())
    n = len(short["input_ids"])
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (width - n)
    assert batch["input_ids"][0, n:].eq(tiny_tokenizer.pad_token_id).all()
    assert batch["labels"][0, n:].eq(IGNORE_INDEX).all()
    # The real eos (same id as pad) keeps its label in both rows.
    assert batch["labels"][0, n - 1].item() == tiny_tokenizer.eos_token_id
    assert batch["labels"][1, -1].item() == tiny_tokenizer.eos_token_id
    assert batch["labels"][1].tolist() == long["labels"]


# ---------------------------------------------------------------- training sets

def _rows(n: int) -> list[dict]:
    return [{"instruction": f"question {i}", "input": "", "output": f"the correct answer is {i}", "answer": str(i)}
            for i in range(n)]


def _write(path, rows, gz=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(rows)
    if gz:
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


def test_stem_json_and_gz(tmp_path):
    _write(tmp_path / "llm_adapters" / "mini" / "train.json", _rows(5))
    _write(tmp_path / "llm_adapters" / "packed" / "train.json.gz", _rows(7), gz=True)
    assert [r["instruction"] for r in load_train_rows("mini", tmp_path)] == [f"question {i}" for i in range(5)]
    assert len(load_train_rows("packed", str(tmp_path))) == 7


def test_file_path_and_folder_path(tmp_path):
    path = _write(tmp_path / "custom" / "my_set.json", _rows(3))
    assert len(load_train_rows(str(path), tmp_path)) == 3
    _write(tmp_path / "folder" / "train.json.gz", _rows(4), gz=True)
    assert len(load_train_rows(str(tmp_path / "folder"), tmp_path)) == 4


def test_limit_is_a_deterministic_seeded_subset_in_file_order(tmp_path):
    _write(tmp_path / "llm_adapters" / "mini" / "train.json", _rows(50))
    first = load_train_rows("mini", tmp_path, limit=10, seed=3)
    again = load_train_rows("mini", tmp_path, limit=10, seed=3)
    other = load_train_rows("mini", tmp_path, limit=10, seed=4)
    assert first == again and first != other
    numbers = [int(r["answer"]) for r in first]
    assert len(numbers) == 10 and numbers == sorted(numbers) and numbers != list(range(10))
    assert len(load_train_rows("mini", tmp_path, limit=500)) == 50
    with pytest.raises(UserError, match="train_limit"):
        load_train_rows("mini", tmp_path, limit=0)


def test_missing_stem_names_expected_path_fix_and_available_sets(tmp_path):
    _write(tmp_path / "llm_adapters" / "math_10k" / "train.json", _rows(2))
    with pytest.raises(UserError) as info:
        load_train_rows("commonsense_170k", tmp_path)
    message = str(info.value)
    assert str(tmp_path / "llm_adapters" / "commonsense_170k" / "train.json") in message
    assert "data.dir" in message and "NEUROADA_DATA_DIR" in message
    assert "math_10k" in message and "\n" not in message


def test_missing_file_path(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_train_rows(str(tmp_path / "nope.json"), tmp_path)


def test_malformed_row_is_a_one_line_error(tmp_path):
    _write(tmp_path / "llm_adapters" / "bad" / "train.json", [{"instruction": "q", "output": "a"}, {"instruction": 3}])
    with pytest.raises(UserError, match="row 1"):
        load_train_rows("bad", tmp_path)


def test_hub_dataset_offline_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="offline"):
        load_train_rows("someone/some-dataset", tmp_path)


# ---------------------------------------------------------------- packaged sample

def test_packaged_sample_layout_sizes_and_default_dir(monkeypatch):
    monkeypatch.delenv("NEUROADA_DATA_DIR", raising=False)
    sample = paths.SAMPLE_DATA_DIR
    assert len(load_train_rows("commonsense_15k", None)) == 1000
    assert len(load_train_rows("math_10k", None)) == 1000
    for task in EVAL_SETS:
        assert len(load_rows(find_file(sample / "llm_adapters" / task, "test"))) == 100, task
    assert len(load_rows(sample / "llm_adapters" / "hellaswag" / "test_approx.json.gz")) == 100
    assert (sample / "SOURCES.md").is_file()
    llm_adapters_bytes = sum(p.stat().st_size for p in (sample / "llm_adapters").rglob("*") if p.is_file())
    assert llm_adapters_bytes <= 1_700_000


def _raw(path):
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        return json.load(handle)


def test_packaged_sample_rows_are_unchanged_copies(shared_data_dir):
    sample = paths.SAMPLE_DATA_DIR / "llm_adapters"
    for task in ("boolq", "gsm8k", "AQuA"):
        assert _raw(sample / task / "test.json.gz") == _raw(shared_data_dir / "llm_adapters" / task / "test.json")[:100]
    source = _raw(shared_data_dir / "llm_adapters" / "commonsense_15k" / "train.json")
    picked = _raw(sample / "commonsense_15k" / "train.json.gz")
    positions = [source.index(row) for row in picked[:20]]
    assert positions == sorted(positions)
