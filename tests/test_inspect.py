"""`neuroada inspect`: plots and report.md from a run directory's files.

Most tests build a run directory by hand (a train log, an adapter saved with save_adapter on a tiny injected
Llama, eval predictions with known labels), so they check exact counts and do not depend on the trainer.
One test inspects a real tiny training run.
"""
from __future__ import annotations

import importlib.util
import json
import re
import sys

import numpy as np
import pytest
import torch
from helpers import build_arch, randomise_deltas, write_glue_task, write_jsonl

from neuroada_cli import NeuroAdaConfig, inject, neuroada_layers, save_adapter
from neuroada_cli.errors import UserError
from neuroada_cli.inspection.run import (
    confusion_counts,
    inspect_run,
    read_layer_stats,
    read_train_log,
    selection_histograms,
    split_layer_name,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
K = 3
needs_matplotlib = pytest.mark.skipif(
    importlib.util.find_spec("matplotlib") is None, reason="matplotlib (neuroada[plots]) not installed")

TRAIN_LOG = [
    {"step": 1, "epoch": 0.5, "loss": 2.5, "lr": 0.01},
    {"step": 2, "epoch": 1.0, "loss": 2.0, "lr": 0.01},
    {"step": 2, "selection": {"accuracy": 0.5, "loss": 1.9}},
    {"step": 3, "loss": 1.5},
    {"step": 4, "loss": 1.25, "val_loss": 1.4},  # a possible future layout: validation on the train line
    {"step": 4, "validation": {"f1": 0.75, "note": "text is skipped"}},
    {"event": "something else"},
]
RTE = [(0, 0), (0, 0), (0, 1), (1, 1), (1, 0), (1, 1), (1, 1)]  # (gold, predicted)


def _model_with_adapter():
    """A tiny Llama with NeuroAda on two projections; rows 0-4 of layer 0's q_proj keep a zero delta."""
    model, _ = build_arch("llama")
    inject(model, NeuroAdaConfig(k=K, target_modules=["q_proj", "down_proj"]))
    randomise_deltas(model)
    layers = neuroada_layers(model)
    with torch.no_grad():
        layers["model.layers.0.self_attn.q_proj"].delta[:5] = 0
    return model, layers


@pytest.fixture
def fake_run(tmp_path):
    run = tmp_path / "run"
    model, layers = _model_with_adapter()
    save_adapter(model, run / "adapter")
    write_jsonl(run / "train_log.jsonl", [*TRAIN_LOG, '{"step": 5, "loss": 1.'])  # torn last line
    (run / "run.json").write_text(json.dumps({
        "method": "neuroada", "model": "tiny-llama", "recipe": "test", "trainable_params": 1234,
        "total_params": 99999, "trainable_percent": 1.234, "steps": 4, "final_loss": 1.25, "wall_seconds": 3.5}))
    (run / "eval" / "results.json").parent.mkdir(parents=True)
    (run / "eval" / "results.json").write_text(json.dumps({"format": 1, "tasks": {
        "glue/rte": {"metric": "accuracy", "value": 5 / 7, "n": 7},
        "glue/stsb": {"metric": "pearson", "value": 0.5, "n": 2},
        "boolq": {"metric": "accuracy", "value": 0.5, "n": 2}}}))
    predictions = run / "eval" / "predictions"
    write_jsonl(predictions / "glue" / "rte.jsonl", [
        {"index": i, "extracted": p, "gold": g, "logits": [0.1, 0.2]} for i, (g, p) in enumerate(RTE)])
    write_jsonl(predictions / "glue" / "stsb.jsonl", [{"extracted": 3.2, "gold": 4.0}, {"extracted": 1.0, "gold": 0.5}])
    write_jsonl(predictions / "boolq.jsonl", [{"extracted": "true", "gold": "true"},
                                              {"extracted": "", "gold": "false"}])
    return run, layers


@needs_matplotlib
def test_inspect_writes_plots_and_a_report_linking_them(fake_run):
    run, layers = fake_run
    out = inspect_run(run)
    assert out == run / "inspect"
    pngs = sorted(path.name for path in out.glob("*.png"))
    assert pngs == ["confusion_glue_rte.png", "layers.png", "loss.png", "selection.png",
                    "selection_layers.png"]  # no stsb, no boolq
    for name in pngs:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 2000, name
    report = (out / "report.md").read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert sorted(links) == pngs
    for name in layers:
        assert f"`{name}`" in report
    assert "| neuroada |" in report and "1,234 of 99,999 (1.234 %)" in report
    assert "| glue/rte | accuracy | 7 | 0.7143 |" in report
    # 4 layers x 32 rows (q_proj: 32 out, down_proj: 32 out), 5 rows left at zero
    assert "Rows with cells: 128 of 128 (100.0%)" in report and "rows whose delta moved (any non-zero delta " \
           "after training): 123 (96.1%)" in report
    inspect_run(run)  # a second inspect replaces the folder
    assert sorted(path.name for path in out.glob("*.png")) == pngs


def test_histogram_counts_equal_selected_cells(fake_run):
    run, layers = fake_run
    stats = read_layer_stats(run / "adapter")
    assert [s.name for s in stats] == sorted(layers, key=lambda n: (int(n.split(".")[2]), n))
    for s in stats:
        idx = layers[s.name].neuroada_idx
        assert s.cells == idx.numel() == s.d_out * K and s.cells_per_row == (K, K)
        assert s.distinct_columns == len(torch.unique(idx))
        assert s.column_counts.tolist() == torch.bincount(idx.flatten()).tolist()
        expected_moved = s.d_out - (5 if s.name == "model.layers.0.self_attn.q_proj" else 0)
        assert s.rows_moved == expected_moved and s.rows_with_cells == s.d_out
        assert s.delta_norm == pytest.approx(layers[s.name].delta.norm().item(), rel=1e-5)
        top = s.top_inputs(3)
        assert top[0][1] == pytest.approx(s.column_counts.max() / s.cells)
    histograms = selection_histograms(stats)
    assert set(histograms) == {"self_attn.q_proj", "mlp.down_proj"}
    for group, counts in histograms.items():
        assert counts.sum() == sum(s.cells for s in stats if s.group == group) == 2 * 32 * K


def test_legacy_key_layout_and_ragged_rows_are_read(tmp_path):
    from safetensors.torch import save_file

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    indices = torch.tensor([[0, 5], [5, -1], [-1, -1]], dtype=torch.int16)  # row 2 has no cell
    delta = torch.tensor([[0.5, 0.0], [0.0, 0.0], [0.0, 0.0]])
    save_file({"encoder.layer.1.attention.self.query.delta": delta,
               "encoder.layer.1.attention.self.query.indices": indices,
               "modules_to_save.classifier.weight": torch.ones(2, 2)}, str(adapter / "adapter_model.safetensors"))
    [stats] = read_layer_stats(adapter)
    assert (stats.name, stats.group, stats.number) == ("encoder.layer.1.attention.self.query",
                                                       "attention.self.query", 1)
    assert stats.cells == 3 and stats.cells_per_row == (0, 2) and stats.rows_with_cells == 2 and stats.rows_moved == 1
    assert stats.column_counts.tolist() == [1, 0, 0, 0, 0, 2] and stats.distinct_columns == 2
    assert split_layer_name("lm_head") == (None, "lm_head")


def test_confusion_counts_match_the_predictions():
    records = [{"extracted": p, "gold": g} for g, p in RTE] + [{"extracted": None, "gold": 2}]
    matrix = confusion_counts(records)
    assert matrix.tolist() == [[2, 1, 0], [1, 3, 0], [0, 0, 0]]  # the unanswered row counts nowhere
    assert matrix.sum() == len(RTE)
    assert confusion_counts([{"extracted": 3.2, "gold": 4.0}]) is None  # regression (stsb)
    assert confusion_counts([{"extracted": "true", "gold": "true"}]) is None  # causal LM
    assert confusion_counts([{"extracted": True, "gold": False}]) is None
    assert confusion_counts([]) is None


def test_train_log_keeps_train_loss_and_every_validation_form(tmp_path):
    log = write_jsonl(tmp_path / "train_log.jsonl", [*TRAIN_LOG, "not json", '{"step": 9, "lo'])
    train, validation = read_train_log(log)
    assert train == [(1, 2.5), (2, 2.0), (3, 1.5), (4, 1.25)]  # selection's nested loss is not a train loss
    assert validation == {"accuracy": [(2, 0.5)], "loss": [(2, 1.9), (4, 1.4)], "f1": [(4, 0.75)]}


@pytest.mark.parametrize("remove, message", [
    (None, "not found"), ("train_log.jsonl", "has no train_log.jsonl"), ("adapter", "has no adapter/")])
def test_missing_run_files_give_one_line_errors(fake_run, tmp_path, remove, message):
    import shutil

    run, _ = fake_run
    if remove is None:
        run = tmp_path / "nowhere"
    elif remove == "adapter":
        shutil.rmtree(run / remove)
    else:
        (run / remove).unlink()
    with pytest.raises(UserError, match=message) as error:
        inspect_run(run)
    assert str(run) in str(error.value) and "\n" not in str(error.value)


@needs_matplotlib
def test_lora_run_gets_no_selection_plots_and_output_elsewhere(tmp_path):
    run = tmp_path / "lora-run"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    write_jsonl(run / "train_log.jsonl", TRAIN_LOG[:2])
    out = inspect_run(run, output=tmp_path / "pages" / "lora")
    assert sorted(p.name for p in out.iterdir()) == ["loss.png", "report.md"]
    report = (out / "report.md").read_text()
    assert "This lora run's adapter holds no NeuroAda layers" in report and "Not evaluated yet" in report
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not an inspect folder"):
        inspect_run(run, output=foreign)
    assert (foreign / "keep.txt").read_text() == "mine"


def test_missing_matplotlib_is_a_user_error(fake_run, monkeypatch):
    run, _ = fake_run
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)  # import now fails
    with pytest.raises(UserError, match=r"pip install 'neuroada\[plots\]'"):
        inspect_run(run)
    assert not (run / "inspect").exists()


@needs_matplotlib
def test_inspect_a_real_tiny_glue_run(tmp_path, bert_dir):
    from neuroada_cli.cli import main

    data, run = write_glue_task(tmp_path / "data", "rte", train=32, validation=16), tmp_path / "run"
    assert main(["train", "recipe=minilm_glue", "task=glue/rte", f"model.name_or_path={bert_dir}", f"data.dir={data}",
                 f"trainer.output_dir={run}", "neuroada.k=4", "trainer.epochs=2", "trainer.batch_size=16",
                 "trainer.micro_batch_size=8", "data.max_length=32", "eval.batch_size=8"]) == 0
    out = inspect_run(run)
    report = (out / "report.md").read_text()
    stats = read_layer_stats(run / "adapter")
    assert len(stats) == 12 and all(f"`{s.name}`" in report for s in stats)  # 2 layers x 6 linears
    assert all(s.rows_with_cells == s.d_out and s.cells_per_row == (4, 4) for s in stats)
    for name in ("loss.png", "selection.png", "selection_layers.png", "layers.png", "confusion_glue_rte.png"):
        assert (out / name).read_bytes().startswith(PNG_MAGIC)
    records = [json.loads(line) for line in (run / "eval/predictions/glue/rte.jsonl").read_text().splitlines()]
    matrix = confusion_counts(records)
    assert matrix.sum() == len(records) and np.trace(matrix) == sum(r["gold"] == r["extracted"] for r in records)
    train, validation = read_train_log(run / "train_log.jsonl")
    assert train and "accuracy" in validation and "kept epoch (validation) | accuracy" in report
