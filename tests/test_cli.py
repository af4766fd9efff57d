"""The `neuroada` CLI end to end on a tiny model: train / export / eval outputs, the loss falling on a learnable
task, sweeps, ls / cp / validate, recipe files, --help everywhere, one-line errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from neuroada_cli import config, paths
from neuroada_cli.cli import COMMANDS, main
from helpers import REPO, cli, tiny_overrides, write_train_rows


def write_eval_rows(data_dir, task="boolq", n=4):
    rows = [{"instruction": f"Please answer the question: the quick fox {i}", "input": "",
             "output": "the correct answer is true", "answer": "true"} for i in range(n)]
    folder = data_dir / "llm_adapters" / task
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "test.json").write_text(json.dumps(rows))


@pytest.fixture
def data_dir(tmp_path):
    directory = write_train_rows(tmp_path / "data")
    write_eval_rows(directory)
    return directory


def test_help_lists_commands_and_recipes():
    result = cli("--help")
    for word in (*COMMANDS, "accelerate launch", *config.recipe_names()):
        assert word in result.stdout
    assert "llama13b_commonsense_k1" in result.stdout and result.stderr == ""


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_every_subcommand_has_help_with_examples(command, flag, capsys):
    assert main([command, "recipe=anything", flag]) == 0  # help wins over the other arguments
    out = capsys.readouterr().out
    assert out.startswith(f"usage: neuroada {command}") and f"\n  neuroada {command}" in out
    assert ("keys (section: keys):" in out) == (command in ("train", "validate"))


def test_ls_lists_recipes_with_launch_lines_tasks_models_and_groups(capsys):
    assert main(["ls"]) == 0
    out = capsys.readouterr().out
    for name in config.recipe_names():
        assert f"\n  {name}\n" in out and f"$ neuroada train recipe={name}\n" in out
    assert "SmolLM2-135M-Instruct + NeuroAda k=20" in out  # the recipe's one-line description
    for word in ("boolq", "gsm8k", "glue/rte", "smollm2_135m", "yahma/llama-7b-hf", "embedded:all-minilm-l6-v2"):
        assert word in out
    groups = out.split("config groups")[1]
    assert "\n  model " in groups and "\n  optimizer  adamw" in groups


def test_cp_writes_a_recipe_file_that_works_as_recipe_path(tmp_path, capsys):
    target = tmp_path / "mine.yaml"
    assert main(["cp", "smollm2_commonsense", str(target)]) == 0
    text = target.read_text()
    packaged = (paths.recipes_dir() / "smollm2_commonsense.yaml").read_text()
    assert text == packaged.replace("recipe=smollm2_commonsense\n", f"recipe={target}\n")
    target.write_text(text.replace("  micro_batch_size: 8", "  micro_batch_size: 2"))  # the user's edit
    capsys.readouterr()
    assert main(["train", f"recipe={target}", "--cfg", "job", "neuroada.k=3"]) == 0
    mine = yaml.safe_load(capsys.readouterr().out)
    reference = OmegaConf.to_container(config.validate(config.compose("smollm2_commonsense", ["neuroada.k=3"])))
    assert mine["recipe"] == "mine" and mine["trainer"]["output_dir"].startswith("outputs/mine/")
    assert mine["trainer"]["micro_batch_size"] == 2 and mine["neuroada"]["k"] == 3
    for section in ("model", "task", "neuroada", "data", "optimizer"):
        assert mine[section] == reference[section], section

    assert main(["cp", "smollm2_commonsense", str(target)]) == 2  # never overwrites
    assert "already exists" in capsys.readouterr().err and "micro_batch_size: 2" in target.read_text()
    assert main(["cp", "smollm2_commonsense", str(tmp_path)]) == 0  # a folder: <folder>/<recipe>.yaml
    assert (tmp_path / "smollm2_commonsense.yaml").is_file()


def test_validate_prints_the_key_facts_without_loading_a_model(capsys, monkeypatch):
    import neuroada_cli.models as models

    monkeypatch.setattr(models, "load_model_and_tokenizer", lambda *a, **k: pytest.fail("validate loaded a model"))
    assert main(["validate", "recipe=llama_math", "trainer.batch_size=16"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ok: llama_math trainer.batch_size=16: method neuroada k=20 (magnitude), model yahma/llama-7b-hf")
    assert "batch 16 = 2 x 8 accumulation" in out and "precision bf16" in out and out.count("\n") == 1


def test_cfg_job_prints_the_resolved_recipe(capsys):
    assert main(["train", "recipe=llama_math", "--cfg", "job", "optimizer.lr=1e-3"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["recipe"] == "llama_math" and printed["optimizer"]["lr"] == 1e-3
    assert printed["model"]["name_or_path"] == "yahma/llama-7b-hf" and printed["task"]["template"] == "alpaca"
    assert printed["trainer"]["output_dir"].startswith("outputs/llama_math/")
    assert "${" not in yaml.safe_dump(printed)  # resolved


def test_sweep_gives_each_job_its_own_directory(capsys):
    assert main(["train", "recipe=smollm2_commonsense", "-m", "neuroada.k=1,5,20", "--cfg", "job"]) == 0
    documents = capsys.readouterr().out.split("# job ")[1:]
    jobs = [yaml.safe_load(doc.split("\n", 1)[1]) for doc in documents]
    assert [job["neuroada"]["k"] for job in jobs] == [1, 5, 20]
    dirs = [job["trainer"]["output_dir"] for job in jobs]
    assert [d.rsplit("/", 1)[1] for d in dirs] == ["0", "1", "2"] and len({d.rsplit("/", 1)[0] for d in dirs}) == 1


def test_sweep_runs_every_job(tiny_llama_dir, data_dir, tmp_path, capsys):
    overrides = tiny_overrides(tiny_llama_dir, data_dir, tmp_path / "sweep", steps=1)
    assert main(["train", "-m", *overrides, "neuroada.k=1,2"]) == 0  # the last value of a key wins, as in Hydra
    for number, k in enumerate((1, 2)):
        saved = yaml.safe_load((tmp_path / "sweep" / str(number) / "config.yaml").read_text())
        assert saved["neuroada"]["k"] == k and (tmp_path / "sweep" / str(number) / "adapter").is_dir()


def test_train_export_eval_end_to_end(tiny_llama_dir, data_dir, tmp_path):
    run = tmp_path / "run"
    result = cli("train", *tiny_overrides(tiny_llama_dir, data_dir, run, steps=3), "trainer.checkpoint_every=2")
    assert "Traceback" not in result.stderr
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["trainer"]["output_dir"] == str(run) and saved["neuroada"]["k"] == 4
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    assert {"loss", "lr", "tokens_per_s", "step_s", "target_tokens"} <= set(log[0])
    assert {p.name for p in (run / "adapter").iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    record = json.loads((run / "run.json").read_text())
    for key in ("trainable_params", "trainable_percent", "total_params", "peak_memory_bytes", "wall_seconds",
                "adapter_bytes", "git_commit", "overhead_percent", "tokens_per_second"):
        assert key in record, key
    assert record["trainable_params"] == 2 * 4 * (32 + 32 + 16 + 16 + 64 + 64 + 32)  # k x rows of every target
    assert record["adapter_bytes"] > 0 and record["peak_memory_kind"] == "rss"
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-3"]
    assert {p.name for p in (run / "checkpoints" / "step-3").iterdir()} == {"adapter", "trainer_state.pt"}

    cli("export", f"run={run}", f"output={tmp_path / 'merged'}")
    from transformers import AutoModelForCausalLM

    from neuroada_cli import load_adapter, merge

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("neuroada" in name for name, _ in merged.named_parameters())
    adapted = merge(load_adapter(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), run / "adapter"))
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits)
        assert not torch.allclose(merged(ids).logits, AutoModelForCausalLM.from_pretrained(tiny_llama_dir)(ids).logits)
    assert (tmp_path / "merged" / "tokenizer.json").is_file()

    cli("eval", f"run={run}", "eval.tasks=[boolq]", "eval.limit=2", "eval.max_new_tokens=4")
    results = json.loads((run / "eval" / "results.json").read_text())
    assert "boolq" in results["tasks"]


def test_loss_falls_on_a_learnable_task(tiny_llama_dir, tmp_path):
    """Eight fixed rows (two batches per epoch), constant lr: every epoch's mean loss is below the previous one."""
    data = write_train_rows(tmp_path / "data", n=8)
    run = tmp_path / "run"
    assert main(["train", *tiny_overrides(tiny_llama_dir, data, run, steps=8), "trainer.batch_size=4",
                 "data.train_limit=8", "data.max_length=128", "trainer.epochs=8", "optimizer.warmup_ratio=0",
                 "optimizer.lr=5e-2", "optimizer.scheduler=constant"]) == 0
    losses = [json.loads(line)["loss"] for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert len(losses) == 8
    epochs = [sum(losses[i:i + 2]) / 2 for i in range(0, 8, 2)]
    assert all(later < earlier for earlier, later in zip(epochs, epochs[1:])), losses
    assert losses[-1] < losses[0] - 0.25, losses


def _bad_row_dir(tmp_path):
    folder = tmp_path / "bad" / "llm_adapters" / "commonsense_15k"
    folder.mkdir(parents=True)
    (folder / "train.json").write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "no output"}]))
    return tmp_path / "bad"


BAD_INPUTS = {  # the list, each through a real process: stderr is one line, exit code 2; each its own
    # output dir (two run at once, and a second run on one directory is refused by the run lock)
    "unknown recipe": (lambda m, d, t: ["train", "recipe=nope"], "unknown recipe 'nope'; valid recipes: "),
    "unknown key": (lambda m, d, t: ["train", "trainer.foo=1"], "unknown key 'trainer.foo'; valid keys in trainer:"),
    "k = 0": (lambda m, d, t: ["train", "neuroada.k=0"], "neuroada.k=0 is invalid"),
    "k > layer inputs": (lambda m, d, t: ["train", *tiny_overrides(m, d, t / "run_k"), "neuroada.k=100"],
                         "exceeds the 32 inputs"),
    "missing data dir": (lambda m, d, t: ["train", *tiny_overrides(m, t / "nowhere", t / "run_data")], "does not exist"),
    "malformed row": (lambda m, d, t: ["train", *tiny_overrides(m, _bad_row_dir(t), t / "run_row")],
                      "row 1 has no text field 'output'"),
    "occupied output dir": (lambda m, d, t: ["train", *tiny_overrides(m, d, t / "taken")], "already holds a run"),
}


def test_bad_inputs_are_one_line_errors(tiny_llama_dir, data_dir, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "config.yaml").write_text("recipe: other\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    processes = {}
    for name, (make_args, _) in BAD_INPUTS.items():
        running = [p for p in processes.values() if p.poll() is None]
        if len(running) >= 2:  # two at a time (2 cores): each pays the interpreter start-up
            running[0].wait()
        args = make_args(tiny_llama_dir, data_dir, tmp_path)
        processes[name] = subprocess.Popen([sys.executable, "-m", "neuroada_cli", *args], env=env,
                                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for name, process in processes.items():
        _, stderr = process.communicate(timeout=300)
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert process.returncode == 2, f"{name}: exit {process.returncode}\n{stderr}"
        assert len(lines) == 1 and "Traceback" not in stderr, f"{name}: not one line:\n{stderr}"
        assert lines[0].startswith("error: ") and BAD_INPUTS[name][1] in lines[0], f"{name}: {lines[0]}"


@pytest.mark.parametrize("args, expected", [
    (["train", "+neuroada.kk=1"], "unknown key 'neuroada.kk'"),
    (["train", "model=nope"], "unknown model option 'nope'; available: llama2_7b"),
    (["train", "trainer.precision=fp8"], "trainer.precision='fp8' is not valid; use one of fp32, bf16, fp16"),
    (["train", "trainer.batch_size=6", "trainer.micro_batch_size=4"], "not divisible"),
    (["train", "optimizer.lr=abc"], "optimizer.lr"),
    (["train", "neuroada.k=1,2"], "add -m"),
    (["train", "neuroada.selection=best"], "neuroada.selection='best' is not valid"),
    (["train", "--cfg", "hydra"], "use --cfg job"),
    (["frobnicate"], "unknown command 'frobnicate'"),
    (["export"], "needs run=DIR"),
    (["eval", "run=/nowhere"], "is not a run directory"),
    (["train", "recipe=./nowhere.yaml"], "recipe file './nowhere.yaml' does not exist"),
    (["validate", "trainer.batch_size=6"], "trainer.batch_size=6 is not divisible by micro_batch_size"),
    (["validate", "model.name_or_path=/no/such/model"], "model directory '/no/such/model' does not exist"),
    (["validate", "data.dir=/no/such/data"], "data directory '/no/such/data' does not exist"),
    (["cp", "nope", "x.yaml"], "unknown recipe 'nope'; valid recipes: "),
    (["cp", "smollm2_math"], "usage: neuroada cp RECIPE PATH"),
    (["cp", "smollm2_math", "/no/such/folder/x.yaml"], "folder '/no/such/folder' does not exist"),
    (["ls", "extra"], "usage: neuroada ls"),
])
def test_config_mistakes_are_one_line_errors(args, expected, capsys):
    assert main(args) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], captured.err


@pytest.mark.slow
def test_smollm2_recipe_end_to_end(tmp_path):
    """The CPU recipe on the embedded SmolLM2 (packaged sample data): a few steps, eval after training, export."""
    run = tmp_path / "run"
    cli("train", "recipe=smollm2_commonsense", "trainer.max_steps=3", "data.train_limit=64", "trainer.batch_size=8",
        f"trainer.output_dir={run}", "eval.after_train=true", "eval.tasks=[boolq]", "eval.limit=4")
    record = json.loads((run / "run.json").read_text())
    assert record["recipe"] == "smollm2_commonsense" and 2.0 < record["trainable_percent"] < 2.5  # k=20
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [1, 2, 3] and all(0 < row["loss"] < 20 for row in log)
    assert json.loads((run / "eval" / "results.json").read_text())["tasks"]["boolq"]["n"] == 4
    cli("export", f"run={run}")
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(run / "merged").model_type == "llama"


# ------------------------------------------------------------------------------------ the fast CLI face
FAST_COMMANDS = [["--help"], ["train", "--help"], ["ls"], ["cp", "smollm2_commonsense", "{tmp}/copy.yaml"],
                 ["validate", "recipe=smollm2_commonsense"], ["validate", "recipe={tmp}/copy.yaml", "neuroada.k=3"]]


def test_fast_commands_import_no_torch(tmp_path):
    """--help, ls, cp and validate in a fresh interpreter: after each, neither torch, transformers, peft nor
    bitsandbytes is in sys.modules (they cost seconds to import; the commands answer in a fraction of one)."""
    commands = [[arg.replace("{tmp}", str(tmp_path)) for arg in args] for args in FAST_COMMANDS]
    script = f"""
import sys
from neuroada_cli.cli import main
for args in {commands!r}:
    code = main(args)
    heavy = [name for name in ("torch", "transformers", "peft", "bitsandbytes") if name in sys.modules]
    if code != 0 or heavy:
        sys.exit(f"neuroada {{' '.join(args)}}: exit {{code}}, imported {{heavy}}")
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "copy.yaml").is_file()


def test_python_api_stays_importable_from_the_package():
    """The lazy exports resolve to the library's objects; a plain `import peft` after `import neuroada_cli`
    registers NeuroAda with PEFT (also after an availability check such as transformers' find_spec)."""
    script = """
import importlib.util, sys
import neuroada_cli
assert "peft" not in sys.modules and "torch" not in sys.modules
assert importlib.util.find_spec("peft") is not None and "peft" not in sys.modules
from peft.utils import PeftType
assert "NEUROADA" in PeftType.__members__, "not registered"
from neuroada_cli.core.model import inject
assert neuroada_cli.inject is inject
for name in neuroada_cli.__all__:
    assert getattr(neuroada_cli, name) is not None, name
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


# ------------------------------------------------------------------------------------------ recipe files
RECIPE_FILES = {
    "syntax.yaml": ("defaults:\n  - train\ntrainer:\n  epochs: [1\n", "not valid YAML"),
    "notes.txt": ("train for two epochs please\n", "is not a .yaml file"),
    "sentence.yaml": ("This is my recipe for a small model.\n", "holds plain text"),
    "empty.yaml": ("", "is empty"),
    "nodefaults.yaml": ("trainer:\n  epochs: 2\n", "has no `defaults:` list"),
    "latin1.yaml": (b"defaults: [train]\n# caf\xe9\n", "not UTF-8 text"),
}


@pytest.mark.parametrize("command", ["train", "validate"])
@pytest.mark.parametrize("name", list(RECIPE_FILES))
def test_broken_recipe_files_are_one_line_errors(name, command, tmp_path, capsys, monkeypatch):
    content, expected = RECIPE_FILES[name]
    path = tmp_path / name
    path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    monkeypatch.chdir(tmp_path)
    for recipe in (name, str(path)):  # as typed in the folder, and as a path
        assert main([command, f"recipe={recipe}", f"trainer.output_dir={tmp_path / 'run'}"]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0] and f"recipe file '{recipe}'" in lines[0], lines
        assert "neuroada cp smollm2_commonsense my.yaml" in lines[0] or "does not exist" in lines[0]
    assert not (tmp_path / "run").exists()
