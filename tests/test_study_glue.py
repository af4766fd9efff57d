"""scripts/study_glue.py's bookkeeping: grid first, seeds wait for the pick, the pick uses the selection part only,
finished runs are skipped, the summary reads report-part scores (no training here: fake finished runs)."""
import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "study_glue.py"


@pytest.fixture
def study_module():
    spec = importlib.util.spec_from_file_location("study_glue", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_run(run: Path, selection: float, report: float) -> None:
    """What a finished `neuroada train ... eval.after_train=true` leaves behind, as far as the study reads it."""
    (run / "eval").mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"validation": {"value": selection, "higher_is_better": True},
                                              "trainable_params": 1000}))
    (run / "eval" / "results.json").write_text(json.dumps(
        {"format": 1, "tasks": {"glue/mrpc": {"metric": "accuracy", "value": report, "done": True}}}))


def test_seeds_wait_for_the_grid_and_the_pick_ignores_report_scores(study_module, tmp_path):
    args = study_module.parse_args(["--root", str(tmp_path), "--tasks", "mrpc", "--methods",
                                    "neuroada k20,k20 reverse", "--seeds", "2"])
    study = study_module.Study(args)
    low, high = study_module.LR_GRID["neuroada k20"]
    planned = study.planned()
    assert planned[:2] == [("mrpc", "neuroada k20", 0, low), ("mrpc", "neuroada k20", 0, high)]
    assert all(lr is None for *_, lr in planned[2:]) and len(planned) == 5  # 2 grid + 1 seed + 2 ablation seeds

    # the low lr wins on the selection part although the high one scores better on the report part
    fake_run(study.run_dir("mrpc", "neuroada k20", 0, low), selection=0.8, report=0.60)
    fake_run(study.run_dir("mrpc", "neuroada k20", 0, high), selection=0.7, report=0.90)
    assert study.picked_lr("mrpc", "neuroada k20") == low == study.picked_lr("mrpc", "k20 reverse")
    rest = study.planned()[2:]
    assert rest == [("mrpc", "neuroada k20", 1, low), ("mrpc", "k20 reverse", 0, low), ("mrpc", "k20 reverse", 1, low)]
    assert study.finished(study.run_dir("mrpc", "neuroada k20", 0, low))
    assert not study.finished(study.run_dir(*rest[0]))

    fake_run(study.run_dir(*rest[0]), selection=0.5, report=0.70)
    table = study_module.collect(study)
    assert table[("mrpc", "neuroada k20")]["scores"] == pytest.approx([60.0, 70.0])
    assert table[("mrpc", "k20 reverse")]["scores"] == []
    assert study_module.mean_std([60.0, 70.0]) == "65.00 ± 7.07"


def test_commands_are_cli_runs_with_the_method_overrides(study_module, tmp_path):
    study = study_module.Study(study_module.parse_args(["--root", str(tmp_path)]))
    head = study.command("rte", "head only", 0, 0.01, tmp_path / "run")
    layer = study.command("sst2", "k20 random layer", 2, 0.005, tmp_path / "run")
    assert head[1:4] == ["-m", "neuroada_cli", "train"] and "method=head" in head and "optimizer.lr=0.01" in head
    assert {"neuroada.scope=layer", "neuroada.selection=random", "neuroada.seed=2", "trainer.seed=2"} <= set(layer)
    with pytest.raises(SystemExit):
        study_module.parse_args(["--tasks", "qqp"])


def test_claims_pair_runs_by_task_and_seed(study_module):
    assert study_module.sign_test(8, 0) == pytest.approx(2 / 2 ** 8) and study_module.sign_test(3, 3) == 1.0
    # b beats a by 1 point on every (task, seed): a clear "no" for a although a task's spread is 10 points
    table = {(task, name): {"by_seed": {seed: base + seed * 10 + (1 if name == "b" else 0) for seed in range(3)}}
             for task, base in (("sst2", 50), ("mrpc", 70), ("stsb", 20)) for name in ("a", "b")}
    assert study_module.verdict(table, "a", "b", ["sst2", "mrpc", "stsb"]).startswith("no: -1.00 ± 0.00; better in 0, "
                                                                                        "worse in 9 of 9")
    assert study_module.verdict(table, "a", "a", ["sst2"]).startswith("within noise")
