"""``neuroada``: a table from subcommand to function, Hydra composition, one-line errors.

    neuroada train [recipe=NAME] [key=value | +key=value | ~key ...] [--cfg job] [-m]
    neuroada eval  run=DIR [key=value ...]  |  recipe=NAME adapter=PATH [key=value ...]
    neuroada export run=DIR [output=PATH]

A user mistake (``UserError``, a bad override, a bad value) is printed as one line on stderr and the
exit code is 2; never a traceback.
"""
from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

from .errors import UserError

USAGE = """usage: neuroada <command> [recipe=NAME] [key=value ...]

commands:
  train    fine-tune a model: neuroada train recipe=NAME [key=value | +key=value | ~key ...]
           --cfg job prints the resolved config; -m sweeps (neuroada.k=1,5,20: one run dir per job)
  eval     evaluate a run: neuroada eval run=DIR [eval.tasks=[boolq,piqa] eval.limit=100 ...]
           or a recipe with an adapter: neuroada eval recipe=NAME adapter=PATH [...]
  export   merge a run's adapter into a plain transformers checkpoint: neuroada export run=DIR [output=PATH]

multi-process: accelerate launch --multi_gpu --num_processes N -m neuroada_cli train recipe=NAME ...
`neuroada train --help` lists the config groups and keys."""


def _split(args: list[str], names: tuple[str, ...]) -> tuple[dict[str, str], list[str]]:
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


def _flags(args: list[str], known: dict[str, bool]) -> tuple[dict[str, str | bool], list[str]]:
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
        if known[name]:
            found[name] = value if sep else next(items, "")
        else:
            found[name] = True
    return found, rest


# ---------------------------------------------------------------------------------------- commands
def train_command(args: list[str]) -> int:
    from . import config

    flags, args = _flags(args, {"--cfg": True, "-c": True, "-m": False, "--multirun": False, "-h": False,
                                "--help": False})
    if flags.get("-h") or flags.get("--help"):
        print(_train_help())
        return 0
    show = flags.get("--cfg") or flags.get("-c")
    if show not in (None, "job"):
        raise UserError(f"--cfg {show!r} is not supported; use --cfg job (prints the resolved config)")
    popped, overrides = _split(args, ("recipe",))
    recipe = popped.get("recipe")
    sweep = bool(flags.get("-m") or flags.get("--multirun"))
    jobs = config.sweep_jobs(overrides) if sweep else [overrides]
    configs = []
    for number, job in enumerate(jobs):  # compose and check every job before running any
        cfg = config.validate(config.compose(recipe, job))
        if sweep:
            cfg.trainer.output_dir = str(Path(cfg.trainer.output_dir) / str(number))
        configs.append((job, cfg))
    if show:
        for number, (job, cfg) in enumerate(configs):
            if sweep:
                print(f"# job {number}: {' '.join(job)}")
            print(config.to_yaml(cfg), end="")
        return 0
    from .train import train

    finished = []
    for number, (job, cfg) in enumerate(configs):
        if sweep:
            _say(f"[sweep job {number + 1}/{len(configs)}] {' '.join(job)} -> {cfg.trainer.output_dir}")
        out = train(cfg)
        finished.append((job, out))
        _say(f"run directory: {out}")
    if sweep and int(os.environ.get("RANK", "0")) == 0:
        _print_sweep_summary(finished)
    return 0


def _print_sweep_summary(finished: list) -> None:
    """One row per sweep job with its eval scores (runs evaluated with eval.after_train=true)."""
    from rich.console import Console

    from .eval.summary import sweep_table

    table = sweep_table(finished)
    if table is not None:
        Console().print(table)


def eval_config_for_run(run: str | os.PathLike, overrides: list[str]):
    """A finished run's config with eval overrides applied; adapter = <run>/adapter, output <run>/eval."""
    from . import config

    cfg = config.load_run_config(run)
    cfg = config.validate(config.apply_overrides(cfg, overrides), world_size=1)
    cfg.eval.adapter = str(Path(run).resolve() / "adapter")
    cfg.eval.run_dir = str(Path(run).resolve())  # the eval runner writes <run>/eval unless eval.output_dir
    return cfg


def eval_command(args: list[str]) -> int:
    from . import config

    popped, overrides = _split(args, ("run", "recipe", "adapter"))
    if "run" in popped and ("recipe" in popped or "adapter" in popped):
        raise UserError("give either run=DIR or recipe=NAME [adapter=PATH], not both")
    if "run" in popped:
        cfg = eval_config_for_run(popped["run"], overrides)
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


def export_command(args: list[str]) -> int:
    popped, rest = _split(args, ("run", "output"))
    if rest:
        raise UserError(f"unexpected argument {rest[0]!r}; usage: neuroada export run=DIR [output=PATH]")
    if "run" not in popped:
        raise UserError("neuroada export needs run=DIR (a training run directory)")
    from .export import export

    out = export(popped["run"], popped.get("output"))
    _say(f"merged model written to {out}")
    return 0


COMMANDS = {"train": train_command, "eval": eval_command, "export": export_command}


# ------------------------------------------------------------------------------------------ output
def _say(message: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(message, flush=True)


def _train_help() -> str:
    from . import config, paths

    lines = ["usage: neuroada train [recipe=NAME] [key=value | +key=value | ~key ...] [--cfg job] [-m]", "",
             "config groups (choose with group=option, e.g. model=llama_7b):"]
    for group in sorted(p for p in paths.configs_dir().iterdir() if p.is_dir()):
        options = sorted(str(f.relative_to(group).with_suffix("")) for f in group.rglob("*.yaml"))
        lines.append(f"  {group.name:<10} {', '.join(options)}")
    lines += ["", "keys (section: keys):"]
    for section in ("model", "task", "neuroada", "lora", "data", "optimizer", "trainer", "eval"):
        lines.append(f"  {section + ':':<10} {', '.join(config.section_keys(section))}")
    lines.append(f"  {'top level:':<10} recipe (set by recipe=NAME), method (neuroada | lora | full)")
    lines += ["", "recipes: " + ", ".join(config.recipe_names())]
    return "\n".join(lines)


def _usage() -> str:
    from . import config

    names = config.recipe_names()
    width = max((len(n) for n in names), default=0)
    recipes = "\n".join(f"  {name:<{width}}  {config.recipe_summary(name)}" for name in names)
    return f"{USAGE}\n\nrecipes (neuroada train recipe=NAME):\n{recipes}"


def _setup_logging() -> None:
    """neuroada's own notes (e.g. examples dropped by truncation) go to stdout on process 0 only, so that
    stderr carries nothing but the one-line error of a failed command."""
    logger = logging.getLogger("neuroada_cli")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("note: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.ERROR)


def _quiet_libraries() -> None:
    """Library chatter would break the one-line error contract and clutter the progress bar."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"(torch|transformers|accelerate|peft)\.")
    for name in ("transformers", "accelerate", "peft", "datasets", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except ImportError:
        pass


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    command = COMMANDS.get(args[0])
    try:
        if command is None:
            raise UserError(f"unknown command {args[0]!r}; use one of {', '.join(COMMANDS)} (neuroada --help)")
        _quiet_libraries()
        _setup_logging()
        return command(args[1:]) or 0
    except UserError as err:
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
