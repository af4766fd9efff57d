"""The loop's validation: evaluating the held-out examples over the processes, when to do it, the best score so
far, early stopping (plain values only).

The recipe (recipe.py) calls ``evaluate_validation`` on every process when ``due`` says so and hands the metrics
to ``record``; a better primary metric than so far means "save adapter/ now". ``state``/``restore`` go into
checkpoints, so a resumed run continues with the same best score and patience counter.

Sharding: with N processes each evaluates a strided share of the examples (positions r, r + N, ...) through the
kind's ``evaluation_part`` and every process combines all the parts with ``evaluation_metrics`` (the causal-LM
loss: summed token losses over summed target tokens; GLUE: the logits of all examples scored together), so
every process holds the same metrics. A kind without those two methods is evaluated whole on every process.
"""
from __future__ import annotations


def evaluate_validation(kind, model, examples: list[dict], pad_id: int, batch_size: int, *, rank: int = 0,
                        world: int = 1) -> dict:
    """The validation metrics of ``examples``, with the work shared by ``world`` processes (call on each of them).

    ``world=1``: this process evaluates every example (trainer.strategy=fsdp passes 1: its forwards are
    collective, so every process must run the same batches).
    """
    sharded = world > 1 and hasattr(kind, "evaluation_part") and hasattr(kind, "evaluation_metrics")
    if not sharded:
        return kind.evaluate(model, examples, pad_id, batch_size)
    import torch.distributed as dist

    share = examples[rank::world]
    part = kind.evaluation_part(model, share, pad_id, batch_size) if share else None
    parts: list = [None] * world
    dist.all_gather_object(parts, part)
    return kind.evaluation_metrics([p for p in parts if p is not None])


class ValidationState:
    """Evaluations every ``eval_every`` optimizer steps (0/None: epoch ends only) and at each epoch end; the
    best value of ``metric``; stop after ``patience`` evaluations without improvement (None: never)."""

    def __init__(self, metric: str, higher_is_better: bool, eval_every: int | None, patience: int | None):
        self.metric, self.higher_is_better = metric, higher_is_better
        self.eval_every, self.patience = eval_every or 0, patience
        self.best: dict | None = None          # {"step", "value", "metrics"} of the best evaluation
        self.evaluations = 0
        self.since_best = 0                    # evaluations since the last improvement
        self.stopped_early = False

    def due(self, done: int, end_of_epoch: bool) -> bool:
        return end_of_epoch or (self.eval_every > 0 and done % self.eval_every == 0)

    def record(self, step: int, metrics: dict) -> bool:
        """Count one evaluation; True when it is the best so far (the caller saves the adapter)."""
        value = metrics[self.metric]
        self.evaluations += 1
        best = self.best["value"] if self.best is not None else None
        improved = best is None or (value > best if self.higher_is_better else value < best)
        if improved:
            self.best = {"step": step, "value": value, "metrics": dict(metrics)}
            self.since_best = 0
        else:
            self.since_best += 1
            self.stopped_early = self.patience is not None and self.since_best >= self.patience
        return improved

    def state(self) -> dict:
        return {"best": self.best, "evaluations": self.evaluations, "since_best": self.since_best,
                "stopped_early": self.stopped_early}

    def restore(self, state: dict | None) -> None:
        if state:
            self.best, self.evaluations = state["best"], state["evaluations"]
            self.since_best, self.stopped_early = state["since_best"], state["stopped_early"]

    def summary(self, steps_done: int | None = None, planned_steps: int | None = None) -> dict:
        """run.json's "validation": the kept (best) evaluation, how many ran, whether the run stopped early
        (patience running out at the last planned step stops nothing)."""
        best = self.best or {}
        stopped = self.stopped_early and (steps_done is None or planned_steps is None or steps_done < planned_steps)
        return {"metric": self.metric, "higher_is_better": self.higher_is_better, "value": best.get("value"),
                "step": best.get("step"), "metrics": best.get("metrics"), "evaluations": self.evaluations,
                "eval_every": self.eval_every or None, "early_stopping_patience": self.patience,
                "stopped_early": stopped}
