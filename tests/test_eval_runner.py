"""The eval runner end to end on a tiny Llama: outputs, resumability, task lookup and user errors."""
from __future__ import annotations

import gzip
import io
import json

import pytest
import torch
from rich.console import Console

from neuroada_cli.errors import UserError
from neuroada_cli.eval import evaluate, get_task, resolve_tasks, run_eval_from_config
from neuroada_cli.eval.arithmetic import ArithmeticTask
from neuroada_cli.eval.commonsense import CommonsenseTask
from neuroada_cli.eval.extract import commonsense_trigger, last_number, numbers_match

from helpers import tiny_llama

BOOLQ = [
    {"instruction": f"Please answer the following question with true or false, question: is {q}?\n\n"
                    "Answer format: true/false", "input": "", "output": f"the correct answer is {a}", "answer": a}
    for q, a in [("the sky blue", "true"), ("fire cold", "false"), ("a dog a cat", "false"),
                 ("the fox quick", "true"), ("ice warm", "false")]
]
MATH = [
    {"instruction": q, "input": "", "output": "", "answer": a}
    for q, a in [("Sam had 3 apples and got 4 more. How many now?", "7.0"),
                 ("A man has 12 books and gives away 5. How many are left?", "7"),
                 ("What is 0.5 * 10?", "5.0"), ("What is 3 - 5?", "-2")]
]
HELLASWAG = [
    {"instruction": "Please choose the correct ending to complete the given sentence: A man is playing a guitar.\n\n"
                    "Ending1: a Ending2: b Ending3: c Ending4: d\n\nAnswer format: ending1/ending2/ending3/ending4",
     "input": "", "output": "the correct answer is ending2", "answer": "ending2"},
]


def write_json(path, rows, gz=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as handle:
            json.dump(rows, handle)
    else:
        path.write_text(json.dumps(rows, indent=4))


@pytest.fixture
def data_dir(tmp_path):
    root = tmp_path / "data"
    write_json(root / "llm_adapters" / "boolq" / "test.json", BOOLQ)
    write_json(root / "llm_adapters" / "MultiArith" / "test.json", MATH)
    write_json(root / "llm_adapters" / "hellaswag" / "test_approx.json.gz", HELLASWAG, gz=True)
    return root


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=1)


def run(model, tokenizer, tasks, data_dir, output_dir, **options):
    console = Console(file=io.StringIO(), width=120)
    defaults = dict(limit=None, batch_size=3, scoring="generate", max_new_tokens=6,
                    commonsense_rule="trigger", aqua_rule="authors", progress=False, console=console)
    results = evaluate(model, tokenizer, tasks, data_dir=data_dir, output_dir=output_dir, **{**defaults, **options})
    return results, console.file.getvalue()


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_end_to_end_writes_results_predictions_and_table(model, tiny_tokenizer, data_dir, tmp_path):
    out = tmp_path / "eval"
    results, printed = run(model, tiny_tokenizer, ["boolq", "MultiArith"], data_dir, out)
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["tasks"].keys() == {"boolq", "multiarith"} and on_disk == json.loads(json.dumps(results))

    boolq, math = on_disk["tasks"]["boolq"], on_disk["tasks"]["multiarith"]
    assert (boolq["n"], boolq["metric"], boolq["rule"], boolq["scoring"], boolq["max_new_tokens"]) == \
        (5, "accuracy", "trigger", "generate", 6)
    assert (math["n"], math["rule"], math["suite"], math["approx"]) == (4, "last_number", "arithmetic", False)
    assert boolq["data_file"].endswith("boolq/test.json") and boolq["done"] is True

    rows = read_jsonl(out / "predictions" / "boolq.jsonl")
    assert [r["index"] for r in rows] == list(range(5))
    assert [r["gold"] for r in rows] == [row["answer"] for row in BOOLQ]
    for r, row in zip(rows, BOOLQ):
        assert r["prompt"] == row["instruction"] + "\n"
        assert r["extracted"] == commonsense_trigger(r["generation"])
        assert r["correct"] == (r["extracted"] == r["gold"])
    assert boolq["value"] == sum(r["correct"] for r in rows) / 5
    for r in read_jsonl(out / "predictions" / "multiarith.jsonl"):
        assert r["prompt"].endswith("### Response:\n")
        assert r["extracted"] == last_number(r["generation"])
        assert r["correct"] == numbers_match(r["extracted"], r["gold"])
    assert on_disk["suites"]["commonsense"] == {"metric": "accuracy", "average": boolq["value"],
                                                "tasks": ["boolq"], "suite_size": 8, "complete": False}
    assert "boolq" in printed and "multiarith" in printed and "commonsense average" in printed


def test_rerun_skips_completed_tasks_and_redoes_changed_ones(model, tiny_tokenizer, data_dir, tmp_path, monkeypatch):
    out = tmp_path / "eval"
    run(model, tiny_tokenizer, ["boolq", "multiarith"], data_dir, out)
    first = (out / "predictions" / "boolq.jsonl").read_text()
    calls = []
    for cls in (CommonsenseTask, ArithmeticTask):
        def counted(self, *args, _original=cls.predict, **kwargs):
            calls.append(self.name)
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(cls, "predict", counted)

    results, printed = run(model, tiny_tokenizer, ["boolq", "multiarith"], data_dir, out)
    assert calls == [] and results["tasks"]["boolq"]["resumed"] is True
    assert (out / "predictions" / "boolq.jsonl").read_text() == first
    assert "resumed" in printed

    # an incomplete predictions file (e.g. a crash mid-write by another tool) -> that task runs again
    path = out / "predictions" / "multiarith.jsonl"
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:-1]))
    run(model, tiny_tokenizer, ["boolq", "multiarith"], data_dir, out)
    assert calls == ["multiarith"] and len(path.read_text().splitlines()) == 4

    # other settings (limit) -> the task runs again and its entry is replaced
    results, _ = run(model, tiny_tokenizer, ["boolq"], data_dir, out, limit=2)
    assert calls == ["multiarith", "boolq"]
    assert results["tasks"]["boolq"]["n"] == 2 and len(read_jsonl(out / "predictions" / "boolq.jsonl")) == 2
    assert "multiarith" in json.loads((out / "results.json").read_text())["tasks"]  # other entries kept

    # another model/adapter writing to the same folder never reuses these results
    run(model, tiny_tokenizer, ["multiarith"], data_dir, out, run_info={"adapter": "other/adapter"})
    assert calls == ["multiarith", "boolq", "multiarith"]


def test_loglik_scoring_picks_the_most_likely_option(model, tiny_tokenizer, data_dir, tmp_path):
    results, _ = run(model, tiny_tokenizer, ["boolq", "hellaswag"], data_dir, tmp_path / "ll", scoring="loglik_norm")
    boolq = results["tasks"]["boolq"]
    assert (boolq["rule"], boolq["scoring"], boolq["max_new_tokens"]) == ("argmax_loglik_per_token", "loglik_norm", None)
    for r in read_jsonl(tmp_path / "ll" / "predictions" / "boolq.jsonl"):
        assert set(r["scores"]) == {"true", "false"} and r["generation"] is None
        assert r["extracted"] == max(r["scores"], key=r["scores"].get)
    hellaswag = results["tasks"]["hellaswag"]
    assert hellaswag["approx"] is True and hellaswag["data_file"].endswith("test_approx.json.gz")
    (row,) = read_jsonl(tmp_path / "ll" / "predictions" / "hellaswag.jsonl")
    assert list(row["scores"]) == ["ending1", "ending2", "ending3", "ending4"]


def test_rules_are_named_in_results(model, tiny_tokenizer, tmp_path):
    data = tmp_path / "data"
    write_json(data / "llm_adapters" / "boolq" / "test.json", BOOLQ[:2])
    write_json(data / "llm_adapters" / "AQuA" / "test.json", [
        {"instruction": "What is 1 + 1? Answer Choices: (A) 1 (B) 2 (C) 3 (D) 4 (E) 5", "input": "", "output": "",
         "answer": "B"}])
    results, printed = run(model, tiny_tokenizer, ["boolq", "aqua"], data, tmp_path / "o",
                           commonsense_rule="first_match", aqua_rule="strict")
    assert results["tasks"]["boolq"]["rule"] == "first_match"
    assert results["tasks"]["aqua"]["rule"] == "aqua_strict"
    assert "first_match" in printed and "aqua_strict" in printed


def test_task_names_and_aliases():
    assert get_task("ARC-Easy").name == "arc_e"
    assert get_task("social_i_qa").name == "siqa" and get_task("SIQA").name == "siqa"
    assert get_task("openbookqa").name == "obqa" and get_task("MultiArith").name == "multiarith"
    assert [t.name for t in resolve_tasks(None, "commonsense")] == \
        ["boolq", "piqa", "siqa", "hellaswag", "winogrande", "arc_e", "arc_c", "obqa"]
    assert [t.name for t in resolve_tasks(None, "arithmetic")] == \
        ["multiarith", "gsm8k", "addsub", "aqua", "singleeq", "svamp", "mawps"]
    assert [t.name for t in resolve_tasks(["piqa", "PIQA", "gsm8k"])] == ["piqa", "gsm8k"]
    assert [t.name for t in resolve_tasks("boolq,arc_c")] == ["boolq", "arc_c"]
    with pytest.raises(UserError, match="unknown eval task 'sciq'.*boolq.*mawps"):
        get_task("sciq")
    with pytest.raises(UserError, match="no eval tasks"):
        resolve_tasks(None, None)


def test_user_errors_before_any_work(model, tiny_tokenizer, data_dir, tmp_path):
    with pytest.raises(UserError, match="multiarith is generation only.*eval.scoring=generate"):
        run(model, tiny_tokenizer, ["boolq", "multiarith"], data_dir, tmp_path / "x", scoring="loglik")
    with pytest.raises(UserError, match=r"eval task piqa: test file not found; expected .*llm_adapters/piqa/test.json"):
        run(model, tiny_tokenizer, ["boolq", "piqa"], data_dir, tmp_path / "x")
    with pytest.raises(UserError, match="eval.scoring='beam'"):
        run(model, tiny_tokenizer, ["boolq"], data_dir, tmp_path / "x", scoring="beam")
    with pytest.raises(UserError, match="eval.aqua_rule='loose'"):
        run(model, tiny_tokenizer, ["boolq"], data_dir, tmp_path / "x", aqua_rule="loose")
    assert not (tmp_path / "x" / "results.json").exists()


def test_run_eval_from_config_merges_the_adapter(tiny_llama_dir, data_dir, tmp_path):
    """A NeuroAda adapter, merged (fp32) or not, gives the same log-likelihoods; both differ from the base."""
    from neuroada_cli import NeuroAdaConfig, inject, save_adapter

    adapted = inject(tiny_llama(), NeuroAdaConfig(k=2, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for name, param in adapted.named_parameters():
            if param.requires_grad:
                param.copy_(torch.randn_like(param) * 0.5)
    save_adapter(adapted, tmp_path / "adapter")

    def cfg(merge, adapter, out):
        return {"method": "neuroada", "recipe": None,
                "model": {"name_or_path": str(tiny_llama_dir), "gguf_file": None, "dtype": "float32", "family": "auto"},
                "task": {"kind": "causal_lm", "eval_suite": "commonsense"}, "data": {"dir": str(data_dir)},
                "eval": {"tasks": ["boolq"], "limit": None, "batch_size": 4, "scoring": "loglik", "max_new_tokens": None,
                         "commonsense_rule": "trigger", "aqua_rule": "authors", "merge": merge,
                         "output_dir": str(tmp_path / out), "adapter": adapter, "run_dir": None}}

    quiet = dict(progress=False, console=Console(file=io.StringIO()))
    merged = run_eval_from_config(cfg(True, str(tmp_path / "adapter"), "merged"), **quiet)
    unmerged = run_eval_from_config(cfg(False, str(tmp_path / "adapter"), "unmerged"), **quiet)
    base = run_eval_from_config(cfg(True, None, "base"), **quiet)
    assert merged["model"]["merged"] is True and unmerged["model"]["merged"] is False
    assert merged["model"]["adapter"].endswith("adapter") and base["model"]["adapter"] is None

    def scores(out):
        return [r["scores"] for r in read_jsonl(tmp_path / out / "predictions" / "boolq.jsonl")]

    for a, b, c in zip(scores("merged"), scores("unmerged"), scores("base")):
        assert a["true"] == pytest.approx(b["true"], abs=1e-3) and a["false"] == pytest.approx(b["false"], abs=1e-3)
        assert a["true"] != pytest.approx(c["true"], abs=1e-3)


def test_load_trained_refuses_a_missing_adapter_folder(tiny_llama_dir, tmp_path):
    from neuroada_cli.methods import load_trained

    cfg = {"method": "neuroada", "model": {"name_or_path": str(tiny_llama_dir)}, "task": {"kind": "causal_lm"}}
    with pytest.raises(UserError, match="adapter .*nowhere.* not found"):
        load_trained(cfg, tmp_path / "nowhere", merge=True)
