"""The run config: Hydra composition (configs/ groups + recipes) through Hydra's public API, then validation.

``compose(recipe, overrides)`` builds the config of a recipe (a packaged name or a path to a YAML file)
or of configs/train.yaml with Hydra's override grammar (``key=v``, ``+key=v``, ``~key``);
``validate`` checks it against the schema (config_schema.py): an unknown key anywhere (also one merged
in by a recipe, which Hydra's struct mode does not catch) or a bad value is a one-line ``UserError``
naming what is valid. ``sweep_jobs`` expands ``-m`` sweeps with Hydra's public override parser.
Hydra and OmegaConf are imported inside the functions that compose or validate: ``neuroada --help``, ``ls``
and ``cp`` only list and copy files.
"""
from __future__ import annotations

import datetime
import itertools
import os
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from . import paths
from .config_schema import (
    REPLACED_KEYS, RunConfig, section_schema, valid_keys_text, accumulation_steps, check_unknown_keys, check_values,
    section_keys,
)
from .errors import UserError

if TYPE_CHECKING:
    from omegaconf import DictConfig

__all__ = ["accumulation_steps", "compose", "eval_config_for_run", "load_run_config", "recipe_names",
           "resolve_recipe", "sweep_jobs", "to_yaml", "validate"]

# -------------------------------------------------------------------------------------- resolvers
_RUN_STAMP: list[str] = []


def run_stamp() -> str:
    """One timestamp per process, so every resolution (and every sweep job) agrees. Ranks of a
    multi-process run may differ by a second: train.py adopts rank 0's output_dir for all ranks."""
    if not _RUN_STAMP:
        _RUN_STAMP.append(datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S"))
    return _RUN_STAMP[0]


def register_resolvers() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("run_stamp"):
        OmegaConf.register_new_resolver("run_stamp", run_stamp)
    if not OmegaConf.has_resolver("run_name"):
        OmegaConf.register_new_resolver("run_name", lambda recipe=None: recipe or "default")


# ---------------------------------------------------------------------------------------- recipes
def recipe_names() -> list[str]:
    return sorted(p.stem for p in paths.recipes_dir().glob("*.yaml"))


RECIPE_SUFFIXES = (".yaml", ".yml")
_EXAMPLE = "neuroada cp smollm2_commonsense my.yaml writes one that works"


def resolve_recipe(recipe: str) -> Path:
    """The YAML file of ``recipe=``: a packaged recipe name, or a path to a file (``./my.yaml``), checked."""
    path = Path(recipe).expanduser()
    if recipe.endswith(RECIPE_SUFFIXES) or os.sep in recipe or "/" in recipe or (path.suffix and path.is_file()):
        if not path.is_file():
            raise UserError(f"recipe file {recipe!r} does not exist; give a YAML file or a recipe name "
                            f"(`neuroada ls` lists them)")
        if path.suffix not in RECIPE_SUFFIXES:
            raise UserError(f"recipe file {recipe!r} is not a .yaml file; a recipe is a YAML file named NAME.yaml "
                            f"({_EXAMPLE})")
        check_recipe_file(path)
        return path.resolve()
    if recipe not in recipe_names():
        raise UserError(f"unknown recipe {recipe!r}; valid recipes: {', '.join(recipe_names())}")
    return paths.recipes_dir() / f"{recipe}.yaml"


def check_recipe_file(path: Path) -> None:
    """A user's recipe file is YAML holding a mapping of config keys with a ``defaults`` list; else one line
    naming the file and the fix (Hydra would print a long traceback or blame a key it never got)."""
    import yaml

    from .errors import describe

    try:
        content = yaml.safe_load(path.read_text(encoding="utf-8"))
    except Exception as err:  # yaml's syntax errors, UnicodeDecodeError, OSError: all one line
        raise UserError(f"recipe file {str(path)!r} cannot be read: {describe(err)}; fix it ({_EXAMPLE})") from None
    if not isinstance(content, dict):
        found = {type(None): "is empty", str: "holds plain text"}.get(type(content), "holds a YAML list or value")
        raise UserError(f"recipe file {str(path)!r} {found}; a recipe is a YAML mapping that starts with "
                        f"`defaults: [train, _self_]` and holds the keys it changes ({_EXAMPLE})")
    if "defaults" not in content:
        raise UserError(f"recipe file {str(path)!r} has no `defaults:` list, so it builds on no config; add "
                        f"`defaults: [train, _self_]` at its top ({_EXAMPLE})")


def recipe_header(path: Path) -> tuple[str, str]:
    """(one-line description, launch command) from a recipe file's leading comment lines."""
    description, launch = "", ""
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("# ").strip()
        if text.lower().startswith("launch:"):
            launch = launch or text.split(":", 1)[1].strip()
        elif not description:
            description = text
    return description, launch


# ------------------------------------------------------------------------------------ composition
def _compose_in(config_dir: Path, config_name: str, overrides: list[str], recipe: str | None) -> DictConfig:
    """hydra.compose of ``config_dir/config_name.yaml``, the packaged configs/ on the search path."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    configs = paths.configs_dir()
    search = [] if config_dir == configs else [f"hydra.searchpath=['file://{_quoted(configs)}']"]
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.3", job_name="neuroada"):
            return hydra_compose(config_name=config_name, overrides=search + list(overrides))
    except (HydraException, OmegaConfBaseException) as err:
        raise UserError(_explain_override_error(err, recipe)) from None


def _quoted(path: Path) -> str:
    return str(path).replace("\\", "\\\\").replace("'", "\\'")


def compose(recipe: str | None, overrides: list[str]) -> DictConfig:
    """Compose a recipe (name or YAML path; its ``defaults: [train, ...]`` resolve against the packaged
    configs/) or configs/train.yaml, with Hydra overrides; not yet validated."""
    from omegaconf import open_dict

    register_resolvers()
    if recipe is None:
        cfg = _compose_in(paths.configs_dir(), "train", overrides, None)
        name = None
    else:
        path = resolve_recipe(recipe)
        name = path.stem
        cfg = _compose_in(path.parent, path.stem, overrides, name)
    with open_dict(cfg):
        cfg.recipe = name
    return cfg


def _one_line(err: Exception) -> str:
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    return re.sub(r"\s*full_key:.*$", "", text)


def _explain_override_error(err: Exception, recipe: str | None) -> str:
    """Hydra's multi-line composition errors, rewritten as one line that says what is valid."""
    message = _one_line(err)
    match = re.search(r"Could not override '([^']+)'", message) or re.search(r"Key '([^']+)' is not in struct", message)
    if match:
        key = match.group(1)
        if key in REPLACED_KEYS:
            return REPLACED_KEYS[key]
        section, _, name = key.rpartition(".")
        if section_schema(section) is not None and name in section_keys(section):
            return f"{key} is not set by this config; add it with +{key}=VALUE"
        return f"unknown key {key!r}; {valid_keys_text(section)}"
    match = re.search(r"Could not find '([^']+)/([^'/]+)'", message)
    if match:
        return _explain_missing_option(*match.groups(), message, recipe)
    match = re.search(r"Ambiguous value for argument '([^']+)'", message)
    if match:
        return f"{match.group(1)} is a sweep: add -m to run one job per value, or write [a,b] for a list value"
    return re.sub(r"\s*Config search path:.*$", "", message)


def _options(folder: Path) -> list[str]:
    return sorted(str(f.relative_to(folder).with_suffix("")) for f in folder.rglob("*.yaml"))


def _explain_missing_option(group: str, option: str, message: str, recipe: str | None) -> str:
    configs = paths.configs_dir()
    if group.startswith("hparams/"):  # a GLUE recipe picks hparams/<model>/<task choice>.yaml
        model = group.split("/")[1]
        return f"recipe {recipe} has no hyper-parameters for task={option}" \
               f" ({model}); choose task= one of {', '.join(_options(configs / group))}"
    options = re.search(r"Available options in '[^']+':\s*(.*?)\s*Config search path", message)
    listing = ", ".join(options.group(1).split()) if options else "see `neuroada ls`"
    top = configs / group.split("/")[0]
    if "/" in group and top.is_dir():  # a nested choice (task=glue/nope): list every option of the group
        group, _, inner = group.partition("/")
        option = f"{inner}/{option}"
        listing = ", ".join(_options(top))
    return f"unknown {group} option {option!r}; available: {listing}"


def sweep_jobs(overrides: list[str]) -> list[list[str]]:
    """Expand sweep overrides (``neuroada.k=1,5,20``, ``range(1,4)``) into one override list per job: the
    cartesian product, last key varying fastest (as Hydra's basic sweeper)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    choices = []
    for text in overrides:  # one at a time, so that an error names the override it is about
        try:
            override = parser.parse_override(text)
            choices.append([f"{override.get_key_element()}={value}" for value in override.sweep_string_iterator()]
                           if override.is_sweep_override() else [override.input_line])
        except HydraException as err:
            raise UserError(f"bad override {text!r}: {_one_line(err)}") from None
    return [list(job) for job in itertools.product(*choices)]


# ------------------------------------------------------------------------------------- validation
def validate(cfg: DictConfig, world_size: int | None = None) -> DictConfig:
    """Schema (unknown keys, types) + value checks; returns a resolved, typed copy."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    register_resolvers()
    check_unknown_keys(cfg)
    try:
        typed = OmegaConf.merge(OmegaConf.structured(RunConfig), cfg)
        OmegaConf.resolve(typed)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        raise UserError(f"bad value{f' for {key}' if key else ''}: {_one_line(err)}") from None
    check_values(typed, world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "1")))
    if typed.eval.merge is None:  # auto: a quantized base is evaluated unmerged (merging would dequantize it whole)
        typed.eval.merge = typed.model.quantization is None
    return typed


# ------------------------------------------------------------------------------------------- runs
def _run_config_path(run_dir: str | os.PathLike) -> Path:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise UserError(f"{str(run_dir)!r} is not a run directory (no config.yaml); pass run=<trainer.output_dir>")
    from .training.resume import read_saved_config

    read_saved_config(Path(run_dir))  # a damaged config.yaml: one line naming it, not a YAML traceback
    return path


def load_run_config(run_dir: str | os.PathLike) -> DictConfig:
    """The validated config.yaml of a finished (or running) training run."""
    from omegaconf import OmegaConf

    path = _run_config_path(run_dir)
    register_resolvers()
    return validate(OmegaConf.load(path), world_size=1)


def eval_config_for_run(run: str | os.PathLike, overrides: list[str]) -> DictConfig:
    """A finished run's config with eval overrides applied; adapter = <run>/adapter, output <run>/eval.

    The overrides go through hydra.compose on a copy of config.yaml alone (the run directory itself also
    holds eval/ and adapter/ folders, which Hydra would take for config groups).
    """
    text = _run_config_path(run).read_text()
    register_resolvers()
    with tempfile.TemporaryDirectory(prefix="neuroada-run-config-") as folder:
        (Path(folder) / "config.yaml").write_text(text)
        cfg = _compose_in(Path(folder), "config", overrides, None)
    cfg = validate(cfg, world_size=1)
    cfg.eval.adapter = str(Path(run).resolve() / "adapter")
    cfg.eval.run_dir = str(Path(run).resolve())  # the eval runner writes <run>/eval unless eval.output_dir
    return cfg


def to_yaml(cfg: DictConfig) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(cfg, resolve=True)
