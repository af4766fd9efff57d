"""Validation in the training loop for every task kind: evaluations every trainer.eval_every steps and at
epoch ends, the best adapter kept as adapter/ (adapter_last/ = final), early stopping, and a resume that
keeps the best-so-far state and the patience counter."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from helpers import tiny_overrides, train_in_process, write_train_rows
from neuroada_cli.errors import UserError
from neuroada_cli.kinds.causal_lm import CausalLM
from neuroada_cli.training.validation import ValidationState


@pytest.fixture
def data_dir(tmp_path):
    return write_train_rows(tmp_path / "data")


def log_of(run) -> list[dict]:
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]


def weights(run, folder: str) -> dict:
    return load_file(str(run / folder / "adapter_model.safetensors"))


def scripted_validation(monkeypatch, losses: list[float]):
    """Causal LM with 4 held-out examples whose "loss" is read from ``losses`` (one per evaluation, in order);
    running past the script raises, which stands for a crash at that evaluation."""
    script = list(losses)
    monkeypatch.setattr(CausalLM, "validation_examples", lambda self, tokenizer: self.train_examples(tokenizer)[:4])

    def evaluate(self, model, examples, pad_id, batch_size):
        if not script:
            raise RuntimeError("crash")
        return {"loss": script.pop(0)}

    monkeypatch.setattr(CausalLM, "evaluate", evaluate)
    return script


# ------------------------------------------------------------------------------------------ the state
def test_state_is_due_at_intervals_and_epoch_ends_and_stops_after_patience():
    state = ValidationState("accuracy", True, eval_every=3, patience=2)
    assert [step for step in range(1, 10) if state.due(step, end_of_epoch=step == 8)] == [3, 6, 8, 9]
    assert not ValidationState("loss", False, None, None).due(5, end_of_epoch=False)
    assert state.record(3, {"accuracy": 0.5}) and state.record(6, {"accuracy": 0.6})
    assert not state.record(8, {"accuracy": 0.6}) and not state.stopped_early  # a tie is no improvement
    copy = ValidationState("accuracy", True, 3, 2)
    copy.restore(state.state())
    assert not copy.record(9, {"accuracy": 0.55}) and copy.stopped_early
    summary = copy.summary()
    assert (summary["step"], summary["value"], summary["evaluations"]) == (6, 0.6, 4)
    lower = ValidationState("loss", False, None, None)
    assert lower.record(1, {"loss": 2.0}) and lower.record(2, {"loss": 1.0}) and not lower.record(3, {"loss": 1.5})
    assert not lower.stopped_early  # patience None: never stops


# ------------------------------------------------------------------------------------------ the loop
def test_causal_lm_keeps_the_best_adapter_and_logs_every_evaluation(tiny_llama_dir, data_dir, tmp_path):
    """Real validation loss every 2 steps on a causal LM (data.val_fraction holds out a quarter of the rows):
    log lines, run.json, adapter/ and adapter_last/."""
    run = train_in_process(tiny_overrides(tiny_llama_dir, data_dir, tmp_path / "run", steps=3)
                           + ["trainer.eval_every=2", "data.val_fraction=0.25"])
    evaluations = [line for line in log_of(run) if "validation" in line]
    assert [line["step"] for line in evaluations] == [2, 3]  # every 2 steps and at the end
    assert all(line["validation"]["loss"] > 0 for line in evaluations)
    best = min(evaluations, key=lambda line: line["validation"]["loss"])
    record = json.loads((run / "run.json").read_text())["validation"]
    assert (record["metric"], record["higher_is_better"], record["step"]) == ("loss", False, best["step"])
    assert record["value"] == pytest.approx(best["validation"]["loss"]) and record["evaluations"] == 2
    assert (run / "adapter_last" / "adapter_model.safetensors").is_file()


def test_adapter_holds_the_best_evaluation_not_the_last(tiny_llama_dir, data_dir, tmp_path, monkeypatch):
    scripted_validation(monkeypatch, [0.5, 0.3, 0.4, 0.45])
    run = train_in_process(tiny_overrides(tiny_llama_dir, data_dir, tmp_path / "run", steps=4)
                           + ["trainer.eval_every=1"])
    record = json.loads((run / "run.json").read_text())
    assert record["validation"]["step"] == 2 and record["validation"]["value"] == 0.3
    best, last = weights(run, "adapter"), weights(run, "adapter_last")
    deltas = [name for name in best if name.endswith("delta")]
    assert deltas and any(not torch.equal(best[name], last[name]) for name in deltas)


def test_early_stopping_ends_the_run_after_patience_evaluations(tiny_llama_dir, data_dir, tmp_path, monkeypatch):
    """44 examples in batches of 8: epoch ends at step 5, so the evaluations are at steps 2, 4, 5 (stop)."""
    scripted_validation(monkeypatch, [0.5, 0.6, 0.7])
    run = train_in_process(tiny_overrides(tiny_llama_dir, data_dir, tmp_path / "run", steps=20)
                           + ["trainer.eval_every=2", "trainer.early_stopping_patience=2"])
    record = json.loads((run / "run.json").read_text())
    assert record["steps"] == 5 and record["planned_steps"] == 20 and record["steps_per_epoch"] == 5
    assert record["validation"]["stopped_early"] is True and record["validation"]["step"] == 2
    assert [line["step"] for line in log_of(run) if "validation" in line] == [2, 4, 5]
    assert [line["step"] for line in log_of(run) if "loss" in line][-1] == 5


def test_resume_keeps_the_best_so_far_and_the_patience_counter(tiny_llama_dir, data_dir, tmp_path, monkeypatch):
    """Evaluations at steps 2, 4, 5 (epoch end), 6. A crash at the step-5 evaluation, then resume from the
    step-4 checkpoint: the best (step 2), the patience count (1) and the weights continue as in the run that
    was never interrupted, which stops at step 6."""
    extra = ["trainer.eval_every=2", "trainer.early_stopping_patience=3", "trainer.checkpoint_every=2"]
    overrides = [o for o in tiny_overrides(tiny_llama_dir, data_dir, tmp_path, steps=12)
                 if not o.startswith(("trainer.output_dir", "trainer.checkpoint_every"))] + extra
    scripted_validation(monkeypatch, [0.3, 0.4, 0.5, 0.6])
    reference = train_in_process(overrides + [f"trainer.output_dir={tmp_path / 'reference'}"])
    expected = json.loads((reference / "run.json").read_text())
    assert expected["steps"] == 6 and expected["validation"]["stopped_early"]  # 3 evaluations without improvement

    interrupted = tmp_path / "interrupted"
    scripted_validation(monkeypatch, [0.3, 0.4])  # the third evaluation (step 5) crashes
    with pytest.raises(RuntimeError, match="crash"):
        train_in_process(overrides + [f"trainer.output_dir={interrupted}"])
    scripted_validation(monkeypatch, [0.5, 0.6])
    train_in_process(overrides + [f"trainer.output_dir={interrupted}", "trainer.resume=true"])
    resumed = json.loads((interrupted / "run.json").read_text())
    assert resumed["resumed_from_step"] == 4 and resumed["steps"] == 6
    assert resumed["validation"] == expected["validation"]  # best step 2, 4 evaluations, stopped early
    for folder in ("adapter", "adapter_last"):
        a, b = weights(reference, folder), weights(interrupted, folder)
        assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a), folder


def test_without_validation_examples_adapter_is_final_and_patience_is_refused(tiny_llama_dir, data_dir, tmp_path):
    run = train_in_process(tiny_overrides(tiny_llama_dir, data_dir, tmp_path / "run", steps=2))
    record = json.loads((run / "run.json").read_text())
    assert record["validation"] is None and not (run / "adapter_last").exists()
    assert not [line for line in log_of(run) if "validation" in line]
    assert record["package_version"] and "git_commit" in record
    with pytest.raises(UserError, match="early_stopping_patience"):
        train_in_process(tiny_overrides(tiny_llama_dir, data_dir, tmp_path / "run2", steps=2)
                         + ["trainer.early_stopping_patience=2"])


def test_glue_validation_can_be_switched_off(tmp_path, bert_dir):
    from helpers import write_glue_task

    data = write_glue_task(tmp_path / "data", "rte")
    run = train_in_process([
        "task=glue/rte", f"model.name_or_path={bert_dir}", "model.family=bert", f"data.dir={data}",
        f"trainer.output_dir={tmp_path / 'run'}", "trainer.max_steps=2", "trainer.batch_size=8",
        "trainer.micro_batch_size=8", "trainer.checkpoint_every=0", "neuroada.k=2", "trainer.validate=false",
        "neuroada.target_modules=[query,value]",
    ])
    assert json.loads((run / "run.json").read_text())["validation"] is None
    assert not [line for line in log_of(run) if "validation" in line] and not (run / "adapter_last").exists()
