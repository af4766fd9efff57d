"""``neuroada``: a table from subcommand to function (commands.py), help texts, one-line errors.

A user mistake (``UserError``, a bad override, a bad value) is printed as one line on stderr and the
exit code is 2; never a traceback. ``-h``/``--help`` after any subcommand prints its help.

The fast face: ``--help``, ``ls``, ``cp`` and ``validate`` import neither torch, transformers nor peft (they
answer in a fraction of a second); only the commands that load a model (``MODEL_COMMANDS``) pay for them.
"""
from __future__ import annotations

import logging
import os
import sys
import warnings

from . import commands, config
from .errors import Interrupted, UserError, one_line

TRAIN_HELP = """usage: neuroada train [recipe=NAME|PATH.yaml] [key=value | +key=value | ~key ...] [--cfg job] [-m]

Fine-tune a model; prints the run directory (trainer.output_dir).
  --cfg job   print the resolved config and run nothing
  -m          a sweep: one job (and run directory <output_dir>/<n>) per combination of values

examples:
  neuroada train recipe=smollm2_commonsense
  neuroada train recipe=llama_commonsense neuroada.k=1 optimizer.lr=8e-3
  neuroada train recipe=./my.yaml trainer.max_steps=50 data.dir=/path/to/data
  neuroada train recipe=smollm2_commonsense -m neuroada.k=1,5,20
  neuroada train recipe=smollm2_commonsense method=lora lora.r=8
  accelerate launch --multi_gpu --num_processes 2 -m neuroada_cli train recipe=smollm2_commonsense"""

EVAL_HELP = """usage: neuroada eval run=DIR [key=value ...] | recipe=NAME|PATH.yaml [adapter=PATH] [key=value ...]

Evaluate a training run (its adapter, its config) or a recipe's base model with an optional adapter;
writes eval/results.json and eval/predictions/<task>.jsonl.

examples:
  neuroada eval run=outputs/smollm2_commonsense/<stamp> eval.limit=100
  neuroada eval recipe=smollm2_commonsense eval.tasks=[boolq,piqa] eval.limit=200 eval.batch_size=16
  neuroada eval recipe=smollm2_commonsense adapter=PATH eval.scoring=loglik"""

EXPORT_HELP = """usage: neuroada export run=DIR [output=PATH]

Merge a run's adapter into its base and write a plain transformers checkpoint (default <run>/merged).

example:
  neuroada export run=outputs/smollm2_commonsense/<stamp> output=merged/"""

INSPECT_HELP = """usage: neuroada inspect run=DIR [output=PATH]

Plots (loss, selected inputs per layer, confusion matrices) and a markdown report of a run, from its files
only (no model is loaded); written to <run>/inspect/ unless output=PATH.

example:
  neuroada inspect run=outputs/smollm2_commonsense/<stamp>"""

VALIDATE_HELP = """usage: neuroada validate [recipe=NAME|PATH.yaml] [key=value ...] [-m]

Compose and check a config (keys, values, batch divisibility, model source, data directory) without
loading a model; prints "ok: ..." with the key facts, or one error line (exit code 2).

examples:
  neuroada validate recipe=./my.yaml
  neuroada validate recipe=llama_math trainer.batch_size=12 trainer.micro_batch_size=4"""

LS_HELP = """usage: neuroada ls

List the recipes (description and launch command), eval tasks, models and config groups.

example:
  neuroada ls"""

CP_HELP = """usage: neuroada cp RECIPE PATH

Write a packaged recipe to PATH (a .yaml file, or a folder) to edit; an existing file is never
overwritten. Its defaults still resolve against the packaged configs.

example:
  neuroada cp smollm2_commonsense my.yaml && neuroada train recipe=./my.yaml"""

# subcommand -> (function, one-line summary for `neuroada --help`, the text of `neuroada <command> --help`)
COMMANDS = {
    "train": (commands.train, "fine-tune a model: a recipe, a recipe file or train.yaml, with overrides", TRAIN_HELP),
    "eval": (commands.evaluate, "evaluate a run (run=DIR) or a recipe's base [+ adapter=PATH]", EVAL_HELP),
    "export": (commands.export, "merge a run's adapter into a plain transformers checkpoint", EXPORT_HELP),
    "inspect": (commands.inspect, "plots and a markdown report of a run (no model loaded)", INSPECT_HELP),
    "validate": (commands.validate, "check a config without loading a model; prints ok: and key facts", VALIDATE_HELP),
    "ls": (commands.list_all, "list recipes, eval tasks, models and config groups", LS_HELP),
    "cp": (commands.copy_recipe, "copy a packaged recipe to a file you edit (then recipe=./that.yaml)", CP_HELP),
}

MODEL_COMMANDS = ("train", "eval", "export")  # the ones that import torch / transformers (library chatter to quiet)

OVERVIEW = """usage: neuroada <command> [arguments]   (neuroada <command> --help for examples)

commands:
{commands}

Overrides use Hydra's grammar: key=value, +key=value (add a key), ~key (remove a key).
multi-process: accelerate launch --multi_gpu --num_processes N -m neuroada_cli train recipe=NAME ..."""


def _overview() -> str:
    listed = "\n".join(f"  {name:<9} {summary}" for name, (_, summary, _) in COMMANDS.items())
    recipes = config.recipe_names()
    width = max(map(len, recipes), default=0)
    described = "\n".join(f"  {name:<{width}}  {config.recipe_header(config.resolve_recipe(name))[0]}"
                          for name in recipes)
    return f"{OVERVIEW.format(commands=listed)}\n\nrecipes (neuroada train recipe=NAME; more: neuroada ls):\n{described}"


def _help(name: str) -> str:
    text = COMMANDS[name][2]
    if name in ("train", "validate"):
        return "\n\n".join([text, "\n".join(commands.group_lines()), commands.config_keys_text()])
    return text


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


def _quiet_libraries(loads_models: bool) -> None:
    """Library chatter would break the one-line error contract and clutter the progress bar."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"(torch|transformers|accelerate|peft)\.")
    for name in ("transformers", "accelerate", "peft", "datasets", "torch.distributed", "bitsandbytes", "kernels"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if not loads_models:
        return  # importing transformers here would cost the fast commands seconds
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        if not args or args[0] in ("-h", "--help", "help"):
            print(_overview())
            return 0
        if args[0] not in COMMANDS:
            raise UserError(f"unknown command {args[0]!r}; use one of {', '.join(COMMANDS)} (neuroada --help)")
        if "-h" in args[1:] or "--help" in args[1:]:
            print(_help(args[0]))
            return 0
        _quiet_libraries(args[0] in MODEL_COMMANDS)
        _setup_logging()
        return COMMANDS[args[0]][0](args[1:]) or 0
    except UserError as err:
        print(f"error: {one_line(err, None)}", file=sys.stderr)
        return 130 if isinstance(err, Interrupted) else 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except OSError as err:  # a disk fault outside the toolkit's own writes (trackers, caches): still one line
        from .atomic import disk_fault, os_error_text

        if not disk_fault(err):
            raise
        print(f"error: {err.filename or 'a file'}: {os_error_text(err)}", file=sys.stderr)
        return 2


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
