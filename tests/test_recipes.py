"""Every recipe composes and validates; recipes hold only deltas; the LLaMA recipes carry the authors' settings."""
from __future__ import annotations

import shutil

import pytest
import yaml
from omegaconf import OmegaConf

from neuroada_cli import config, paths
from neuroada_cli.errors import UserError

RECIPES = config.recipe_names()
AUTHORS = {  # NeuroAda's scripts (perCell_mag_add top1/top20), LLaMA-7B
    "commonsense": dict(k=20, lr=7e-4, batch_size=16, warmup_ratio=0.06, weight_decay=0.0),
    "commonsense_k1": dict(k=1, lr=8e-3, batch_size=8, warmup_ratio=0.1, weight_decay=0.0),
    "math": dict(k=20, lr=3e-3, batch_size=8, micro_batch_size=2, warmup_ratio=0.0, weight_decay=0.1),
    "math_k1": dict(k=1, lr=9e-3, batch_size=16, warmup_ratio=0.06, weight_decay=0.0),
}
MODELS = {"llama": "yahma/llama-7b-hf", "llama13b": "yahma/llama-13b-hf", "llama2": "meta-llama/Llama-2-7b-hf",
          "llama3": "meta-llama/Meta-Llama-3-8B"}


def composed(name: str):
    return config.validate(config.compose(name, []), world_size=1)


@pytest.fixture
def hydra_dirs(tmp_path, monkeypatch):
    """Copies of configs/ and recipes/ that a test may extend (every compose reads paths.* afresh)."""
    shutil.copytree(paths.configs_dir(), tmp_path / "configs")
    shutil.copytree(paths.recipes_dir(), tmp_path / "recipes")
    monkeypatch.setattr(paths, "configs_dir", lambda: tmp_path / "configs")
    monkeypatch.setattr(paths, "recipes_dir", lambda: tmp_path / "recipes")
    return tmp_path


def test_every_expected_recipe_exists():
    expected = {f"{prefix}_{variant}" for prefix in MODELS for variant in AUTHORS}
    assert expected | {"smollm2_commonsense", "smollm2_math"} <= set(RECIPES)


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_composes_validates_and_documents_its_launch(name):
    cfg = composed(name)
    assert cfg.recipe == name and cfg.trainer.output_dir.startswith(f"outputs/{name}/")
    text = (paths.recipes_dir() / f"{name}.yaml").read_text()
    assert text.startswith("# ") and f"# Launch: neuroada train recipe={name}\n" in text
    description, launch = config.recipe_header(paths.recipes_dir() / f"{name}.yaml")
    assert launch == f"neuroada train recipe={name}" and len(description) > 20 and "Launch" not in description


@pytest.mark.parametrize("name", [r for r in RECIPES if r.startswith("llama")])
def test_llama_recipes_use_the_authors_hyper_parameters(name):
    prefix, variant = name.split("_", 1)
    cfg = composed(name)
    expected = dict(epochs=3, max_length=512, seed=42, **AUTHORS[variant])
    got = dict(k=cfg.neuroada.k, lr=cfg.optimizer.lr, batch_size=cfg.trainer.batch_size,
               micro_batch_size=cfg.trainer.micro_batch_size, warmup_ratio=cfg.optimizer.warmup_ratio,
               weight_decay=cfg.optimizer.weight_decay, epochs=cfg.trainer.epochs, max_length=cfg.data.max_length,
               seed=cfg.trainer.seed)
    assert {key: got[key] for key in expected} == pytest.approx(expected)
    assert cfg.model.name_or_path == MODELS[prefix] and cfg.task.name == variant.removesuffix("_k1")
    assert cfg.neuroada.selection == "magnitude" and len(cfg.neuroada.target_modules) == 7
    assert cfg.trainer.precision == "bf16" and cfg.method == "neuroada"


@pytest.mark.parametrize("name", ["smollm2_commonsense", "smollm2_math"])
def test_cpu_recipes_are_small(name):
    cfg = composed(name)
    assert cfg.model.name_or_path.startswith("embedded:") and cfg.trainer.precision == "fp32"
    steps = cfg.trainer.max_steps or cfg.trainer.epochs * (cfg.data.train_limit // cfg.trainer.batch_size)
    assert steps <= 300 and cfg.data.max_length <= 256


def _leaves(node, prefix=""):
    for key, value in node.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


@pytest.mark.parametrize("name", RECIPES)
def test_recipes_hold_only_their_own_deltas(name, hydra_dirs):
    """Every value a recipe writes changes the config composed from its defaults list alone."""
    source = yaml.safe_load((hydra_dirs / "recipes" / f"{name}.yaml").read_text())
    defaults = [entry for entry in source["defaults"] if entry != "_self_"]
    (hydra_dirs / "recipes" / "parent_of_it.yaml").write_text(yaml.safe_dump({"defaults": defaults}))
    parent = OmegaConf.to_container(config.validate(config.compose("parent_of_it", []), world_size=1))
    for key, value in _leaves({k: v for k, v in source.items() if k != "defaults"}):
        before = OmegaConf.select(OmegaConf.create(parent), key)
        assert before != value, f"{name}: {key}={value!r} repeats the value it already has"


def test_a_recipe_merging_an_unknown_key_is_rejected(hydra_dirs):
    (hydra_dirs / "recipes" / "typo.yaml").write_text("defaults:\n  - train\n  - _self_\ntrainer:\n  epoch: 2\n")
    with pytest.raises(UserError, match=r"unknown key 'trainer.epoch'; valid keys in trainer: epochs, "):
        config.validate(config.compose("typo", []))


def test_nested_task_groups_slot_in(hydra_dirs):
    """A task in a nested group (task/glue/<name>.yaml, chosen with task=glue/<name>); num_labels may be set."""
    glue = hydra_dirs / "configs" / "task" / "glue"
    glue.mkdir(exist_ok=True)
    (glue / "fixture.yaml").write_text("name: glue/fixture\nkind: sequence_classification\ntrain_dataset: rte\n"
                                       "template: none\neval_suite: null\nnum_labels: 2\n")
    cfg = config.validate(config.compose(None, ["task=glue/fixture"]))
    assert cfg.task.name == "glue/fixture" and cfg.task.num_labels == 2 and "glue" not in cfg


def test_config_yaml_of_a_run_round_trips(tmp_path):
    cfg = composed("llama_math_k1")
    (tmp_path / "config.yaml").write_text(config.to_yaml(cfg))
    assert config.load_run_config(tmp_path) == cfg
