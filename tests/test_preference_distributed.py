"""DPO under DDP: 2 processes (gloo, CPU) give the adapter of 1 process accumulating the same global batches, with
the adapter-disabled reference pass inside DDP's forward and sharded validation (slow: two launches)."""
from __future__ import annotations

import json

import pytest
from helpers import accelerate_launch, assert_same_adapter, cli, pair_rows, write_jsonl

pytestmark = pytest.mark.slow


def test_two_processes_equal_one_process(tiny_llama_dir, tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(24))
    overrides = ["recipe=smollm2_dpo", f"model.name_or_path={tiny_llama_dir}", f"data.train_file={pairs}",
                 "trainer.max_steps=3", "trainer.batch_size=8", "trainer.micro_batch_size=2", "neuroada.k=4",
                 "optimizer.lr=2e-2", "data.max_length=64", "data.train_limit=16", "data.val_fraction=0.25",
                 "trainer.eval_every=null", "trainer.checkpoint_every=0"]
    one, two = tmp_path / "one", tmp_path / "two"
    cli("train", *overrides, f"trainer.output_dir={one}")
    accelerate_launch("train", *overrides, f"trainer.output_dir={two}", cwd=tmp_path)
    assert json.loads((two / "run.json").read_text())["world_size"] == 2
    assert_same_adapter(one, two)
    logs = [[json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()] for run in (one, two)]
    losses = [[line["loss"] for line in log if "loss" in line] for log in logs]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
    validations = [[line["validation"] for line in log if "validation" in line] for log in logs]
    assert len(validations[0]) == len(validations[1]) == 2
    for mine, theirs in zip(*validations):
        assert mine == pytest.approx(theirs, rel=1e-4, abs=1e-6)
