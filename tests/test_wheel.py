"""The wheel carries everything: built from a copy of the source, installed (not editable) into a fresh venv,
and used from an empty directory: ls, cp, validate, train on the copied recipe, eval."""
from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

from helpers import REPO, write_train_rows

SOURCES = ("pyproject.toml", "README.md", "neuroada_cli", "configs", "recipes")


def test_pyproject_lists_every_package():
    """pyproject's explicit package list (needed by the configs/recipes mapping) misses no subpackage."""
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "neuroada_cli").rglob("__init__.py")}
    assert found | {"neuroada_cli.configs", "neuroada_cli.recipes"} == listed


def test_ci_runs_exactly_the_readme_test_command_with_the_dev_extra():
    """.ci/run's last command is the README's test command, and CI installs what the tests import."""
    readme = (REPO / "README.md").read_text()
    command = readme.split("Run the tests", 1)[1].split("```bash\n", 1)[1].split("\n", 1)[0].strip()
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.strip().startswith("#")]
    assert command.startswith("python -m pytest") and ci[-1] == command
    assert any(line.startswith('pip install -q -e ".[dev]"') for line in ci)
    dev = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["dev"]
    for package in ("pytest", "bitsandbytes", "trl", "lm-eval", "matplotlib", "tensorboard"):
        assert any(entry.startswith(package) for entry in dev), package


def _run(args: list, cwd: Path, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(map(str, args))} failed ({result.returncode}):\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory):
    """(venv python, wheel path): the wheel installed into a venv whose only neuroada is the wheel's.

    The venv reaches the test environment's dependencies (torch, transformers ...) through a .pth line;
    .pth files of that environment are not processed, so its editable neuroada finder is not installed.
    """
    root = tmp_path_factory.mktemp("wheel")
    source = root / "src"
    source.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "*.pyc")
    for name in SOURCES:  # build from a copy: an in-tree build writes build/ and egg-info into the checkout
        (shutil.copytree if (REPO / name).is_dir() else shutil.copy2)(REPO / name, source / name, **(
            {"ignore": ignore} if (REPO / name).is_dir() else {}))
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME")}
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
          "-w", root / "dist", source], root, env)
    wheel = next((root / "dist").glob("neuroada-*.whl"))
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], root, env)
    python = venv / "bin" / "python"
    purelib = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], root, env)
                   .stdout.strip())
    deps = [sysconfig.get_paths()["purelib"], *site.getsitepackages()]
    (purelib / "_test_environment.pth").write_text("\n".join(dict.fromkeys(deps)) + "\n")
    # --ignore-installed: the test environment's neuroada is visible through the .pth and must be neither
    # taken as "already satisfied" nor uninstalled.
    _run([python, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", "-q", wheel], root, env)
    return python, wheel


def test_wheel_holds_configs_recipes_sample_and_every_package_file(wheel_venv):
    _, wheel = wheel_venv
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"neuroada_cli/configs/{p.relative_to(REPO / 'configs')}" for p in (REPO / "configs").rglob("*.yaml")}
    expected |= {f"neuroada_cli/recipes/{p.name}" for p in (REPO / "recipes").glob("*.yaml")}
    expected |= {str(p.relative_to(REPO)) for p in (REPO / "neuroada_cli").rglob("*")
                 if p.is_file() and "__pycache__" not in p.parts}
    assert "neuroada_cli/configs/train.yaml" in expected and "neuroada_cli/recipes/smollm2_commonsense.yaml" in expected
    assert any(name.startswith("neuroada_cli/data/sample/llm_adapters/") for name in expected)
    assert sorted(expected - names) == []


def test_installed_wheel_runs_from_an_empty_directory(wheel_venv, tmp_path, tiny_llama_dir):
    python, _ = wheel_venv
    data = write_train_rows(tmp_path / "data", n=16)
    boolq = data / "llm_adapters" / "boolq"
    boolq.mkdir(parents=True)
    (boolq / "test.json").write_text(json.dumps([{"instruction": f"Is the fox quick {i}?", "input": "",
                                                  "output": "the correct answer is true", "answer": "true"}
                                                 for i in range(3)]))
    work = tmp_path / "empty"
    work.mkdir()
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", PATH=f"{python.parent}:{env['PATH']}")
    where = _run([python, "-I", "-c", "import neuroada_cli, neuroada_cli.paths as p; print(neuroada_cli.__file__);"
                  "print(p.configs_dir()); print(p.recipes_dir())"], work, env).stdout.split()
    venv = python.parent.parent
    assert all(Path(line).is_relative_to(venv) for line in where), where

    neuroada = python.parent / "neuroada"
    listing = _run([neuroada, "ls"], work, env).stdout
    assert "smollm2_commonsense" in listing and "$ neuroada train recipe=smollm2_commonsense" in listing
    assert "boolq" in listing and "embedded:smollm2-135m-instruct" in listing and "optimizer" in listing
    _run([neuroada, "cp", "smollm2_commonsense", "my.yaml"], work, env)
    assert "# Launch: neuroada train recipe=my.yaml" in (work / "my.yaml").read_text()
    ok = _run([neuroada, "validate", "recipe=./my.yaml"], work, env).stdout
    assert ok.startswith("ok: my: method neuroada k=20 (magnitude), model embedded:smollm2-135m-instruct"), ok

    _run([neuroada, "train", "recipe=./my.yaml", "trainer.max_steps=2", f"model.name_or_path={tiny_llama_dir}",
          f"data.dir={data}", "trainer.output_dir=run", "trainer.batch_size=4", "trainer.micro_batch_size=2",
          "data.max_length=64", "neuroada.k=4", "trainer.checkpoint_every=0"], work, env)
    log = [json.loads(line) for line in (work / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [1, 2]
    record = json.loads((work / "run" / "run.json").read_text())
    assert record["recipe"] == "my" and record.get("git_commit") is None  # a wheel has no checkout
    _run([neuroada, "eval", "run=run", "eval.limit=2", "eval.tasks=[boolq]", "eval.max_new_tokens=4"], work, env)
    results = json.loads((work / "run" / "eval" / "results.json").read_text())
    assert results["tasks"]["boolq"]["n"] == 2
