"""Trackers through accelerate (trainer.report_to: TensorBoard and MLflow's file store read back), a missing
tracker package as a one-line error before the model loads, and the plain progress lines a batch job reads."""
from __future__ import annotations

import json
import re
import sys

import pytest

from helpers import cli, tiny_overrides, train_in_process, write_train_rows
from neuroada_cli.errors import UserError


@pytest.fixture
def data_dir(tmp_path):
    return write_train_rows(tmp_path / "data")


def logged_losses(run) -> list[float]:
    lines = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    return [line["loss"] for line in lines if "loss" in line]


def test_tensorboard_scalars_are_the_logged_losses(tiny_llama_dir, data_dir, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = train_in_process(tiny_overrides(tiny_llama_dir, data_dir, tmp_path / "run", steps=2)
                           + ["trainer.report_to=[tensorboard]"])
    board = run / "trackers" / "neuroada"  # <run>/trackers/<recipe, or neuroada without one>
    assert list(board.glob("events.out.tfevents.*")), list((run / "trackers").rglob("*"))
    scalars = EventAccumulator(str(board)).Reload()
    points = scalars.Scalars("train/loss")
    assert [p.step for p in points] == [1, 2]
    assert [p.value for p in points] == pytest.approx(logged_losses(run), rel=1e-6)
    assert "train/lr" in scalars.Tags()["scalars"]


def test_mlflow_file_store_holds_the_logged_losses(tiny_llama_dir, data_dir, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run = train_in_process(tiny_overrides(tiny_llama_dir, data_dir, tmp_path / "run", steps=2)
                           + ["trainer.report_to=[mlflow]"])
    store = run / "trackers" / "mlruns"
    assert store.is_dir()
    client = MlflowClient(tracking_uri=store.resolve().as_uri())
    experiments = client.search_experiments()
    runs = client.search_runs([e.experiment_id for e in experiments])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    history = client.get_metric_history(runs[0].info.run_id, "train/loss")
    assert [m.step for m in history] == [1, 2]
    assert [m.value for m in history] == pytest.approx(logged_losses(run), rel=1e-6)
    assert runs[0].data.params["trainer.max_steps"] == "2"  # the run's config as parameters


def test_a_missing_tracker_package_fails_before_the_model_loads(tiny_llama_dir, data_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import machinery: "not installed"
    with pytest.raises(UserError, match=r"pip install 'neuroada\[wandb\]'"):
        train_in_process(tiny_overrides(tiny_llama_dir, data_dir, tmp_path / "run", steps=1)
                         + ["trainer.report_to=[wandb]"])
    assert not (tmp_path / "run").exists()


def test_output_that_is_not_a_terminal_gets_one_plain_line_per_logging_interval(tiny_llama_dir, data_dir, tmp_path):
    overrides = [o for o in tiny_overrides(tiny_llama_dir, data_dir, tmp_path / "run", steps=4)]
    result = cli("train", *overrides, "trainer.log_every=2")  # stdout is a pipe here
    pattern = re.compile(r"^\S+ step (\d+)/4  loss (\d+\.\d{4})  lr \S+  \d+ tok/s  elapsed \d+:\d\d:\d\d  "
                         r"eta \d+:\d\d:\d\d$")
    lines = [match for match in map(pattern.match, result.stdout.splitlines()) if match]
    assert [int(m.group(1)) for m in lines] == [2, 4], result.stdout
    logged = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [float(m.group(2)) for m in lines] == pytest.approx([logged[0]["loss"], logged[1]["loss"]], abs=1e-4)
    assert "\x1b[" not in result.stdout  # no terminal control codes in a log file
