"""Two processes (accelerate launch, gloo on CPU) give the same training as one process accumulating."""
from __future__ import annotations

import json

import pytest

from helpers import accelerate_launch, assert_same_adapter, cli, tiny_overrides, write_train_rows


def test_two_processes_equal_one_process(tiny_llama_dir, tmp_path):
    data_dir = write_train_rows(tmp_path / "data")
    overrides = [o for o in tiny_overrides(tiny_llama_dir, data_dir, tmp_path / "unused", steps=3)
                 if not o.startswith("trainer.output_dir")]
    one = tmp_path / "one"
    cli("train", *overrides, f"trainer.output_dir={one}")
    # The default output_dir holds a timestamp that each process resolves for itself: they must agree.
    (tmp_path / "two").mkdir()
    accelerate_launch("train", *overrides, cwd=tmp_path / "two")  # default: outputs/default/<timestamp>
    runs = list((tmp_path / "two" / "outputs" / "default").iterdir())
    assert len(runs) == 1, runs
    two = runs[0]

    record = json.loads((two / "run.json").read_text())
    assert record["world_size"] == 2 and record["accumulation_steps"] == 2
    assert_same_adapter(one, two)
    losses = [[json.loads(line)["loss"] for line in (run / "train_log.jsonl").read_text().splitlines()]
              for run in (one, two)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)


def test_validation_runs_on_process_zero_and_every_process_agrees(tiny_llama_dir, tmp_path):
    """Validation every step with 2 processes: the same evaluations and kept step as 1 process; the validation
    state reaches process 1 (a broadcast), so both stop together and the launch exits cleanly."""
    data_dir = write_train_rows(tmp_path / "data")
    overrides = [o for o in tiny_overrides(tiny_llama_dir, data_dir, tmp_path / "unused", steps=3)
                 if not o.startswith("trainer.output_dir")]
    overrides += ["data.val_fraction=0.25", "trainer.eval_every=1", "trainer.early_stopping_patience=5"]
    one, two = tmp_path / "one", tmp_path / "two"
    cli("train", *overrides, f"trainer.output_dir={one}")
    accelerate_launch("train", *overrides, f"trainer.output_dir={two}", cwd=tmp_path)
    records = [json.loads((run / "run.json").read_text())["validation"] for run in (one, two)]
    assert records[0]["evaluations"] == records[1]["evaluations"] == 3
    assert records[0]["step"] == records[1]["step"]
    assert records[0]["value"] == pytest.approx(records[1]["value"], rel=1e-4)
    for run in (one, two):
        assert (run / "adapter_last" / "adapter_model.safetensors").is_file()
