"""GLUE data: task table, JSONL loading and its errors, the LoReFT split, encode/collate, the sample."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch

from neuroada_cli import paths
from neuroada_cli.data.batching import length_sorted_batches
from neuroada_cli.glue import data as glue
from neuroada_cli.glue.data import (collate_classification, encode, load_split, loreft_split, loreft_split_indices,
                                    report_rows, selection_rows)
from neuroada_cli.glue.tasks import GLUE_TASKS, glue_task
from neuroada_cli.errors import UserError

RTE_ROWS = [
    {"sentence1": "A man is playing a guitar.", "sentence2": "A man plays music.", "label": 0, "idx": 0},
    {"sentence1": "The dog runs.", "sentence2": "The cat sleeps.", "label": 1, "idx": 1},
    {"sentence1": "A man is playing.", "sentence2": "The dog is playing a guitar.", "label": 1, "idx": 2},
]
STSB_ROWS = [
    {"sentence1": "A man is playing a guitar.", "sentence2": "A man plays a guitar.", "label": 4.75, "idx": 0},
    {"sentence1": "The dog runs.", "sentence2": "The cat sleeps.", "label": 0.0, "idx": 1},
    {"sentence1": "A dog runs.", "sentence2": "The dog runs.", "label": 5, "idx": 2},
]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "man", "is", "playing", "guitar", "plays", "music",
         "the", "dog", "cat", "runs", "sleeps", "."]


def write_jsonl(path: Path, rows, gz: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows)
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(text.encode("utf-8")))
    else:
        path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def bert_tokenizer(tmp_path_factory):
    from transformers import BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-bert-tokenizer")
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    return BertTokenizerFast.from_pretrained(str(folder))


# ------------------------------------------------------------------------------ task table

def test_task_table_covers_the_eight_tasks():
    assert set(GLUE_TASKS) == {"cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte"}
    assert glue_task("stsb").is_regression and glue_task("stsb").num_labels == 1
    assert glue_task("mnli").num_labels == 3
    assert glue_task("stsb").problem_type == "regression"
    assert {s.problem_type for name, s in GLUE_TASKS.items() if name != "stsb"} == {"single_label_classification"}
    assert glue_task("mnli").validation_splits == ("validation_matched", "validation_mismatched")
    assert glue_task("mnli").selection_split == "validation_matched"
    assert glue_task("qqp").text_columns == ("question1", "question2")
    assert glue_task("cola").text_columns == ("sentence",)
    assert {t: s.primary_metric for t, s in GLUE_TASKS.items()} == {
        "cola": "matthews_correlation", "stsb": "pearson", "sst2": "accuracy", "mrpc": "accuracy",
        "qqp": "accuracy", "mnli": "accuracy", "qnli": "accuracy", "rte": "accuracy"}


def test_task_names_are_forgiving_and_unknown_lists_valid():
    assert glue_task("glue/RTE").name == "rte"
    assert glue_task("STS-B").name == "stsb"
    with pytest.raises(UserError, match="unknown GLUE task 'wnli'.*cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte"):
        glue_task("wnli")


# ------------------------------------------------------------------------------ loading

def test_load_classification_jsonl(tmp_path):
    write_jsonl(tmp_path / "glue" / "rte" / "validation.jsonl", RTE_ROWS)
    rows = load_split("rte", "validation", tmp_path)
    assert rows == RTE_ROWS


def test_load_regression_jsonl_gz_fills_idx_and_floats(tmp_path):
    stored = [{k: v for k, v in row.items() if k != "idx"} for row in STSB_ROWS]
    write_jsonl(tmp_path / "glue" / "stsb" / "train.jsonl", stored, gz=True)
    rows = load_split("glue/stsb", "train", tmp_path)
    assert [row["idx"] for row in rows] == [0, 1, 2]
    assert [row["label"] for row in rows] == [4.75, 0.0, 5.0]
    assert all(isinstance(row["label"], float) for row in rows)


def test_load_uses_env_data_dir_when_none(tmp_path, monkeypatch):
    write_jsonl(tmp_path / "glue" / "rte" / "train.jsonl", RTE_ROWS)
    monkeypatch.setenv("NEUROADA_DATA_DIR", str(tmp_path))
    assert len(load_split("rte", "train")) == 3


def test_missing_split_names_expected_path(tmp_path, offline):
    with pytest.raises(UserError) as err:
        load_split("rte", "train", tmp_path)
    message = str(err.value)
    assert str(tmp_path / "glue" / "rte" / "train.jsonl") in message and "\n" not in message


@pytest.mark.parametrize("task,split", [("mnli", "train"), ("qqp", "validation"), ("qnli", "train")])
def test_missing_split_absent_from_shared_data_says_so(tmp_path, offline, task, split):
    with pytest.raises(UserError, match="data bundle this project is tested with has no MNLI"):
        load_split(task, split, tmp_path)


def test_unknown_split_lists_valid_splits(tmp_path):
    with pytest.raises(UserError, match="no split 'validation'.*validation_matched, validation_mismatched"):
        load_split("mnli", "validation", tmp_path)


@pytest.mark.parametrize("task,row,needle", [
    ("rte", {"sentence1": "a", "sentence2": "b", "label": 2}, "label 2 is outside rte's range 0..1"),
    ("rte", {"sentence1": "a", "sentence2": "b", "label": -1}, "test labels are hidden"),
    ("rte", {"sentence1": "a", "sentence2": "b", "label": True}, "label True"),
    ("stsb", {"sentence1": "a", "sentence2": "b", "label": 5.5}, "outside stsb's range 0..5"),
    ("stsb", {"sentence1": "a", "sentence2": "b", "label": -0.1}, "outside stsb's range 0..5"),
    ("rte", {"sentence1": "a", "label": 0}, "missing text column 'sentence2'"),
])
def test_bad_row_names_file_and_line(tmp_path, task, row, needle):
    good = RTE_ROWS[0] if task == "rte" else STSB_ROWS[0]
    path = write_jsonl(tmp_path / "glue" / task / "validation.jsonl", [good, row])
    with pytest.raises(UserError) as err:
        load_split(task, "validation", tmp_path)
    assert f"{path}: line 2" in str(err.value) and needle in str(err.value)


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "glue" / "rte" / "train.jsonl", [RTE_ROWS[0], RTE_ROWS[1], '{"sentence1": "a",'])
    with pytest.raises(UserError, match=f"{path}: line 3 is not valid JSON"):
        load_split("rte", "train", tmp_path)


def test_hub_fallback_when_online(tmp_path, monkeypatch):
    import datasets

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append((a, k)) or RTE_ROWS)
    assert load_split("rte", "validation", tmp_path) == RTE_ROWS
    assert calls == [((glue.HUB_DATASET, "rte"), {"split": "validation"})]

    def fail(*_a, **_k):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(datasets, "load_dataset", fail)
    with pytest.raises(UserError, match="hub download failed \\(no route to host\\)"):
        load_split("rte", "validation", tmp_path)


# ------------------------------------------------------------------------------ LoReFT split

@pytest.mark.parametrize("n,selection", [(0, 0), (1, 0), (11, 5), (277, 138), (5000, 2500), (5001, 1000),
                                         (9815, 1000)])
def test_loreft_split_sizes_disjoint_and_complete(n, selection):
    rows = [{"idx": i} for i in range(n)]
    chosen, report = loreft_split(rows)
    assert len(chosen) == selection and len(report) == n - selection
    assert {r["idx"] for r in chosen}.isdisjoint({r["idx"] for r in report})
    assert sorted(r["idx"] for r in chosen + report) == list(range(n))
    assert [r["idx"] for r in chosen] == sorted(r["idx"] for r in chosen)  # file order


def test_loreft_split_is_deterministic_and_seeded():
    assert loreft_split_indices(1043, 42) == loreft_split_indices(1043, 42)
    assert loreft_split_indices(1043, 42) != loreft_split_indices(1043, 43)


@pytest.mark.parametrize("n,seed", [(277, 42), (1500, 43), (5463, 42)])
def test_loreft_split_matches_pyreft_random_split(n, seed):
    """pyreft: set_seed(seed) ... random_split(eval, [n - m, m]) -> (report, selection)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        m = 1000 if n > 5000 else n // 2
        report, selection = torch.utils.data.random_split(range(n), [n - m, m])
    assert loreft_split_indices(n, seed) == (sorted(selection.indices), sorted(report.indices))


def test_selection_and_report_rows_are_the_two_parts_of_the_selection_split(tmp_path):
    rows = [{"sentence1": f"s{i}", "sentence2": "t", "label": i % 2, "idx": i} for i in range(12)]
    write_jsonl(tmp_path / "glue" / "rte" / "validation.jsonl", rows)
    selection, report = loreft_split(rows, seed=3)
    assert selection_rows("rte", tmp_path, seed=3) == selection and report_rows("rte", tmp_path, seed=3) == report
    assert selection_rows("rte", tmp_path, seed=4) != selection  # the part depends on the run seed
    write_jsonl(tmp_path / "glue" / "mnli" / "validation_mismatched.jsonl",
                [{"premise": "p", "hypothesis": f"h{i}", "label": i % 3, "idx": i} for i in range(6)])
    assert [r["idx"] for r in report_rows("mnli", tmp_path, 3, split="validation_mismatched")] == \
        [[0, 1, 2, 3, 4, 5][i] for i in loreft_split_indices(6, 3)[1]]


def test_loreft_split_leaves_global_rng_alone():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    loreft_split_indices(500, 42)
    assert torch.equal(torch.rand(3), expected)


# ------------------------------------------------------------------------------ encode / collate

def test_encode_pairs_through_pair_api(bert_tokenizer):
    examples = encode(RTE_ROWS[:2], bert_tokenizer, "rte", max_length=64)
    ids = {t: bert_tokenizer.convert_tokens_to_ids(t) for t in VOCAB}
    first = examples[0]
    # [CLS] a man is playing a guitar . [SEP] a man plays music . [SEP]
    assert first["input_ids"][0] == ids["[CLS]"] and first["input_ids"][-1] == ids["[SEP]"]
    assert first["input_ids"].count(ids["[SEP]"]) == 2
    first_sep = first["input_ids"].index(ids["[SEP]"])
    assert first["token_type_ids"] == [0] * (first_sep + 1) + [1] * (len(first["input_ids"]) - first_sep - 1)
    assert first["attention_mask"] == [1] * len(first["input_ids"])
    assert [e["labels"] for e in examples] == [0, 1] and isinstance(first["labels"], int)
    assert [e["idx"] for e in examples] == [0, 1]


def test_encode_single_sentence_and_truncation(bert_tokenizer):
    rows = [{"sentence": "a man is playing a guitar the dog runs", "label": 1, "idx": 7}]
    (example,) = encode(rows, bert_tokenizer, "cola", max_length=8)
    assert len(example["input_ids"]) == 8 and example["input_ids"][-1] == bert_tokenizer.sep_token_id
    (pair,) = encode(RTE_ROWS[2:], bert_tokenizer, "rte", max_length=9)
    assert len(pair["input_ids"]) == 9 and pair["input_ids"].count(bert_tokenizer.sep_token_id) == 2
    with pytest.raises(UserError, match="data.max_length=2"):
        encode(rows, bert_tokenizer, "cola", max_length=2)


def test_collate_pads_dynamically_classification(bert_tokenizer):
    examples = encode(RTE_ROWS, bert_tokenizer, "rte", max_length=64)
    batch = collate_classification(examples, pad_id=bert_tokenizer.pad_token_id)
    width = max(len(e["input_ids"]) for e in examples)
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert batch["input_ids"].shape == (3, width) and batch["labels"].dtype == torch.long
    for row, example in enumerate(examples):
        length = len(example["input_ids"])
        assert batch["input_ids"][row, :length].tolist() == example["input_ids"]
        assert (batch["input_ids"][row, length:] == bert_tokenizer.pad_token_id).all()
        assert batch["attention_mask"][row].tolist() == [1] * length + [0] * (width - length)
        assert batch["token_type_ids"][row, length:].sum() == 0
    assert batch["labels"].tolist() == [0, 1, 1]


def test_collate_regression_labels_are_float(bert_tokenizer):
    examples = encode(STSB_ROWS, bert_tokenizer, "stsb", max_length=64)
    batch = collate_classification(examples, pad_id=0)
    assert batch["labels"].dtype == torch.float32 and batch["labels"].tolist() == [4.75, 0.0, 5.0]
    forced = collate_classification([dict(e, labels=int(e["labels"])) for e in examples], 0, regression=True)
    assert forced["labels"].dtype == torch.float32


def test_collate_without_token_type_ids():
    examples = [{"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": 2},
                {"input_ids": [5], "attention_mask": [1], "labels": 0}]
    batch = collate_classification(examples, pad_id=1)
    assert "token_type_ids" not in batch
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 1, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_length_sorted_batches_cover_everything_longest_first():
    lengths = [3, 9, 1, 9, 4, 7, 2]
    batches = length_sorted_batches(lengths, batch_size=3)
    assert [len(b) for b in batches] == [3, 3, 1]
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))
    assert [lengths[i] for i in flat] == sorted(lengths, reverse=True)
    assert length_sorted_batches([{"input_ids": [1, 2]}, {"input_ids": [1, 2, 3]}], 4) == [[1, 0]]
    with pytest.raises(UserError):
        length_sorted_batches(lengths, 0)


# ------------------------------------------------------------------------------ packaged sample

SAMPLE_FILES = {("rte", "train"): 400, ("rte", "validation"): 277, ("stsb", "train"): 800,
                ("stsb", "validation"): 400, ("cola", "train"): 200, ("cola", "validation"): 200,
                ("sst2", "train"): 200, ("sst2", "validation"): 200, ("mrpc", "train"): 150,
                ("mrpc", "validation"): 150, ("qnli", "validation"): 200}


def test_packaged_sample_loads_and_is_small(monkeypatch, offline):
    monkeypatch.delenv("NEUROADA_DATA_DIR", raising=False)
    for (task, split), count in SAMPLE_FILES.items():
        assert len(load_split(task, split)) == count, (task, split)
    files = list((paths.SAMPLE_DATA_DIR / "glue").rglob("*.jsonl.gz"))
    assert len(files) == len(SAMPLE_FILES)
    assert sum(f.stat().st_size for f in files) <= 250_000
    with pytest.raises(UserError, match="qnli/train not found"):
        load_split("qnli", "train")


# ------------------------------------------------------------------------------ the real data

REAL_COUNTS = {("cola", "train"): 8551, ("cola", "validation"): 1043, ("sst2", "train"): 67349,
               ("sst2", "validation"): 872, ("mrpc", "train"): 3668, ("mrpc", "validation"): 408,
               ("stsb", "train"): 5749, ("stsb", "validation"): 1500, ("rte", "train"): 2490,
               ("rte", "validation"): 277, ("qnli", "validation"): 5463}


def test_real_glue_files_match_readme_counts(shared_data_dir):
    if not (shared_data_dir / "glue").is_dir():
        pytest.skip("no glue/ in the shared data dir")
    for (task, split), count in REAL_COUNTS.items():
        if task == "sst2" and split == "train":
            continue  # 67k rows: counted by lines below, not parsed, to keep the test fast
        rows = load_split(task, split, shared_data_dir)
        assert len(rows) == count, (task, split)
        assert [row["idx"] for row in rows] == list(range(count))
    with open(shared_data_dir / "glue" / "sst2" / "train.jsonl", encoding="utf-8") as handle:
        assert sum(1 for _ in handle) == REAL_COUNTS[("sst2", "train")]
    rte = load_split("rte", "validation", shared_data_dir)
    assert sum(row["label"] == 0 for row in rte) == 146 and sum(row["label"] == 1 for row in rte) == 131
    selection, report = loreft_split(load_split("qnli", "validation", shared_data_dir))
    assert (len(selection), len(report)) == (1000, 4463)


def test_sample_rows_are_unchanged_rows_of_the_real_files(shared_data_dir, monkeypatch):
    if not (shared_data_dir / "glue").is_dir():
        pytest.skip("no glue/ in the shared data dir")
    monkeypatch.delenv("NEUROADA_DATA_DIR", raising=False)
    for task, split in [("rte", "validation"), ("stsb", "validation"), ("mrpc", "train")]:
        real = {row["idx"]: row for row in load_split(task, split, shared_data_dir)}
        for row in load_split(task, split):
            assert real[row["idx"]] == row


@pytest.mark.parametrize("task,rows", [("rte", RTE_ROWS), ("stsb", STSB_ROWS)])
def test_collated_batch_feeds_a_sequence_classifier(bert_tokenizer, task, rows):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, num_labels=glue_task(task).num_labels)
    model = BertForSequenceClassification(config).eval()
    batch = collate_classification(encode(rows, bert_tokenizer, task, 64), bert_tokenizer.pad_token_id)
    output = model(**batch)
    assert output.logits.shape == (len(rows), config.num_labels) and torch.isfinite(output.loss)
    # Padding must not change an example's logits: the shortest example alone gives the same output.
    shortest = min(range(len(rows)), key=lambda i: batch["attention_mask"][i].sum())
    alone = collate_classification(encode(rows[shortest:shortest + 1], bert_tokenizer, task, 64), 0)
    assert torch.allclose(model(**alone).logits[0], output.logits[shortest], atol=1e-5)
