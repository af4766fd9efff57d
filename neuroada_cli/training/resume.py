"""Safe resume: which checkpoint a run continues from, and whether the resumed config may continue it.

``trainer.resume``: false (a fresh run; a directory that holds a run is refused), true (the last checkpoint;
none is an error) or auto (the last checkpoint when there is one, else a fresh run). A resumed config is
compared with the run's config.yaml BEFORE anything is written: a change that alters what is trained
(method, model, data, seed, batch, optimizer, precision ...) is refused with a one-line diff; a change that
only alters how long or how visibly it trains (max_steps, logging, checkpoints, evaluation) is allowed and
recorded in run.json ("resume_changes").
"""
from __future__ import annotations

from pathlib import Path

from . import run_dir
from ..errors import UserError, reading
from .parts import flat_config

# Keys a resume may change (exact names, or a prefix ending in "."): length, logging, checkpoints, evaluation.
HARMLESS_KEYS = ("recipe", "eval.", "data.val_file", "trainer.max_steps", "trainer.epochs", "trainer.log_every",
                 "trainer.checkpoint_every", "trainer.eval_every", "trainer.early_stopping_patience",
                 "trainer.report_to", "trainer.output_dir", "trainer.resume", "trainer.nonfinite",
                 "trainer.nonfinite_patience")


def resume_point(output_dir: Path, resume) -> tuple[int, Path] | None:
    """(step, checkpoint dir) to continue from, or None for a fresh run (see the module docstring)."""
    found = run_dir.latest_checkpoint(output_dir) if resume else None
    if found is not None:
        return found
    if resume is True:
        raise UserError(f"trainer.resume=true but {str(output_dir)!r} holds no checkpoint (checkpoints/step-N) to "
                        "resume from; start a new run (without trainer.resume) in an empty trainer.output_dir")
    if run_dir.holds_run(output_dir):
        raise UserError(f"output dir {str(output_dir)!r} already holds a run"
                        f"{' but no checkpoint' if resume == 'auto' else ''}; pass trainer.resume=true to continue "
                        "it (it needs a checkpoint) or choose another trainer.output_dir")
    return None


def _harmless(key: str) -> bool:
    return any(key == name or (name.endswith(".") and key.startswith(name)) for name in HARMLESS_KEYS)


def read_saved_config(output_dir: Path) -> dict | None:
    """The run's config.yaml as a plain dict (None when the run has none); a damaged file is an error."""
    from omegaconf import DictConfig, OmegaConf

    path = Path(output_dir) / "config.yaml"
    if not path.is_file():
        return None
    with reading(path, "run config", "restore it or start a new run"):  # yaml, OmegaConf, encoding, OSError
        loaded = OmegaConf.load(path)  # OmegaConf's own YAML reading (floats such as 1e-08 stay floats)
        saved = OmegaConf.to_container(loaded) if isinstance(loaded, DictConfig) else None
    if not isinstance(saved, dict):
        raise UserError(f"run config {str(path)!r} is damaged (not a YAML mapping of config keys); restore it or "
                        "start a new run")
    return saved


def resume_changes(output_dir: Path, cfg) -> list[str]:
    """The harmless changes of ``cfg`` against the run's saved config ("key: old -> new"); UserError naming
    the first change that would alter what is trained."""
    from omegaconf import OmegaConf

    saved = read_saved_config(output_dir)
    if saved is None:
        return []
    old, new = flat_config(saved), flat_config(OmegaConf.to_container(cfg, resolve=True))
    changed = [key for key in new if key in old and old[key] != new[key]]  # keys added since: nothing to compare
    refused = [key for key in changed if not _harmless(key)]
    if refused:
        first = refused[0]
        more = f" (and {', '.join(refused[1:])})" if refused[1:] else ""
        raise UserError(f"resume changes {first} {old[first]} -> {new[first]}{more}; start a new run (another "
                        "trainer.output_dir) or drop the override")
    return [f"{key}: {old[key]} -> {new[key]}" for key in changed if key not in ("trainer.resume",)]
