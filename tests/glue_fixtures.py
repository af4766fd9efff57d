"""Tiny GLUE fixtures shared by test_glue_train.py and test_glue_cli.py: random BERT / RoBERTa model
directories with tokenizers built in place, and small glue/<task>/<split>.jsonl files."""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch

WORDS = ("a man is playing guitar plays music the dog cat runs sleeps sits on mat woman reads book "
         "child eats apple car drives fast slow red blue green big small happy sad yes no not").split()
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", *WORDS]


def sentence(rng: random.Random, length: int = 6) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(length)) + " ."


def glue_rows(task: str, n: int, seed: int = 0) -> list[dict]:
    """Rows with a learnable signal: label 1 (or a high score) when the first word is 'yes'."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        positive = i % 2 == 0
        first = ("yes " if positive else "no ") + sentence(rng, rng.randint(3, 8))
        if task == "stsb":
            rows.append({"sentence1": first, "sentence2": sentence(rng), "label": round(4.0 + rng.random(), 2)
                         if positive else round(rng.random(), 2), "idx": i})
        elif task in ("rte", "mrpc"):
            rows.append({"sentence1": first, "sentence2": sentence(rng), "label": 0 if positive else 1, "idx": i})
        else:  # cola / sst2
            rows.append({"sentence": first, "label": 1 if positive else 0, "idx": i})
    return rows


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def write_glue_task(data_dir: Path, task: str, train: int = 64, validation: int = 24) -> Path:
    write_jsonl(data_dir / "glue" / task / "train.jsonl", glue_rows(task, train, seed=1))
    write_jsonl(data_dir / "glue" / task / "validation.jsonl", glue_rows(task, validation, seed=2))
    return data_dir


def bert_tokenizer(folder: Path):
    from transformers import BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    return BertTokenizerFast.from_pretrained(str(folder))


def tiny_bert_dir(folder: Path, seed: int = 0) -> Path:
    """A 2-layer random BertModel checkpoint (no head: the head is added at load time, like MiniLM)."""
    from transformers import BertConfig, BertModel

    tokenizer = bert_tokenizer(folder)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, pad_token_id=0)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_roberta_dir(folder: Path, seed: int = 0) -> Path:
    """A 2-layer random RobertaModel checkpoint with a byte-level BPE tokenizer (conftest's, with <pad>)."""
    from conftest import make_tokenizer
    from transformers import RobertaConfig, RobertaModel

    tokenizer = make_tokenizer(pad_is_eos=False)
    torch.manual_seed(seed)
    config = RobertaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=80, pad_token_id=tokenizer.pad_token_id,
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, type_vocab_size=1)
    RobertaModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
