"""Two "machines" on localhost (two ``accelerate launch --num_machines 2 --machine_rank R`` commands, one process
each, gloo on CPU) train to the same adapter as one process, evaluate after training together, and resume from a
run directory they share."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO, assert_same_adapter, free_port, tiny_overrides, train_in_process, write_train_rows

# A constant schedule: the learning rate of a step does not depend on trainer.max_steps, so a run stopped after 2
# steps and resumed to 3 (a length change a resume allows) takes the same steps as a run of 3.
SCHEDULE = ["optimizer.scheduler=constant", "optimizer.warmup_ratio=0.0"]


def accelerate_launcher() -> str:
    import shutil

    found = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")
    if found is None:
        pytest.skip("the accelerate launcher is not installed")
    return found


def two_machines(args: list[str], cwd: Path, timeout: float = 300) -> None:
    """The same command as machine 0 and machine 1 of a 2-machine launch (rendezvous on 127.0.0.1)."""
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    commands = [[accelerate_launcher(), "launch", "--multi_gpu", "--num_machines", "2", "--machine_rank", str(rank),
                 "--main_process_ip", "127.0.0.1", "--main_process_port", str(port), "--num_processes", "2",
                 "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "neuroada_cli", *args]
                for rank in (0, 1)]
    machines = [subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                for command in commands]
    outputs = []
    try:
        for machine in machines:
            outputs.append(machine.communicate(timeout=timeout)[0])
    finally:
        for machine in machines:
            if machine.poll() is None:
                machine.kill()
    for rank, (machine, output) in enumerate(zip(machines, outputs)):
        assert machine.returncode == 0, f"machine {rank} failed:\n{output[-4000:]}"


@pytest.fixture
def base(tiny_llama_dir, tmp_path) -> list[str]:
    data_dir = write_train_rows(tmp_path / "data")
    write_train_rows(data_dir, n=5, seed=3, stem="boolq")  # an eval test file: llm_adapters/boolq/test.json
    (data_dir / "llm_adapters" / "boolq" / "train.json").rename(data_dir / "llm_adapters" / "boolq" / "test.json")
    return [o for o in tiny_overrides(tiny_llama_dir, data_dir, tmp_path / "unused", steps=3)
            if not o.startswith("trainer.output_dir")] + SCHEDULE


def test_two_machines_train_like_one_process(base, tmp_path):
    """... and evaluate after training together (eval.after_train: each machine predicts its share)."""
    one, two = tmp_path / "one", tmp_path / "two"
    after = ["eval.after_train=true", "eval.tasks=[boolq]", "eval.max_new_tokens=4"]
    train_in_process([*base, *after, f"trainer.output_dir={one}"])
    two_machines(["train", *base, *after, f"trainer.output_dir={two}"], cwd=tmp_path)
    record = json.loads((two / "run.json").read_text())
    assert record["world_size"] == 2 and record["accumulation_steps"] == 2
    assert_same_adapter(one, two)
    losses = [[json.loads(line)["loss"] for line in (run / "train_log.jsonl").read_text().splitlines()]
              for run in (one, two)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)
    results = [json.loads((run / "eval" / "results.json").read_text()) for run in (one, two)]
    assert (results[0]["processes"], results[1]["processes"]) == (1, 2)
    assert results[1]["tasks"]["boolq"]["n"] == results[0]["tasks"]["boolq"]["n"] == 5


@pytest.mark.slow
def test_two_machines_resume_from_the_shared_run_directory(base, tmp_path):
    """Machines stop after 2 steps (checkpoint at 2), then both resume from the shared directory to 3 steps."""
    one, two = tmp_path / "one", tmp_path / "two"
    train_in_process([*base, f"trainer.output_dir={one}"])
    first = [o for o in base if not o.startswith("trainer.max_steps")] + ["trainer.max_steps=2",
                                                                          "trainer.checkpoint_every=2"]
    two_machines(["train", *first, f"trainer.output_dir={two}"], cwd=tmp_path)
    assert json.loads((two / "run.json").read_text())["steps"] == 2
    two_machines(["train", *base, "trainer.checkpoint_every=2", "trainer.resume=true", f"trainer.output_dir={two}"],
                 cwd=tmp_path)
    record = json.loads((two / "run.json").read_text())
    assert (record["steps"], record["resumed_from_step"], record["world_size"]) == (3, 2, 2)
    assert_same_adapter(one, two)
