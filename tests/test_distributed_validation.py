"""Validation shared by processes (training/validation.py ``evaluate_validation``): each of 2 gloo processes
evaluates its share of the held-out examples and both end with the metrics one process computes over all of them
(causal-LM loss, GLUE metrics)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from helpers import free_port, make_tokenizer, tiny_llama, write_glue_task, write_train_rows


def causal_setup(folder: str):
    from neuroada_cli.kinds.causal_lm import CausalLM

    kind = CausalLM(train_dataset="commonsense_15k", data_dir=folder, template="commonsense", max_length=64,
                    train_limit=None, seed=0, val_fraction=0.25)
    tokenizer = make_tokenizer()
    model = tiny_llama(seed=3)
    kind.prepare_model(model)
    return kind, model, kind.validation_examples(tokenizer), tokenizer.pad_token_id


def glue_setup(folder: str):
    from helpers import tiny_bert_dir
    from neuroada_cli.kinds.classification import SequenceClassification
    from neuroada_cli.models import load_model_and_tokenizer

    kind = SequenceClassification(task="rte", data_dir=folder, max_length=32, train_limit=None, seed=0)
    torch.manual_seed(0)
    model, tokenizer = load_model_and_tokenizer(str(tiny_bert_dir(Path(folder) / "bert")), kind=kind.name,
                                                **kind.model_options())
    return kind, model, kind.validation_examples(tokenizer), tokenizer.pad_token_id


SETUPS = {"causal_lm": causal_setup, "glue": glue_setup}


def worker(rank: int, world: int, port: int, folders: dict, out: str) -> None:
    import torch.distributed as dist

    from neuroada_cli.training.validation import evaluate_validation

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        report = {}
        for which, folder in folders.items():
            kind, model, examples, pad_id = SETUPS[which](folder)
            seen = []
            part = kind.evaluation_part

            def counting(model, shard, pad_id, batch_size, part=part, seen=seen):  # examples this process evaluated
                seen.append(len(shard))
                return part(model, shard, pad_id, batch_size)

            kind.evaluation_part = counting
            metrics = evaluate_validation(kind, model, examples, pad_id, 3, rank=rank, world=world)
            report[which] = {"metrics": metrics, "seen": seen}
        with open(os.path.join(out, f"rank{rank}.json"), "w") as handle:
            json.dump(report, handle)
    finally:
        dist.destroy_process_group()


def test_two_processes_share_validation_and_agree_with_one(tmp_path):
    """One pair of processes checks both kinds (a causal-LM loss and GLUE RTE's accuracy) to start processes once."""
    from neuroada_cli.training.validation import evaluate_validation

    folders = {"causal_lm": str(write_train_rows(tmp_path / "causal", n=40)),
               "glue": str(write_glue_task(tmp_path / "glue", "rte", train=8, validation=28))}
    alone = {}
    for which, folder in folders.items():
        kind, model, examples, pad_id = SETUPS[which](folder)
        assert hasattr(kind, "evaluation_part"), f"{type(kind).__name__} has no evaluation_part: not sharded"
        alone[which] = (evaluate_validation(kind, model, examples, pad_id, 3), len(examples))
        assert alone[which][0] == pytest.approx(kind.evaluate(model, examples, pad_id, 3), rel=1e-6)

    out = tmp_path / "out"
    out.mkdir()
    mp.spawn(worker, args=(2, free_port(), folders, str(out)), nprocs=2, join=True)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    for which, (metrics, total) in alone.items():
        assert ranks[0][which]["metrics"] == ranks[1][which]["metrics"], which  # every process holds the same
        assert [r[which]["seen"] for r in ranks] == [[(total + 1) // 2], [total // 2]], which  # its share only
        assert ranks[0][which]["metrics"].keys() == metrics.keys()
        for name, value in metrics.items():
            assert ranks[0][which]["metrics"][name] == pytest.approx(value, rel=1e-5, abs=1e-6), (which, name)
