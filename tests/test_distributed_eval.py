"""Evaluation shared by the processes of an ``accelerate launch`` (gloo on CPU): generation, log-likelihood and GLUE
classification give predictions and results identical to one process, one results.json records the process
count, only process 0 writes, and a re-run skips the finished tasks. Also the device placement of eval."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import REPO, free_port, make_tokenizer, tiny_llama, write_glue_task

TASK_FILES = {"boolq": "boolq", "multiarith": "MultiArith"}


def write_eval_data(root: Path) -> Path:
    """7 BoolQ questions (shares of 4 and 3 over two processes) and 5 arithmetic questions."""
    words = ["sky blue", "fire cold", "a dog a cat", "the fox quick", "ice warm", "the lazy dog", "answer true"]
    boolq = [{"instruction": f"Please answer the following question with true or false, question: is {w}?\n\n"
                             "Answer format: true/false", "input": "", "output": "", "answer": a}
             for w, a in zip(words, ["true", "false", "false", "true", "false", "true", "false"])]
    math = [{"instruction": f"Sam had {n} apples and got 4 more. How many now?", "input": "", "output": "",
             "answer": str(n + 4)} for n in range(5)]
    for folder, rows in (("boolq", boolq), ("MultiArith", math)):
        (root / "llm_adapters" / folder).mkdir(parents=True, exist_ok=True)
        (root / "llm_adapters" / folder / "test.json").write_text(json.dumps(rows))
    write_glue_task(root, "rte", train=8, validation=24)
    return root


@pytest.fixture(scope="module")
def setup(tmp_path_factory, bert_dir) -> dict:
    root = tmp_path_factory.mktemp("sharded-eval")
    llama = root / "llama"
    tiny_llama(seed=1).save_pretrained(llama)
    make_tokenizer().save_pretrained(llama)
    return {"root": root, "llama": llama, "bert": bert_dir, "data": write_eval_data(root / "data")}


def commands(setup: dict, out: Path) -> list[list[str]]:
    """The three evaluations: generation, log-likelihood (tiny Llama) and GLUE classification (tiny BERT)."""
    llama = ["recipe=smollm2_commonsense", f"model.name_or_path={setup['llama']}", f"data.dir={setup['data']}",
             "eval.max_new_tokens=6", "eval.batch_size=2"]
    return [["eval", *llama, "eval.tasks=[boolq,multiarith]", f"eval.output_dir={out / 'generate'}"],
            ["eval", *llama, "eval.tasks=[boolq]", "eval.scoring=loglik", f"eval.output_dir={out / 'loglik'}"],
            ["eval", "recipe=minilm_glue", "task=glue/rte", f"model.name_or_path={setup['bert']}",
             f"data.dir={setup['data']}", "data.max_length=32", "eval.batch_size=4",
             f"eval.output_dir={out / 'glue'}"]]


# Runs CLI commands in one launch (each process calls the CLI's main, exactly as `-m neuroada_cli` does), so the
# three evaluations and the re-run pay for one start of the processes.
SCRIPT = """
import json, sys
from neuroada_cli.cli import main
for command in json.loads(sys.argv[1]):
    code = main(command)
    if code != 0:
        sys.exit(code)
"""


def launcher() -> str:
    found = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")
    if found is None:
        pytest.skip("the accelerate launcher is not installed")
    return found


def launch(arguments: list[str], cwd: Path, processes: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [launcher(), "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
               *arguments]
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def outputs(folder: Path) -> tuple[dict, dict[str, str]]:
    results = json.loads((folder / "results.json").read_text())
    predictions = {str(p.relative_to(folder)): p.read_text() for p in sorted((folder / "predictions").rglob("*.jsonl"))}
    return results, predictions


def same_records(a: str, b: str) -> bool:
    """Predictions files equal: every field exactly (order included), except the float scores and logits, which
    depend on the batch a row was padded in (fp32 rounding, like another eval.batch_size): within 1e-5."""
    rows_a, rows_b = [json.loads(line) for line in a.splitlines()], [json.loads(line) for line in b.splitlines()]
    assert len(rows_a) == len(rows_b)
    for x, y in zip(rows_a, rows_b):
        floats = [key for key in ("scores", "logits") if key in x]
        assert {k: v for k, v in x.items() if k not in floats} == {k: v for k, v in y.items() if k not in floats}
        for key in floats:
            values_x = list(x[key].values()) if isinstance(x[key], dict) else x[key]
            values_y = list(y[key].values()) if isinstance(y[key], dict) else y[key]
            assert values_y == pytest.approx(values_x, rel=1e-5, abs=1e-5)
    return True


def compare(one: Path, two: Path, expected: dict[str, list[str]]) -> None:
    for name, tasks in expected.items():
        (results_one, predictions_one), (results_two, predictions_two) = outputs(one / name), outputs(two / name)
        assert predictions_two.keys() == predictions_one.keys() and len(predictions_one) == len(tasks), name
        assert all(same_records(predictions_one[file], predictions_two[file]) for file in predictions_one)
        if name == "generate":  # greedy generations: the very same bytes
            assert predictions_two == predictions_one
        assert (results_one["processes"], results_two["processes"]) == (1, 2)
        for task in tasks:
            a, b = results_one["tasks"][task], results_two["tasks"][task]
            assert b["processes"] == 2 and b["n"] == a["n"] and b["metrics"] == a["metrics"], (name, task)
            assert b["settings"] == a["settings"]
        assert results_two["suites"] == results_one["suites"]
    assert not list(two.rglob("*.tmp*"))  # only process 0 wrote, atomically


def run_both(setup: dict, tmp_path: Path, chosen: list[list[str]], rerun: bool) -> tuple[Path, Path]:
    from neuroada_cli.cli import main

    one, two = tmp_path / "one", tmp_path / "two"
    for command in chosen(one):
        assert main(command) == 0
    script = tmp_path / "run_commands.py"
    script.write_text(SCRIPT)
    launch([str(script), json.dumps(chosen(two) + (chosen(two)[:1] if rerun else []))], cwd=tmp_path)
    return one, two


def test_two_processes_generate_like_one_and_a_rerun_skips(setup, tmp_path):
    """The CI test: greedy generation on 2 processes (7 examples: shares of 4 and 3), then the same command again."""
    one, two = run_both(setup, tmp_path, lambda out: commands(setup, out)[:1], rerun=True)
    compare(one, two, {"generate": ["boolq", "multiarith"]})
    generated = json.loads((two / "generate" / "results.json").read_text())["tasks"]
    assert generated["boolq"].get("resumed") and generated["multiarith"].get("resumed")  # the re-run skipped both


@pytest.mark.slow
def test_two_processes_score_loglik_and_glue_like_one(setup, tmp_path):
    one, two = run_both(setup, tmp_path, lambda out: commands(setup, out)[1:], rerun=False)
    compare(one, two, {"loglik": ["boolq"], "glue": ["glue/rte"]})


def test_eval_places_the_model_on_the_accelerator_device(setup, tmp_path, monkeypatch):
    """The model reaches the eval tasks on the launch's device (here the CPU) in its configured dtype."""
    from neuroada_cli import config
    from neuroada_cli.eval import runner
    from neuroada_cli.eval.processes import Processes

    seen = {}

    def spy(model, tokenizer, tasks, **options):
        seen["devices"] = {p.device for p in model.parameters()}
        seen["dtypes"] = {p.dtype for p in model.parameters()}
        seen["processes"] = options["processes"]
        return {}

    monkeypatch.setattr(runner, "evaluate", spy)
    monkeypatch.setattr(runner, "current_processes", lambda: Processes(device=torch.device("cpu")))
    cfg = config.validate(config.compose("smollm2_commonsense", [
        f"model.name_or_path={setup['llama']}", f"data.dir={setup['data']}", "eval.tasks=[boolq]",
        "model.dtype=bfloat16", f"eval.output_dir={tmp_path / 'out'}"]), world_size=1)
    runner.run_eval_from_config(cfg)
    assert seen["devices"] == {torch.device("cpu")} and seen["dtypes"] == {torch.bfloat16}
    assert seen["processes"].world == 1


def test_shares_are_strided_and_merge_restores_the_order():
    from neuroada_cli.eval.processes import Processes

    shares = [Processes(rank=r, world=3).share(8) for r in range(3)]
    assert shares == [[0, 3, 6], [1, 4, 7], [2, 5]]
    merged = Processes(world=3).merge(8, [[f"x{i}" for i in share] for share in shares])
    assert merged == [f"x{i}" for i in range(8)]
    with pytest.raises(RuntimeError):
        Processes(world=2).merge(3, [["a"], ["b"]])
    assert Processes(rank=0, world=4).share(2) == [0] and Processes(rank=3, world=4).share(2) == []
