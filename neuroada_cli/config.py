"""The run config: Hydra composition (configs/ groups + recipes/) and value checks (schema: config_schema.py).

``compose(name, overrides)`` builds the config of a recipe (or of configs/train.yaml) with Hydra's
override grammar (``key=v``, ``+key=v``, ``~key``) and ``validate`` checks it against the schema
below: an unknown key anywhere (also one merged in by a recipe, which Hydra's struct mode does not
catch) or a bad value is a one-line ``UserError`` naming what is valid.
"""
from __future__ import annotations

import datetime
import os
import re
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from . import paths
from .config_schema import (
    IMPLS, METHODS, OPTIMIZERS, PRECISIONS, SCHEDULERS, SCORINGS, SELECTIONS, RunConfig, _schema_keys, _section_schema,
    _valid_keys_text, section_keys,
)
from .errors import UserError
from .models import DTYPES, FAMILIES, KINDS

# -------------------------------------------------------------------------------------- resolvers
_RUN_STAMP: list[str] = []


def run_stamp() -> str:
    """One timestamp per process, so every resolution (and every sweep job) agrees. Ranks of a
    multi-process run may differ by a second: train.py adopts rank 0's output_dir for all ranks."""
    if not _RUN_STAMP:
        _RUN_STAMP.append(datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S"))
    return _RUN_STAMP[0]


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("run_stamp"):
        OmegaConf.register_new_resolver("run_stamp", run_stamp)
    if not OmegaConf.has_resolver("run_name"):
        OmegaConf.register_new_resolver("run_name", lambda recipe=None: recipe or "default")


# ------------------------------------------------------------------------------------ composition
def recipe_names() -> list[str]:
    return sorted(p.stem for p in paths.recipes_dir().glob("*.yaml"))


def recipe_summary(name: str) -> str:
    """The first comment line of a recipe file (its one-line description)."""
    for line in (paths.recipes_dir() / f"{name}.yaml").read_text().splitlines():
        if line.startswith("#") and not line.lstrip("# ").lower().startswith("launch"):
            return line.lstrip("# ").strip()
    return ""


def _hydra():
    """A Hydra instance searching configs/ and recipes/ (created once per process)."""
    from hydra import version
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_config_search_path
    from hydra.core.config_search_path import SearchPathQuery
    from hydra.core.global_hydra import GlobalHydra

    gh = GlobalHydra.instance()
    if not gh.is_initialized():
        version.setbase("1.3")
        search_path = create_config_search_path(str(paths.configs_dir()))
        search_path.prepend(
            provider="neuroada-recipes", path=f"file://{paths.recipes_dir()}", anchor=SearchPathQuery(provider="schema")
        )
        Hydra.create_main_hydra2(task_name="neuroada", config_search_path=search_path)
    return gh.hydra


def _one_line(err: Exception) -> str:
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    return re.sub(r"\s*full_key:.*$", "", text)


def compose(recipe: str | None, overrides: list[str]) -> DictConfig:
    """Compose recipes/<recipe>.yaml (or configs/train.yaml) with Hydra overrides; not yet validated."""
    from hydra.errors import HydraException
    from hydra.types import RunMode

    register_resolvers()
    if recipe is not None and recipe not in recipe_names():
        raise UserError(f"unknown recipe {recipe!r}; valid recipes: {', '.join(recipe_names())}")
    hydra = _hydra()
    try:
        cfg = hydra.compose_config(
            config_name=recipe or "train", overrides=list(overrides), run_mode=RunMode.RUN,
            from_shell=True, with_log_configuration=False,
        )
    except (HydraException, OmegaConfBaseException) as err:
        raise UserError(_explain_override_error(err, recipe)) from None
    with open_dict(cfg):
        cfg.pop("hydra", None)
        cfg.recipe = recipe
    return cfg


def _explain_override_error(err: Exception, recipe: str | None) -> str:
    """Hydra's multi-line composition errors, rewritten as one line that says what is valid."""
    message = _one_line(err)
    match = re.search(r"Could not override '([^']+)'", message) or re.search(r"Key '([^']+)' is not in struct", message)
    if match:
        key = match.group(1)
        section, _, name = key.rpartition(".")
        if _section_schema(section) is not None and name in section_keys(section):
            return f"{key} is not set by this config; add it with +{key}=VALUE"
        return f"unknown key {key!r}; {_valid_keys_text(section)}"
    match = re.search(r"Could not find '([^']+)/([^'/]+)'", message)
    if match:
        group, option = match.groups()
        options = re.search(r"Available options in '[^']+':\s*(.*?)\s*Config search path", message)
        listing = ", ".join(options.group(1).split()) if options else "see `neuroada train --help`"
        if group.startswith("hparams/"):  # a GLUE recipe picks hparams/<model>/<task choice>.yaml
            model = group.split("/")[1]
            found = sorted(str(f.relative_to(paths.configs_dir() / group).with_suffix(""))
                           for f in (paths.configs_dir() / group).rglob("*.yaml"))
            return f"recipe {recipe} has no hyper-parameters for task={option}" \
                   f" ({model}); choose task= one of {', '.join(found)}"
        top = paths.configs_dir() / group.split("/")[0]
        if "/" in group and top.is_dir():  # a nested choice (task=glue/nope): list every option of the group
            group, _, inner = group.partition("/")
            option = f"{inner}/{option}"
            listing = ", ".join(sorted(str(f.relative_to(top).with_suffix("")) for f in top.rglob("*.yaml")))
        return f"unknown {group} option {option!r}; available: {listing}"
    match = re.search(r"Ambiguous value for argument '([^']+)'", message)
    if match:
        return f"{match.group(1)} is a sweep: add -m to run one job per value, or write [a,b] for a list value"
    return re.sub(r"\s*Config search path:.*$", "", message)


def apply_overrides(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """Apply Hydra-grammar overrides to an already composed config (e.g. a run's config.yaml)."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides=list(overrides))
        OmegaConf.set_struct(cfg, True)
        ConfigLoaderImpl._apply_overrides_to_config(parsed, cfg)
    except (HydraException, OmegaConfBaseException) as err:
        raise UserError(_explain_override_error(err, None)) from None
    finally:
        OmegaConf.set_struct(cfg, False)
    return cfg


def sweep_jobs(overrides: list[str]) -> list[list[str]]:
    """Expand sweep overrides (``neuroada.k=1,5,20``) into one override list per job (cartesian product)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides=list(overrides))
        return BasicSweeper.split_arguments(parsed, None)[0]
    except HydraException as err:
        raise UserError(_one_line(err)) from None


# ------------------------------------------------------------------------------------- validation
def _check_unknown_keys(node: Any, schema, prefix: str) -> None:
    if not isinstance(node, DictConfig):
        return
    known = {f.name: f for f in fields(schema)}
    for key in node.keys():
        if key not in known:
            name = f"{prefix}{key}"
            raise UserError(f"unknown key {name!r}; {_valid_keys_text(prefix.rstrip('.'))}")
        factory = known[key].default_factory
        default = factory() if callable(factory) else None
        if is_dataclass(default):
            child = node._get_node(key)
            if not isinstance(child, DictConfig):
                raise UserError(f"{prefix}{key} must be a section with keys {', '.join(_schema_keys(type(default)))}")
            _check_unknown_keys(child, type(default), f"{prefix}{key}.")


def validate(cfg: DictConfig, world_size: int | None = None) -> DictConfig:
    """Schema (unknown keys, types) + value checks; returns a resolved, typed copy."""
    register_resolvers()
    _check_unknown_keys(cfg, RunConfig, "")
    try:
        typed = OmegaConf.merge(OmegaConf.structured(RunConfig), cfg)
        OmegaConf.resolve(typed)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        raise UserError(f"bad value{f' for {key}' if key else ''}: {_one_line(err)}") from None
    _check_values(typed, world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "1")))
    return typed


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


def _one_of(value, allowed, key: str) -> None:
    _require(value in allowed, f"{key}={value!r} is not valid; use one of {', '.join(map(str, allowed))}")


def _check_values(cfg: DictConfig, world_size: int) -> None:
    _one_of(cfg.method, METHODS, "method")
    _require(bool(cfg.model.name_or_path), "model.name_or_path is empty; give a hub id, a local dir or embedded:NAME")
    _one_of(cfg.model.dtype, DTYPES, "model.dtype")
    _one_of(cfg.model.family, FAMILIES, "model.family")
    _one_of(cfg.task.kind, KINDS, "task.kind")
    n = cfg.neuroada
    _require(n.k >= 1, f"neuroada.k={n.k} is invalid; use a whole number >= 1 (the paper uses 1 or 20)")
    _one_of(n.selection, SELECTIONS, "neuroada.selection")
    _one_of(n.impl, IMPLS, "neuroada.impl")
    _require(len(n.target_modules) > 0, "neuroada.target_modules is empty; name at least one linear layer")
    _require(n.gradient_batches >= 1, f"neuroada.gradient_batches={n.gradient_batches} must be >= 1")
    lo = cfg.lora
    _require(lo.r >= 1, f"lora.r={lo.r} must be >= 1")
    _require(lo.alpha > 0, f"lora.alpha={lo.alpha} must be > 0")
    _require(0 <= lo.dropout < 1, f"lora.dropout={lo.dropout} must be in [0, 1)")
    _require(len(lo.target_modules) > 0, "lora.target_modules is empty; name at least one linear layer")
    d = cfg.data
    _require(d.max_length >= 8, f"data.max_length={d.max_length} is too small; use >= 8 tokens")
    _require(d.train_limit is None or d.train_limit >= 1, f"data.train_limit={d.train_limit} must be >= 1 or null")
    _require(d.bucket_batches >= 1, f"data.bucket_batches={d.bucket_batches} must be >= 1")
    o = cfg.optimizer
    _one_of(o.name, OPTIMIZERS, "optimizer.name")
    _one_of(o.scheduler, SCHEDULERS, "optimizer.scheduler")
    _require(o.lr > 0, f"optimizer.lr={o.lr} must be > 0")
    _require(o.weight_decay >= 0, f"optimizer.weight_decay={o.weight_decay} must be >= 0")
    _require(0 <= o.warmup_ratio < 1, f"optimizer.warmup_ratio={o.warmup_ratio} must be in [0, 1)")
    _require(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), f"optimizer.betas={list(o.betas)} needs two values in [0, 1)")
    _require(o.eps > 0, f"optimizer.eps={o.eps} must be > 0")
    _require(o.max_grad_norm is None or o.max_grad_norm > 0, f"optimizer.max_grad_norm={o.max_grad_norm} must be > 0 or null")
    t = cfg.trainer
    _one_of(t.precision, PRECISIONS, "trainer.precision")
    _require(t.epochs >= 1, f"trainer.epochs={t.epochs} must be >= 1")
    _require(t.max_steps is None or t.max_steps >= 1, f"trainer.max_steps={t.max_steps} must be >= 1 or null")
    _require(t.micro_batch_size >= 1, f"trainer.micro_batch_size={t.micro_batch_size} must be >= 1")
    per_step = t.micro_batch_size * world_size
    _require(
        t.batch_size >= 1 and t.batch_size % per_step == 0,
        f"trainer.batch_size={t.batch_size} is not divisible by micro_batch_size x processes = "
        f"{t.micro_batch_size} x {world_size}; pick a batch_size that is a multiple of {per_step}",
    )
    _require(t.log_every >= 1, f"trainer.log_every={t.log_every} must be >= 1")
    _require(t.checkpoint_every >= 0, f"trainer.checkpoint_every={t.checkpoint_every} must be >= 0 (0 = off)")
    _require(bool(t.output_dir), "trainer.output_dir is empty")
    _require(not t.select_best or cfg.task.kind == "sequence_classification",
             "trainer.select_best=true needs a GLUE task (task.kind=sequence_classification); set it to false")
    e = cfg.eval
    _one_of(e.scoring, SCORINGS, "eval.scoring")
    _require(e.batch_size >= 1, f"eval.batch_size={e.batch_size} must be >= 1")
    _require(e.limit is None or e.limit >= 1, f"eval.limit={e.limit} must be >= 1 or null")


def load_run_config(run_dir: str | os.PathLike) -> DictConfig:
    """The validated config.yaml of a finished (or running) training run."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise UserError(f"{str(run_dir)!r} is not a run directory (no config.yaml); pass run=<trainer.output_dir>")
    register_resolvers()
    return validate(OmegaConf.load(path), world_size=1)


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
