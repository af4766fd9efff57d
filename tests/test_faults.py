"""The fault matrix (issue 15): divergence, write errors, damaged files, unsafe resumes, interrupts.

Every case runs the CLI in-process and asserts the exit code, exactly one stderr line starting "error:" (no
traceback), and that the files that were there before are unchanged (a hash of the run directory). One tiny
run (4 steps, checkpoints at 2 and 4) is trained once per module and copied into each test that needs it.
"""
from __future__ import annotations

import errno
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from helpers import FAULT_STEPS as STEPS
from helpers import fail_final_rename, fails, no_temporaries, overrides, tree_hash, truncate
from neuroada_cli.cli import main

# The fixtures `setup` (one finished tiny run per module) and `run` (a private copy of it) live in conftest.py.
pytestmark = pytest.mark.usefixtures("fresh_log_handler")


# ------------------------------------------------------------------------------------------ helpers
def nan_loss_at(monkeypatch, steps: set[int]) -> None:
    """The kind's loss becomes NaN during the optimizer steps in ``steps`` (1-based)."""
    from neuroada_cli.training.recipe import TrainingRecipe

    original = TrainingRecipe.step

    def step(self, index):
        if index + 1 in steps:
            kind_loss = self.kind.loss_sum
            self.kind.loss_sum = lambda model, batch: kind_loss(model, batch) * float("nan")
            try:
                return original(self, index)
            finally:
                del self.kind.loss_sum
        return original(self, index)

    monkeypatch.setattr(TrainingRecipe, "step", step)


def finite_adapter(folder: Path) -> bool:
    from safetensors.torch import load_file

    return all(torch.isfinite(t.float()).all() for t in load_file(str(folder / "adapter_model.safetensors")).values())


# --------------------------------------------------------------------------------- config values
@pytest.mark.parametrize("override, named", [
    ("optimizer.lr=inf", "optimizer.lr=inf"), ("optimizer.lr=nan", "optimizer.lr=nan"),
    ("optimizer.betas=[0.9,nan]", "optimizer.betas[1]"), ("optimizer.eps=-inf", "optimizer.eps"),
    ("lora.dropout=nan", "lora.dropout"), ("trainer.resume=maybe", "trainer.resume"),
    ("trainer.nonfinite=ignore", "trainer.nonfinite"), ("trainer.nonfinite_patience=0", "nonfinite_patience"),
])
def test_non_finite_or_bad_options_are_one_line_errors(capsys, override, named):
    assert named in fails(capsys, ["validate", "recipe=smollm2_commonsense", override])


# ----------------------------------------------------------------------------------- divergence
def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(setup, tmp_path, capsys, monkeypatch):
    nan_loss_at(monkeypatch, {3})
    out = tmp_path / "diverged"
    line = fails(capsys, ["train", *overrides(setup, out)])
    assert "step 3" in line and "loss is nan" in line and "optimizer.lr" in line
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-2"]
    assert finite_adapter(out / "checkpoints" / "step-2" / "adapter")
    assert not (out / "adapter").exists() and not (out / "run.json").exists()
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]  # valid JSON
    assert [entry["step"] for entry in log] == [1, 2]


def test_nan_gradient_norm_stops_the_run(setup, tmp_path, capsys, monkeypatch):
    import neuroada_cli.training.recipe as train_module

    monkeypatch.setattr(train_module, "gradient_norm", lambda parameters: torch.tensor(float("inf")))
    line = fails(capsys, ["train", *overrides(setup, tmp_path / "out")])
    assert "step 1" in line and "gradient norm is inf" in line


def test_skip_drops_one_bad_step_and_logs_valid_json(setup, tmp_path, capsys, monkeypatch):
    nan_loss_at(monkeypatch, {2})
    out = tmp_path / "skipped"
    assert main(["train", *overrides(setup, out), "trainer.nonfinite=skip"]) == 0
    record = json.loads((out / "run.json").read_text())
    assert record["nonfinite_steps_skipped"] == 1 and record["steps"] == STEPS
    text = (out / "train_log.jsonl").read_text()
    assert "NaN" not in text
    log = [json.loads(line) for line in text.splitlines()]
    assert log[1]["step"] == 2 and log[1]["loss"] is None and all(math.isfinite(e["loss"]) for e in log[2:])
    assert finite_adapter(out / "adapter")


def test_skip_stops_after_patience_steps_in_a_row(setup, tmp_path, capsys, monkeypatch):
    nan_loss_at(monkeypatch, {2, 3, 4})
    out = tmp_path / "skipped"
    line = fails(capsys, ["train", *overrides(setup, out), "trainer.nonfinite=skip", "trainer.nonfinite_patience=2"])
    assert "step 3" in line and "2 non-finite steps in a row" in line
    assert finite_adapter(out / "checkpoints" / "step-2" / "adapter") and not (out / "adapter").exists()


# --------------------------------------------------------------------------------------- resume
@pytest.mark.parametrize("change, shown", [
    ("neuroada.k=2", "neuroada.k 4 -> 2"), ("method=lora", "method neuroada -> lora"),
    ("optimizer.lr=0.5", "optimizer.lr 0.01 -> 0.5"), ("trainer.seed=7", "trainer.seed 42 -> 7"),
    ("data.max_length=48", "data.max_length 64 -> 48"), ("trainer.batch_size=4", "trainer.batch_size 8 -> 4"),
])
def test_resume_refuses_a_change_of_what_is_trained(setup, run, capsys, change, shown):
    before = tree_hash(run)
    line = fails(capsys, ["train", *overrides(setup, run), "trainer.resume=true", change])
    assert f"resume changes {shown}" in line and "another trainer.output_dir" in line
    assert tree_hash(run) == before


def test_resume_allows_and_records_a_longer_run(setup, run, capsys):
    assert main(["train", *overrides(setup, run, steps=6), "trainer.resume=auto", "trainer.log_every=2"]) == 0
    record = json.loads((run / "run.json").read_text())
    assert record["resumed_from_step"] == 4 and record["steps"] == 6
    assert "trainer.max_steps: 4 -> 6" in record["resume_changes"]
    assert "trainer.log_every: 1 -> 2" in record["resume_changes"]


def test_resume_true_without_a_checkpoint_says_so(setup, tmp_path, capsys):
    empty = tmp_path / "empty"
    line = fails(capsys, ["train", *overrides(setup, empty), "trainer.resume=true"])
    assert "holds no checkpoint" in line and not empty.exists()


def test_resume_auto_starts_fresh_when_there_is_no_checkpoint(setup, tmp_path, capsys):
    out = tmp_path / "fresh"
    assert main(["train", *overrides(setup, out), "trainer.resume=auto"]) == 0
    assert json.loads((out / "run.json").read_text())["resumed_from_step"] is None


def test_resume_auto_refuses_a_run_without_checkpoints(setup, run, capsys):
    shutil.rmtree(run / "checkpoints")
    before = tree_hash(run)
    assert "already holds a run but no checkpoint" in fails(capsys, ["train", *overrides(setup, run),
                                                                     "trainer.resume=auto"])
    assert tree_hash(run) == before


@pytest.mark.parametrize("damage, named", [
    (lambda run: (run / "checkpoints/step-4/trainer_state.pt").write_bytes(b"garbage"), "trainer_state.pt"),
    (lambda run: (run / "config.yaml").write_text("trainer: [unclosed\n  method: {"), "config.yaml"),
    (lambda run: truncate(run / "checkpoints/step-4/adapter/adapter_model.safetensors"), "adapter_model.safetensors"),
])
def test_resume_from_damaged_files_names_them(setup, run, capsys, damage, named):
    damage(run)
    before = tree_hash(run)
    line = fails(capsys, ["train", *overrides(setup, run, steps=6), "trainer.resume=true"])
    assert named in line and "damaged" in line
    assert tree_hash(run) == before


# ---------------------------------------------------------------------------------- write faults
def _raise_enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_failed_checkpoint_write_keeps_the_previous_one(setup, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    real_save = torch.save

    def save(obj, path, *args, **kwargs):
        if "step-4" in str(Path(path).parent.name) or ".step-4." in str(path):
            raise OSError(errno.EFBIG, "File too large")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    line = fails(capsys, ["train", *overrides(setup, out)])
    assert f"cannot write {out / 'checkpoints' / 'step-4'}: File too large (EFBIG)" in line
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-2"]
    assert finite_adapter(out / "checkpoints" / "step-2" / "adapter")
    no_temporaries(out)


def test_failed_adapter_write_leaves_no_trace(setup, tmp_path, capsys, monkeypatch):
    import neuroada_cli.core.adapter as adapter_module

    monkeypatch.setattr(adapter_module, "save_file", _raise_enospc)
    out = tmp_path / "out"
    line = fails(capsys, ["train", *overrides(setup, out, checkpoint_every=0)])
    assert f"cannot write {out / 'adapter'}: No space left on device (ENOSPC)" in line
    assert not (out / "adapter").exists() and not (out / "run.json").exists()
    no_temporaries(out)


def test_failed_run_record_write_names_run_json(setup, tmp_path, capsys, monkeypatch):
    fail_final_rename(monkeypatch, "run.json", errno.EROFS)
    out = tmp_path / "out"
    line = fails(capsys, ["train", *overrides(setup, out, checkpoint_every=0)])
    assert f"cannot write {out / 'run.json'}: Read-only file system (EROFS)" in line
    assert not (out / "run.json").exists()
    no_temporaries(out)


def _forbid_model_load(monkeypatch):
    import neuroada_cli.models as models

    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before the output path was checked")

    monkeypatch.setattr(models, "load_model_and_tokenizer", load)


@pytest.mark.parametrize("where", ["file", "under_file"])
def test_train_output_dir_that_is_a_file_fails_before_the_model_loads(setup, tmp_path, capsys, monkeypatch, where):
    _forbid_model_load(monkeypatch)
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    out = blocker if where == "file" else blocker / "run"
    line = fails(capsys, ["train", *overrides(setup, out)])
    assert "trainer.output_dir" in line and "is a file" in line
    assert blocker.read_text() == "not a folder"


def test_eval_output_dir_that_is_a_file_fails_before_the_model_loads(run, tmp_path, capsys, monkeypatch):
    _forbid_model_load(monkeypatch)
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    before = tree_hash(run)
    line = fails(capsys, ["eval", f"run={run}", f"eval.output_dir={blocker}", "eval.tasks=[boolq]"])
    assert "eval.output_dir" in line and "is a file" in line
    assert tree_hash(run) == before


def test_export_output_that_is_a_file_fails_before_the_model_loads(run, tmp_path, capsys, monkeypatch):
    _forbid_model_load(monkeypatch)
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    line = fails(capsys, ["export", f"run={run}", f"output={blocker / 'merged'}"])
    assert "output" in line and "is a file" in line


def test_failed_export_write_leaves_no_trace(run, tmp_path, capsys, monkeypatch):
    from transformers import PreTrainedModel

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", _raise_enospc)
    before = tree_hash(run)
    target = tmp_path / "merged"
    line = fails(capsys, ["export", f"run={run}", f"output={target}"])
    assert f"cannot write {target}: No space left on device (ENOSPC)" in line
    assert not target.exists() and tree_hash(run) == before
    no_temporaries(tmp_path)


def test_failed_inspect_write_leaves_no_trace(run, tmp_path, capsys, monkeypatch):
    import neuroada_cli.atomic as atomic

    monkeypatch.setattr(atomic.os, "rename", _raise_enospc)
    before = tree_hash(run)
    target = tmp_path / "report"
    line = fails(capsys, ["inspect", f"run={run}", f"output={target}"])
    assert f"cannot write {target}" in line and "ENOSPC" in line
    assert not target.exists() and tree_hash(run) == before


NAN_ON_RANK_ONE = """
import os, sys
import neuroada_cli.kinds.causal_lm as causal_lm
from neuroada_cli.cli import main

real, calls = causal_lm.CausalLM.loss_sum, []
ACCUMULATION = 2  # micro-batches per optimizer step and process

def loss_sum(self, model, batch):  # process 1 alone sees a NaN loss in optimizer step 2
    calls.append(1)
    value = real(self, model, batch)
    step = (len(calls) - 1) // ACCUMULATION + 1
    return value * float("nan") if os.environ.get("RANK") == "1" and step == 2 else value

causal_lm.CausalLM.loss_sum = loss_sum
sys.exit(main(sys.argv[1:]))
"""


def test_nan_on_one_process_stops_every_process(setup, tmp_path):
    import os
    import subprocess
    import sys

    from helpers import REPO
    from helpers import free_port

    launcher = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")
    if launcher is None:
        pytest.skip("the accelerate launcher is not installed")
    script = tmp_path / "nan_on_rank_one.py"
    script.write_text(NAN_ON_RANK_ONE)
    out = tmp_path / "out"
    command = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
               "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), str(script), "train",
               *overrides(setup, out)]  # batch 8 = micro 2 x 2 processes x 2 accumulation
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode != 0
    # Both processes stop at the same step (their stderr lines may interleave): process 1 saw the NaN.
    assert result.stderr.count("error: step 2: the loss is") == 2, result.stderr[-3000:]
    assert "error: step 2: the loss is nan" in result.stderr
    assert not (out / "checkpoints").exists() and not (out / "adapter").exists()
