"""The fault matrix, part 2 (issue 15): damaged adapters and run files, misleading messages, interrupts.

Same contract as test_faults.py (helpers in tests/helpers.py, the tiny finished run in conftest.py): exit code, one
"error:" line without a traceback, the files that were there unchanged.
"""
from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import torch

from helpers import make_tokenizer, tiny_llama
from neuroada_cli.cli import main
from helpers import fail_final_rename, fails, overrides, tree_hash, truncate

pytestmark = pytest.mark.usefixtures("fresh_log_handler")  # fixtures setup / run: conftest.py


# -------------------------------------------------------------------------------- damaged inputs
def _edit_config(run: Path, **changes) -> None:
    path = run / "adapter" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("damage, expected", [
    (lambda run: truncate(run / "adapter" / "adapter_model.safetensors"), "adapter_model.safetensors' is damaged"),
    (lambda run: truncate(run / "adapter" / "adapter_config.json"), "adapter_config.json' is damaged"),
    (lambda run: (run / "adapter" / "adapter_config.json").write_text("[1, 2]"), "not a JSON object"),
    (lambda run: _edit_config(run, k=2), "k=2 needs [d_out, 2]"),
    (lambda run: _edit_config(run, peft_type="LORA"), "is not a NeuroAda adapter config"),
    (lambda run: (run / "config.yaml").write_text("method: [neuroada\n"), "config.yaml' is damaged"),
])
def test_eval_of_a_damaged_run_names_the_file(run, capsys, damage, expected):
    damage(run)
    before = tree_hash(run)
    line = fails(capsys, ["eval", f"run={run}", "eval.tasks=[boolq]", "eval.limit=1"])
    assert expected in line
    assert tree_hash(run) == before


def test_adapter_index_beyond_the_layer_is_refused(run, capsys):
    from safetensors.torch import load_file, save_file

    path = run / "adapter" / "adapter_model.safetensors"
    tensors = load_file(str(path))
    key = next(k for k in tensors if k.endswith(".neuroada_indices"))
    tensors[key][0, 0] = 30000
    save_file(tensors, str(path))
    line = fails(capsys, ["export", f"run={run}"])
    assert "selects input 30000" in line and "64 inputs" in line


def test_adapter_on_another_base_is_refused_by_its_fingerprint(run, tmp_path, capsys):
    other = tmp_path / "other-model"
    tiny_llama(seed=5).save_pretrained(other)
    make_tokenizer().save_pretrained(other)
    line = fails(capsys, ["eval", f"run={run}", f"model.name_or_path={other}", "eval.tasks=[boolq]", "eval.limit=1"])
    assert "base" in line.lower()


def test_adapter_on_another_architecture_names_the_missing_layer(run, bert_dir):
    from transformers import BertForSequenceClassification

    from neuroada_cli import load_adapter
    from neuroada_cli.errors import UserError

    model = BertForSequenceClassification.from_pretrained(bert_dir, num_labels=2)
    with pytest.raises(UserError) as caught:
        load_adapter(model, run / "adapter")
    assert "None" not in str(caught.value) and "does not have" in str(caught.value)


# -------------------------------------------------------------------------------------- messages
def test_empty_training_file_says_so(setup, tmp_path, capsys):
    empty = tmp_path / "train.jsonl"
    empty.write_text("")
    line = fails(capsys, ["train", *overrides(setup, tmp_path / "out"), f"data.train_file={empty}"])
    assert "batch" not in line and ("empty" in line or "no usable rows" in line)


def test_empty_model_directory_is_one_whole_sentence(tmp_path, capsys):
    empty = tmp_path / "model"
    empty.mkdir()
    line = fails(capsys, ["validate", f"model.name_or_path={empty}"])
    assert "is empty" in line and not line.rstrip().endswith(":")


def test_bare_eval_asks_for_a_run_or_a_recipe(capsys):
    assert "run=DIR" in fails(capsys, ["eval"]) and "recipe=" in fails(capsys, ["eval", "eval.limit=1"])


def _interrupt_at(monkeypatch, step: int) -> None:
    from neuroada_cli.training.recipe import TrainingRecipe

    original = TrainingRecipe.end_of_step

    def end_of_step(self, done, *args):
        original(self, done, *args)
        if done == step:
            raise KeyboardInterrupt

    monkeypatch.setattr(TrainingRecipe, "end_of_step", end_of_step)


def test_interrupt_prints_the_checkpoint_and_a_resume_command_that_works(setup, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    _interrupt_at(monkeypatch, 3)
    line = fails(capsys, ["train", *overrides(setup, out)], code=130)
    assert f"last checkpoint {out / 'checkpoints' / 'step-2'} (step 2)" in line
    command = shlex.split(line.split("resume with: ")[1])
    assert command[:2] == ["neuroada", "train"] and command[-1] == "trainer.resume=true"
    monkeypatch.undo()
    assert main(command[1:]) == 0  # the printed command resumes and ends as the uninterrupted run
    from safetensors.torch import load_file

    a = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(setup["run"] / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_interrupt_before_the_first_checkpoint_says_there_is_none(setup, tmp_path, capsys, monkeypatch):
    _interrupt_at(monkeypatch, 1)
    line = fails(capsys, ["train", *overrides(setup, tmp_path / "out")], code=130)
    assert "before the first checkpoint" in line and "nothing to resume" in line


def test_damaged_lora_adapter_names_its_folder(setup, tmp_path, capsys):
    out = tmp_path / "lora"
    assert main(["train", *overrides(setup, out, steps=2, checkpoint_every=0), "method=lora", "lora.r=2"]) == 0
    truncate(out / "adapter" / "adapter_model.safetensors")
    before = tree_hash(out)
    line = fails(capsys, ["eval", f"run={out}", "eval.tasks=[boolq]", "eval.limit=1"])
    assert f"LoRA adapter '{out / 'adapter'}' is damaged" in line
    assert tree_hash(out) == before


def test_failed_eval_results_write_names_the_file(run, capsys, monkeypatch):
    import errno

    fail_final_rename(monkeypatch, "results.json", errno.ENOSPC)
    line = fails(capsys, ["eval", f"run={run}", "eval.tasks=[boolq]", "eval.limit=1"])
    assert f"cannot write {run / 'eval' / 'results.json'}: No space left on device (ENOSPC)" in line
    assert not (run / "eval" / "results.json").exists()


def test_truncated_training_file_names_it(setup, tmp_path, capsys):
    broken = tmp_path / "train.json"
    broken.write_text('[{"instruction": "a", "output": "b"}, {"instruction": "c", "outp')
    line = fails(capsys, ["train", *overrides(setup, tmp_path / "out"), f"data.train_file={broken}"])
    assert str(broken) in line and not (tmp_path / "out").exists()
