"""GLUE through the CLI on fixture files: train + eval for a classification and a regression task, eval of
a base model and of a run, a sweep summary, and one-line errors (subprocess) for bad inputs."""
from __future__ import annotations

import json

import pytest

from helpers import cli, glue_rows, write_glue_task, write_jsonl
from neuroada_cli.cli import main


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("glue-data")
    for task in ("rte", "stsb"):
        write_glue_task(root, task, train=48, validation=24)
    return root


def tiny_overrides(bert_dir, data_dir, out) -> list[str]:
    return [f"model.name_or_path={bert_dir}", f"data.dir={data_dir}", f"trainer.output_dir={out}",
            "neuroada.k=4", "trainer.epochs=2", "trainer.batch_size=16", "trainer.micro_batch_size=8",
            "data.train_limit=null", "data.max_length=32", "eval.batch_size=8", "trainer.log_every=1"]


@pytest.mark.parametrize("task, metric", [("rte", "accuracy"), ("stsb", "pearson")])
def test_train_and_eval_end_to_end(task, metric, bert_dir, data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "recipe=minilm_glue", f"task=glue/{task}", *tiny_overrides(bert_dir, data_dir, run)]) == 0
    shown = capsys.readouterr().out
    assert "bypass" in shown and "head" in shown  # the trainable split is on screen

    for name in ("config.yaml", "train_log.jsonl", "run.json", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors", "eval/results.json", f"eval/predictions/glue/{task}.jsonl"):
        assert (run / name).is_file(), name
    record = json.loads((run / "run.json").read_text())
    assert record["bypass_params"] > 0 and record["head_params"] > 0
    assert record["trainable_params"] == record["bypass_params"] + record["head_params"] + record["bias_params"]
    assert record["validation"]["metric"] == metric  # the best epoch on the selection part (adapter/ holds it)
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log if "validation" in entry] == [3, 6]  # after each of the 2 epochs
    results = json.loads((run / "eval/results.json").read_text())
    entry = results["tasks"][f"glue/{task}"]
    assert entry["metric"] == metric and entry["n"] == 12 and entry["done"]  # report part: 24 - 24 // 2
    predictions = (run / f"eval/predictions/glue/{task}.jsonl").read_text().splitlines()
    assert len(predictions) == 12

    # neuroada eval run=DIR reloads base + adapter (+ head) and reproduces the in-memory score
    (run / "eval").rename(run / "eval_after_train")
    assert main(["eval", f"run={run}"]) == 0
    again = json.loads((run / "eval/results.json").read_text())["tasks"][f"glue/{task}"]
    assert again["value"] == pytest.approx(entry["value"], abs=1e-6)


def test_eval_of_the_base_model_and_a_sweep_summary(bert_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "base"
    assert main(["eval", "recipe=minilm_glue", "task=glue/rte", f"model.name_or_path={bert_dir}",
                 f"data.dir={data_dir}", f"eval.output_dir={out}"]) == 0
    assert json.loads((out / "results.json").read_text())["tasks"]["glue/rte"]["n"] == 12

    sweep = tmp_path / "sweep"
    overrides = [o for o in tiny_overrides(bert_dir, data_dir, sweep) if not o.startswith("trainer.epochs")]
    capsys.readouterr()
    assert main(["train", "-m", "recipe=minilm_glue", "task=glue/rte,glue/stsb", "trainer.epochs=1", *overrides]) == 0
    shown = capsys.readouterr().out
    assert "sweep summary" in shown and "glue/rte" in shown and "glue/stsb" in shown
    assert (sweep / "0/eval/results.json").is_file() and (sweep / "1/eval/results.json").is_file()


def test_bad_inputs_give_one_line_errors(bert_dir, tmp_path):
    bad_label = tmp_path / "bad_label"
    write_jsonl(bad_label / "glue/rte/train.jsonl", glue_rows("rte", 4)[:3] + [
        {"sentence1": "a man .", "sentence2": "a dog .", "label": 5, "idx": 3}])
    write_jsonl(bad_label / "glue/rte/validation.jsonl", glue_rows("rte", 4))
    no_validation = tmp_path / "no_validation"
    write_jsonl(no_validation / "glue/rte/train.jsonl", glue_rows("rte", 8))
    base = ["train", "recipe=minilm_glue", f"model.name_or_path={bert_dir}", f"trainer.output_dir={tmp_path / 'out'}"]
    cases = [
        ([*base, "task=glue/nope"], "glue/nope"),
        ([*base, "task=glue/rte", f"data.dir={no_validation}"], "validation"),
        ([*base, "task=glue/rte", f"data.dir={bad_label}"], "label 5"),
        (["eval", "recipe=minilm_glue", "task=glue/rte", "eval.tasks=[glue/wnli]"], "glue/wnli"),
    ]
    for args, needle in cases:
        result = cli(*args, cwd=tmp_path, check=False, timeout=120)
        assert result.returncode == 2, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], (args, result.stderr)
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_lora_baseline_trains_the_same_head_as_neuroada(bert_dir, data_dir, tmp_path):
    """minilm_glue's LoRA baseline trains classifier AND pooler fully, like the NeuroAda recipe."""
    from safetensors.torch import load_file

    run = tmp_path / "lora"
    overrides = [o for o in tiny_overrides(bert_dir, data_dir, run) if not o.startswith("trainer.epochs")]
    assert main(["train", "recipe=minilm_glue", "task=glue/rte", "method=lora", "trainer.epochs=1", *overrides]) == 0
    keys = load_file(str(run / "adapter" / "adapter_model.safetensors")).keys()
    assert any("pooler" in key for key in keys) and any("classifier" in key for key in keys)
    assert any("lora_A" in key for key in keys)
