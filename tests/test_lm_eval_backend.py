"""lm-evaluation-harness backend: a local task YAML on a tiny in-memory model, offline."""
from __future__ import annotations

import json

import pytest
from helpers import make_tokenizer, tiny_llama

from neuroada_cli.errors import UserError

pytest.importorskip("lm_eval")
from neuroada_cli.eval.lm_eval_backend import evaluate_lm_eval  # noqa: E402

ROWS = [
    {"question": "the quick brown fox jumps over the", "choices": ["lazy dog", "answer1"], "answer": 0},
    {"question": "3 + 4 =", "choices": ["7", "12"], "answer": 0},
    {"question": "The answer is", "choices": ["true", "false"], "answer": 1},
    {"question": "a man is playing a", "choices": ["guitar", "entailment"], "answer": 0},
]


def write_task(folder, name="neuroada_tiny_mc"):
    data = folder / "tiny.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return name


def test_local_task_yaml_runs_on_an_in_memory_model(tmp_path):
    task = write_task(tmp_path)
    results = evaluate_lm_eval(tiny_llama(seed=3), make_tokenizer(), [task], include_path=tmp_path,
                               include_defaults=False)
    assert set(results) == {task}
    assert results[task]["n"] == len(ROWS)
    correct = results[task]["acc"] * len(ROWS)
    assert 0 <= correct <= len(ROWS) and correct == round(correct)
    limited = evaluate_lm_eval(tiny_llama(seed=3), make_tokenizer(), [task], include_path=tmp_path, limit=2,
                               include_defaults=False)
    assert limited[task]["n"] == 2


def test_unknown_task_and_missing_include_path_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="include path"):
        evaluate_lm_eval(tiny_llama(), make_tokenizer(), ["x"], include_path=tmp_path / "nope")
    with pytest.raises(UserError, match=r"\['no_such_task_xyz'\] are unknown"):
        evaluate_lm_eval(tiny_llama(), make_tokenizer(), ["no_such_task_xyz"], include_path=tmp_path,
                         include_defaults=False)


def test_neuroada_eval_with_the_lm_eval_backend_writes_results_json(tmp_path, tiny_llama_dir):
    """`neuroada eval eval.backend=lm_eval`: the recipe's base model goes to lm-eval in memory and the scores land
    in the same results.json as the native suites."""
    from neuroada_cli.cli import main

    tasks_dir = tmp_path / "tasks"
    tasks_dir.mkdir()
    task = write_task(tasks_dir)
    out = tmp_path / "eval"
    code = main(["eval", "recipe=smollm2_commonsense", f"model.name_or_path={tiny_llama_dir}",
                 "eval.backend=lm_eval", f"eval.tasks=[{task}]", f"eval.lm_eval_include_path={tasks_dir}",
                 "eval.lm_eval_only_included=true", f"eval.output_dir={out}"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    entry = results["tasks"][task]
    assert results["backend"] == "lm_eval" and entry["done"] and entry["n"] == len(ROWS)
    assert entry["metric"] == "acc" and entry["value"] == entry["metrics"]["acc"]
    assert results["suites"]["lm_eval"]["average"] == entry["value"]


def test_lm_eval_backend_needs_task_names():
    from neuroada_cli.cli import main

    assert main(["eval", "recipe=smollm2_commonsense", "eval.backend=lm_eval"]) == 2
