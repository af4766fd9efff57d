"""The config layer: public Hydra API only, allowed values from their owners, one batch check, sweeps, run overrides."""
from __future__ import annotations

import re

import pytest
import yaml

from neuroada_cli import config
from neuroada_cli.errors import UserError
from helpers import REPO


def test_no_private_hydra_api_anywhere():
    offenders = [str(p.relative_to(REPO)) for p in (REPO / "neuroada_cli").rglob("*.py")
                 if "hydra._internal" in p.read_text()]
    assert offenders == []


def _owners():
    from neuroada_cli.eval.base import SCORINGS
    from neuroada_cli.kinds import KIND_NAMES
    from neuroada_cli.core.config import IMPLS, MODES, SCOPES, SELECTIONS
    from neuroada_cli.methods import METHOD_NAMES
    from neuroada_cli.models import DTYPES, FAMILIES
    from neuroada_cli.strategies import STRATEGIES
    from neuroada_cli.training.parts import PRECISION_TO_ACCELERATE

    return {"method": METHOD_NAMES, "task.kind": KIND_NAMES, "neuroada.selection": SELECTIONS,
            "neuroada.impl": IMPLS, "neuroada.scope": SCOPES, "neuroada.mode": MODES, "eval.scoring": SCORINGS,
            "model.dtype": DTYPES, "model.family": FAMILIES, "trainer.precision": tuple(PRECISION_TO_ACCELERATE),
            "trainer.strategy": STRATEGIES}


@pytest.mark.parametrize("key", list(_owners()))
def test_allowed_values_are_the_owners_tables(key):
    with pytest.raises(UserError) as info:
        config.validate(config.compose(None, [f"{key}=nope"]), world_size=1)
    assert str(info.value) == f"{key}='nope' is not valid; use one of {', '.join(_owners()[key])}"


def test_config_schema_holds_no_copies_of_the_owners_tables():
    """No module-level value of config_schema equals an owner's table, and its source spells none of them out
    (a copy would drift from its owner: a new selection rule or strategy would be refused)."""
    import neuroada_cli.config_schema as schema

    tables = {key: tuple(values) for key, values in _owners().items()}
    for name, value in vars(schema).items():
        if isinstance(value, (tuple, list)) and value and all(isinstance(v, str) for v in value):
            assert tuple(value) not in tables.values(), f"config_schema.{name} copies an owner's table"
    source = (REPO / "neuroada_cli" / "config_schema.py").read_text()
    for key, values in tables.items():
        for quote in ('"', "'"):
            spelled = ", ".join(f"{quote}{v}{quote}" for v in values[:2])
            assert len(values) < 2 or spelled not in source, f"config_schema.py spells out {key}'s values"


def test_train_help_lists_every_schema_section():
    from neuroada_cli.commands import config_keys_text
    from neuroada_cli.config_schema import RunConfig, section_names
    from dataclasses import fields

    text = config_keys_text()
    sections = section_names()
    assert {"head", "preference", "neuroada", "trainer"} <= set(sections)
    assert len(sections) == len(fields(RunConfig)) - 2  # all but recipe and method
    for section in sections:
        assert f"\n  {section}: " in text and ", ".join(config.section_keys(section)) in text


def test_neuroada_section_follows_the_method_config():
    """NeuroAdaConfig (the method library's dataclass) is the source: the schema section has its fields with its
    defaults (plus the training-side gradient_batches), and configs/neuroada/default.yaml gives those values."""
    from dataclasses import MISSING, fields

    from neuroada_cli.config_schema import NeuroAdaSection
    from neuroada_cli.core.config import NeuroAdaConfig

    def defaults(cls):
        return {f.name: f.default if f.default is not MISSING else f.default_factory() for f in fields(cls)}

    library, section = defaults(NeuroAdaConfig), defaults(NeuroAdaSection)
    assert section.pop("gradient_batches") >= 1
    assert section == library
    shipped = yaml.safe_load((REPO / "configs" / "neuroada" / "default.yaml").read_text())
    assert shipped == {**section, "gradient_batches": shipped["gradient_batches"]}


@pytest.mark.parametrize("group", ["model", "neuroada", "lora", "head", "preference", "data", "trainer", "eval"])
def test_shipped_group_defaults_set_every_schema_key(group):
    from neuroada_cli.config_schema import section_keys

    folder = REPO / "configs" / group
    path = folder / "default.yaml" if (folder / "default.yaml").is_file() else sorted(folder.glob("*.yaml"))[0]
    set_by_the_cli = {"eval": ("adapter", "run_dir")}.get(group, ())  # eval run=DIR fills them, never a YAML
    assert list(yaml.safe_load(path.read_text())) == [k for k in section_keys(group) if k not in set_by_the_cli]


def test_max_length_bound_is_the_tokenizers():
    from neuroada_cli.data.tokenize import MIN_MAX_LENGTH

    config.validate(config.compose(None, [f"data.max_length={MIN_MAX_LENGTH}"]), world_size=1)
    with pytest.raises(UserError, match=rf"data.max_length={MIN_MAX_LENGTH - 1} is too small"):
        config.validate(config.compose(None, [f"data.max_length={MIN_MAX_LENGTH - 1}"]), world_size=1)


@pytest.mark.parametrize("batch, micro, world, steps", [(16, 4, 1, 4), (16, 4, 2, 2), (8, 8, 1, 1), (12, 2, 3, 2)])
def test_accumulation_steps(batch, micro, world, steps):
    assert config.accumulation_steps(batch, micro, world) == steps


def test_accumulation_steps_refuses_what_validate_refuses():
    message = ("trainer.batch_size=12 is not divisible by micro_batch_size x processes = 4 x 2; "
               "pick a batch_size that is a multiple of 8")
    with pytest.raises(UserError) as direct:
        config.accumulation_steps(12, 4, 2)
    with pytest.raises(UserError) as validated:
        config.validate(config.compose(None, ["trainer.batch_size=12", "trainer.micro_batch_size=4"]), world_size=2)
    assert str(direct.value) == str(validated.value) == message


def test_sweeps_expand_to_the_cartesian_product_last_key_fastest():
    jobs = config.sweep_jobs(["trainer.seed=1", "neuroada.k=1,5", "optimizer.lr=range(1,3)", "~eval.limit"])
    assert jobs == [["trainer.seed=1", "neuroada.k=1", "optimizer.lr=1", "~eval.limit"],
                    ["trainer.seed=1", "neuroada.k=1", "optimizer.lr=2", "~eval.limit"],
                    ["trainer.seed=1", "neuroada.k=5", "optimizer.lr=1", "~eval.limit"],
                    ["trainer.seed=1", "neuroada.k=5", "optimizer.lr=2", "~eval.limit"]]
    assert config.sweep_jobs(["neuroada.k=3"]) == [["neuroada.k=3"]]
    with pytest.raises(UserError) as info:
        config.sweep_jobs(["neuroada.k=[1,"])
    assert "\n" not in str(info.value) and "neuroada.k=[1," in str(info.value)


@pytest.fixture
def run_dir(tmp_path):
    """A run directory as training leaves it: config.yaml plus eval/ and adapter/ folders."""
    cfg = config.validate(config.compose("smollm2_commonsense", [f"trainer.output_dir={tmp_path}"]), world_size=1)
    (tmp_path / "config.yaml").write_text(config.to_yaml(cfg))
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "default.yaml").write_text("limit: 999\n")  # must not be taken for a config group
    (tmp_path / "adapter").mkdir()
    return tmp_path


def test_eval_overrides_on_a_run_config(run_dir):
    cfg = config.eval_config_for_run(run_dir, ["eval.limit=2", "eval.tasks=[boolq,piqa]", "+eval.max_new_tokens=8"])
    assert cfg.eval.limit == 2 and list(cfg.eval.tasks) == ["boolq", "piqa"] and cfg.eval.max_new_tokens == 8
    assert cfg.eval.adapter == str(run_dir.resolve() / "adapter") and cfg.eval.run_dir == str(run_dir.resolve())
    assert cfg.recipe == "smollm2_commonsense" and cfg.neuroada.k == 20
    assert config.eval_config_for_run(run_dir, []).eval.limit is None


@pytest.mark.parametrize("override, expected", [
    ("eval.nope=1", "unknown key 'eval.nope'; valid keys in eval: tasks, limit, "),
    ("eval.limit=0", "eval.limit=0 must be >= 1 or null"),
    ("eval.limit=1,2", "eval.limit=1,2 is a sweep: add -m"),
])
def test_bad_eval_overrides_on_a_run_are_one_line_errors(run_dir, override, expected):
    with pytest.raises(UserError) as info:
        config.eval_config_for_run(run_dir, [override])
    assert str(info.value).startswith(expected) and "\n" not in str(info.value)


def test_recipe_file_elsewhere_resolves_defaults_against_the_packaged_configs(tmp_path):
    recipe = tmp_path / "tiny_math.yaml"
    recipe.write_text(yaml.safe_dump({"defaults": ["train", {"override /task": "math"}, "_self_"],
                                      "neuroada": {"k": 2}}))
    cfg = config.validate(config.compose(str(recipe), []), world_size=1)
    assert cfg.recipe == "tiny_math" and cfg.task.name == "math" and cfg.neuroada.k == 2
    assert re.match(r"outputs/tiny_math/\d{4}-", cfg.trainer.output_dir)
    # The recipe's own folder comes first on the search path: a model/<name>.yaml beside it is a new option.
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "mine.yaml").write_text("name_or_path: /models/mine\ndtype: bfloat16\nfamily: llama\n")
    (tmp_path / "own_model.yaml").write_text("defaults:\n  - train\n  - override /model: mine\n  - _self_\n")
    cfg = config.validate(config.compose(str(tmp_path / "own_model.yaml"), []), world_size=1)
    assert cfg.model.name_or_path == "/models/mine" and cfg.model.dtype == "bfloat16" and cfg.task.name == "commonsense"
    (tmp_path / "typo.yaml").write_text("defaults:\n  - train\n  - override /model: nope\n")
    with pytest.raises(UserError, match=r"unknown model option 'nope'; available: llama2_7b, "):
        config.compose(str(tmp_path / "typo.yaml"), [])


@pytest.mark.parametrize("overrides, merged", [([], True), (["model.quantization=nf4"], False),
                                               (["model.quantization=nf4", "eval.merge=true"], True),
                                               (["eval.merge=false"], False)])
def test_eval_merge_auto_keeps_a_quantized_base_unmerged(overrides, merged):
    assert config.validate(config.compose(None, overrides), world_size=1).eval.merge is merged
