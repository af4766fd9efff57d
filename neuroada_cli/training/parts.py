"""The recipe's plumbing (recipe.py): accelerator and trackers, optimizer and schedule, logs, progress (a rich
bar on a terminal, plain lines in a log file), the one config flattener (``flat_config``).

Config validation imports this module for its allowed values (PRECISIONS, SCHEDULERS, TRACKERS): torch,
transformers and accelerate are imported inside the functions that need them."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path

from . import run_dir
from ..atomic import finite_or_none, write_failure
from ..errors import UserError

PRECISION_TO_ACCELERATE = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
PRECISIONS = tuple(PRECISION_TO_ACCELERATE)
SCHEDULERS = ("linear", "constant", "cosine")  # make_optimizer's schedules
OPTIMIZERS = ("adamw",)
# trainer.report_to: accelerate's tracker name -> the module it needs (each an optional extra of the package).
TRACKER_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
TRACKERS = tuple(TRACKER_MODULES)
TRACKERS_DIR = "trackers"  # <run dir>/trackers: TensorBoard events, the MLflow file store, wandb's offline run


def make_accelerator(precision: str, report_to=(), output_dir: Path | None = None):
    """One Accelerator; ``cpu=True`` without a GPU, so that a --multi_gpu launch becomes gloo DDP on CPU.

    ``report_to`` trackers log under ``<output_dir>/trackers``; a missing tracker package fails here, before
    the model loads.
    """
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    if precision == "fp16" and not torch.cuda.is_available():  # accelerate would silently run fp32
        raise UserError("trainer.precision=fp16 needs a GPU; on CPU use trainer.precision=bf16 or fp32")
    check_trackers(report_to)
    release_accelerator_state()  # a run that failed earlier in this process (tests, sweeps) may have left one
    project = None
    if report_to:
        project = ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(Path(output_dir) / TRACKERS_DIR))
    try:
        return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=PRECISION_TO_ACCELERATE[precision],
                           kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
                           log_with=list(report_to) or None, project_config=project)
    except (ValueError, RuntimeError) as err:
        raise UserError(f"trainer.precision={precision} is not usable here: {str(err).splitlines()[0]}") from None


def check_trackers(report_to) -> None:
    """Every ``trainer.report_to`` entry is known and its package installed (one line with the pip command)."""
    for name in report_to:
        if name not in TRACKER_MODULES:
            raise UserError(f"trainer.report_to has {name!r}; use a list of {', '.join(TRACKERS)} (or [] for "
                            "train_log.jsonl only)")
        if importlib.util.find_spec(TRACKER_MODULES[name]) is None:
            raise UserError(f"trainer.report_to=[{name}] needs the {name} package: pip install 'neuroada[{name}]'")


def start_trackers(accelerator, output_dir: Path, project: str, config: dict) -> None:
    """Offline by default: wandb in offline mode unless WANDB_MODE is set, MLflow's file store under the run
    directory unless MLFLOW_TRACKING_URI is set. Process 0 only (accelerate creates trackers there)."""
    names = [str(getattr(t, "value", t)) for t in accelerator.log_with]
    if not names:
        return
    logging_dir = output_dir / TRACKERS_DIR
    init_kwargs = {}
    if "wandb" in names:
        os.environ.setdefault("WANDB_MODE", "offline")
        logging_dir.mkdir(parents=True, exist_ok=True)
        init_kwargs["wandb"] = {"dir": str(logging_dir)}
    if "mlflow" in names and accelerator.is_main_process and not os.environ.get("MLFLOW_TRACKING_URI"):
        import mlflow

        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 refuses its file store otherwise
        mlflow.set_tracking_uri((logging_dir / "mlruns").resolve().as_uri())
    accelerator.init_trackers(project, config=flat_config(config), init_kwargs=init_kwargs)


def flat_config(config: dict, prefix: str = "") -> dict:
    """Nested config -> {"trainer.lr": value}; lists and null as text (TensorBoard hparams take scalars only)."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flat_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else json.dumps(value)
    return flat


def release_accelerator_state() -> None:
    """Let a sweep create the next job's Accelerator (maybe with another precision) in this process."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()


def check_shared_directory(checkpoint: str | None, world: int) -> None:
    """Every process passes the checkpoint it would resume from (None: a fresh run); all raise the same one line
    when one process sees another than process 0 (several machines without a shared run directory). Collective."""
    import torch.distributed as dist

    seen: list = [None] * world
    dist.all_gather_object(seen, checkpoint)
    other = next((rank for rank, value in enumerate(seen) if value != seen[0]), None)
    if other is not None:
        raise UserError(f"process {other} does not see the checkpoint of process 0 ({seen[0] or 'none'}; it sees "
                        f"{seen[other] or 'none'}); trainer.output_dir must be on a filesystem every machine shares")


def lr_factor(step: int, schedule: str, warmup: int, total: int) -> float:
    """The learning-rate multiplier at optimizer step ``step``: a linear warm-up over ``warmup`` steps, then
    ``linear`` decay to 0 at ``total``, ``cosine`` half-wave to 0, or ``constant`` (HF Trainer's schedules)."""
    if step < warmup:
        return step / max(1, warmup)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    return max(0.0, (total - step) / max(1, total - warmup))


def make_optimizer(model, options, total_steps: int):
    """AdamW over the trainable parameters (weight decay on matrices only, as HF Trainer) and its schedule.

    ``options`` is the ``optimizer`` config group: lr, weight_decay, betas, eps, scheduler, warmup_ratio.
    The schedule is a plain LambdaLR rather than transformers' get_scheduler: importing transformers'
    optimization module pulls in peft and, through it, bitsandbytes on every run (see tests/test_schedule.py).
    """
    import functools

    import torch

    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if p.ndim >= 2], "weight_decay": options.weight_decay},
              {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=options.lr, betas=tuple(options.betas),
                                  eps=options.eps)
    warmup = math.ceil(total_steps * options.warmup_ratio)
    factor = functools.partial(lr_factor, schedule=options.scheduler, warmup=warmup, total=total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return optimizer, scheduler


class LogStream:
    """train_log.jsonl (one JSON object per line) and the trackers of ``trainer.report_to`` (``track``:
    ``accelerator.log``), which get the numbers of each line as ``<group>/<name>`` scalars."""

    def __init__(self, path: Path, track=None):
        self.path = path
        try:
            self.file = open(path, "a")
        except OSError as err:
            raise write_failure(path, err) from None
        self.track = track

    def write(self, step: int, line: dict, scalars: dict | None = None) -> None:
        try:  # non-finite numbers become null: every line stays valid JSON
            self.file.write(json.dumps(finite_or_none(line), allow_nan=False) + "\n")
            self.file.flush()
        except OSError as err:
            raise write_failure(self.path, err) from None
        if scalars and self.track is not None:
            self.track(scalars, step=step)

    def close(self) -> None:
        self.file.close()


def log_stream(output_dir: Path, start_step: int, track=None) -> LogStream:
    """The log of process 0, without what a killed session logged after its last checkpoint."""
    path = output_dir / "train_log.jsonl"
    run_dir.truncate_log(path, start_step)
    return LogStream(path, track)


ESTIMATE_AFTER_STEPS = 3  # steps measured before the one-line estimate of the whole run


class ProgressBar:
    """Progress on process 0 only: a rich bar (steps, loss, lr, tokens/s, ETA) on a terminal; when stdout is
    not a terminal (a log file, a batch job), one plain line per logging interval instead. After the first
    ``ESTIMATE_AFTER_STEPS`` steps one line says what the whole run costs: steps x measured s/step."""

    def __init__(self, enabled: bool, total: int, start: int, name: str, plain: bool | None = None):
        self.enabled, self.total, self.start, self.name = enabled, total, start, name
        self.plain = (not sys.stdout.isatty()) if plain is None else plain
        self.started = time.perf_counter()
        self.estimated = False
        self.bar = None
        if enabled and not self.plain:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[stats]}"), TimeRemainingColumn())
            self.task_id = self.bar.add_task(name, total=total, completed=start, stats="")
            self.bar.start()

    def show(self, done: int, loss: float, lr: float, tokens_per_s: float) -> None:
        if not self.enabled:
            return
        stats = f"loss {loss:.4f}  lr {lr:.2e}  {tokens_per_s:.0f} tok/s"
        if not self.estimated and done - self.start >= ESTIMATE_AFTER_STEPS and done < self.total:
            self.estimated = True
            self._say(self.estimate(done, time.perf_counter() - self.started))
        if self.bar is not None:
            self.bar.update(self.task_id, completed=done, stats=stats)
            return
        elapsed = time.perf_counter() - self.started
        eta = elapsed / max(done - self.start, 1) * (self.total - done)
        print(f"{self.name} step {done}/{self.total}  {stats}  elapsed {_clock(elapsed)}  eta {_clock(eta)}",
              flush=True)

    def estimate(self, done: int, elapsed: float) -> str:
        measured = done - self.start
        per_step = elapsed / measured
        return (f"{self.name}: {self.total - self.start} steps x {per_step:.2f} s/step (measured over {measured}) = "
                f"about {_clock(per_step * (self.total - self.start))} of training, {_clock(per_step * (self.total - done))} "
                "left (validation, evaluation and saving not included)")

    def _say(self, line: str) -> None:
        if self.bar is not None:
            self.bar.console.print(line)
        else:
            print(line, flush=True)

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
