"""The GLUE study of issue 14: does NeuroAda's per-neuron placement matter, and what is it worth?

all-MiniLM-L6-v2 (recipe minilm_glue) on SST-2, MRPC, STS-B, CoLA and RTE; training sets capped at a seeded
5k rows (data.train_limit; the subset follows trainer.seed); the LoReFT split (validation cut into a
selection part, used for the best epoch and the learning rate, and a report part, the score); 3 seeds.

Core methods (all five tasks): classifier head only, full fine-tuning, LoRA r=8 on query/value and on all
linears, NeuroAda k=1 and k=20. Ablations (SST-2, MRPC, STS-B) at k=20's budget (d_out x 20 cells per layer):
reverse (smallest |W| per neuron), random per neuron, random per layer, random global, and 50 % neuron coverage
(k=40 on a seeded half of the rows, so the budget stays k=20's).

Learning rate: a 2-point grid per method (LR_GRID) run at seed 0 and picked on the selection part only
(run.json "validation"); the other seeds reuse the pick. The ablations reuse NeuroAda k=20's pick (same
budget, same optimiser setting: the comparison is placement only). Everything else: the per-task hparams
files (configs/hparams/minilm/glue/<task>.yaml).

Every job is one `neuroada train` run (the CLI, eval.after_train=true) in its own directory under --root;
a job whose run.json and eval/results.json exist is skipped, a half-written one is started again. Stop
cleanly with --chunk N (jobs) or --max-minutes M (no job starts that would end past M, by the mean job time).
`--summary` writes summary.md (mean ± std per task and method, the average, the claims table) and
summary.png from whatever has finished.

Usage:
  python scripts/study_glue.py --root outputs/study_glue --max-minutes 80      # one working session's chunk
  python scripts/study_glue.py --root outputs/study_glue --summary             # tables + plot
  python scripts/study_glue.py --root /tmp/s --tasks rte --seeds 1 --train-limit 64 --epochs 1  # smoke test
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

TASKS = ("sst2", "mrpc", "stsb", "cola", "rte")
ABLATION_TASKS = ("sst2", "mrpc", "stsb")
ALL_LINEAR = "all-linear"

# method -> (its overrides, its learning-rate grid key); NeuroAda's target modules and heads come from the recipe
METHODS = {
    "head only": (["neuroada.target_modules=[]"], "head"),
    "full": (["method=full"], "full"),
    "lora qv r8": (["method=lora", "lora.r=8", "lora.alpha=16"], "lora"),
    "lora all r8": (["method=lora", "lora.r=8", "lora.alpha=16", f"lora.target_modules={ALL_LINEAR}"], "lora"),
    "neuroada k1": (["neuroada.k=1"], "neuroada k1"),
    "neuroada k20": (["neuroada.k=20"], "neuroada k20"),
}
ABLATIONS = {
    "k20 reverse": ["neuroada.k=20", "neuroada.selection=reverse"],
    "k20 random neuron": ["neuroada.k=20", "neuroada.selection=random"],
    "k20 random layer": ["neuroada.k=20", "neuroada.selection=random", "neuroada.scope=layer"],
    "k20 random global": ["neuroada.k=20", "neuroada.selection=random", "neuroada.scope=global"],
    "k40 half coverage": ["neuroada.k=40", "neuroada.neuron_fraction=0.5"],
}
LR_GRID = {  # two points around the published / usual value of each method family
    "head": (1e-3, 5e-3),
    "full": (2e-5, 1e-4),
    "lora": (5e-4, 2e-3),
    "neuroada k1": (5e-3, 2e-2),
    "neuroada k20": (1e-3, 5e-3),
}


def lr_key(method: str) -> str:
    return METHODS[method][1] if method in METHODS else "neuroada k20"


def method_overrides(method: str, seed: int) -> list[str]:
    if method in METHODS:
        return list(METHODS[method][0])
    return ABLATIONS[method] + [f"neuroada.seed={seed}"]  # random placements differ per seed


def slug(text: str) -> str:
    return text.replace(" ", "_")


class Study:
    def __init__(self, args):
        self.root = Path(args.root)
        self.args = args
        self.failed_now: set[Path] = set()  # failed in this invocation: not retried until the next one

    # ---- jobs -------------------------------------------------------------------------------------------
    def run_dir(self, task: str, method: str, seed: int, lr: float) -> Path:
        return self.root / task / slug(method) / f"seed{seed}_lr{lr:g}"

    def finished(self, run: Path) -> bool:
        return (run / "run.json").is_file() and (run / "eval" / "results.json").is_file()

    def selection_score(self, run: Path) -> float | None:
        if not self.finished(run):
            return None
        validation = json.loads((run / "run.json").read_text()).get("validation") or {}
        value = validation.get("value")
        return None if value is None else (value if validation.get("higher_is_better", True) else -value)

    def picked_lr(self, task: str, method: str) -> float | None:
        """The grid point with the best selection-part score at seed 0 (None until the whole grid finished)."""
        grid_method = method if method in METHODS else "neuroada k20"
        scores = {lr: self.selection_score(self.run_dir(task, grid_method, 0, lr)) for lr in LR_GRID[lr_key(method)]}
        if any(score is None for score in scores.values()):
            return None
        return max(scores, key=lambda lr: (scores[lr], -lr))

    def methods_of(self, task: str) -> list[str]:
        chosen = [m for m in METHODS if not self.args.methods or m in self.args.methods]
        if task in ABLATION_TASKS:
            chosen += [m for m in ABLATIONS if not self.args.methods or m in self.args.methods]
        return chosen

    def planned(self) -> list[tuple[str, str, int, float | None]]:
        """(task, method, seed, lr) in run order: the seed-0 grids first, then the picked lr's other seeds.

        lr is None for jobs whose grid has not finished yet (they are counted, not run)."""
        grid, rest = [], []
        for task in self.args.tasks:
            for method in self.methods_of(task):
                if method in METHODS:
                    grid += [(task, method, 0, lr) for lr in LR_GRID[lr_key(method)]]
                else:
                    rest.append((task, method, 0, self.picked_lr(task, method)))
                for seed in range(1, self.args.seeds):
                    rest.append((task, method, seed, self.picked_lr(task, method)))
        return grid + rest

    def command(self, task: str, method: str, seed: int, lr: float, run: Path) -> list[str]:
        a = self.args
        return [sys.executable, "-m", "neuroada_cli", "train", "recipe=minilm_glue", f"task=glue/{task}",
                *method_overrides(method, seed), f"optimizer.lr={lr}", f"trainer.seed={seed}",
                f"data.train_limit={a.train_limit}", f"trainer.epochs={a.epochs}", f"data.max_length={a.max_length}",
                "eval.after_train=true", f"trainer.output_dir={run}"]

    def run_all(self) -> None:
        started, done_now = time.monotonic(), 0
        while True:
            jobs = self.planned()
            todo = [j for j in jobs if j[3] is not None and not self.finished(self.run_dir(*j))]
            todo = [j for j in todo if self.run_dir(*j) not in self.failed_now]
            waiting = sum(1 for j in jobs if j[3] is None)
            self.print_eta(len(todo) + waiting)
            if not todo:
                print(f"nothing left to run now ({waiting} jobs wait for a grid that failed)" if waiting else "all done")
                return
            mean = self.mean_job_seconds()
            elapsed_min = (time.monotonic() - started) / 60
            if self.args.chunk is not None and done_now >= self.args.chunk:
                print(f"stopping: --chunk {self.args.chunk} jobs done; run again to continue")
                return
            if self.args.max_minutes is not None and elapsed_min + (mean or 0) / 60 > self.args.max_minutes:
                print(f"stopping: the next job would end past --max-minutes {self.args.max_minutes}; run again")
                return
            self.run_job(*todo[0])
            done_now += 1

    def run_job(self, task: str, method: str, seed: int, lr: float) -> None:
        run = self.run_dir(task, method, seed, lr)
        if run.exists():  # a half-written run (interrupted): start it again from scratch
            shutil.rmtree(run)
        run.parent.mkdir(parents=True, exist_ok=True)
        print(f"[study] {task} / {method} / seed {seed} / lr {lr:g} -> {run}", flush=True)
        began = time.monotonic()
        with open(run.parent / f"{run.name}.log", "w") as log:
            code = subprocess.call(self.command(task, method, seed, lr, run), stdout=log, stderr=subprocess.STDOUT)
        seconds = time.monotonic() - began
        with open(self.root / "jobs.jsonl", "a") as record:
            record.write(json.dumps({"run": str(run), "seconds": seconds, "rc": code}) + "\n")
        if code != 0:
            self.failed_now.add(run)
            print(f"[study] FAILED (exit {code}); see {run.parent / (run.name + '.log')}; retried on the next "
                  "invocation", flush=True)

    def job_records(self) -> list[dict]:
        path = self.root / "jobs.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line] if path.is_file() else []

    def mean_job_seconds(self) -> float | None:
        times = [r["seconds"] for r in self.job_records() if r["rc"] == 0]
        return statistics.mean(times) if times else None

    def print_eta(self, remaining: int) -> None:
        mean = self.mean_job_seconds()
        eta = "unknown until one job finished" if mean is None else f"{remaining * mean / 3600:.1f} h"
        print(f"[study] {remaining} jobs left; mean job {mean or 0:.0f} s; ETA {eta}", flush=True)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="outputs/study_glue", help="one run directory per job below it")
    parser.add_argument("--tasks", type=lambda s: s.split(","), default=list(TASKS))
    parser.add_argument("--methods", type=lambda s: s.split(","), default=None,
                        help=f"subset of: {', '.join(list(METHODS) + list(ABLATIONS))}")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--train-limit", type=int, default=5000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--chunk", type=int, default=None, help="run at most this many jobs, then stop")
    parser.add_argument("--max-minutes", type=float, default=None, help="start no job that would end past this")
    parser.add_argument("--summary", action="store_true", help="only write summary.md and summary.png")
    parser.add_argument("--dry-run", action="store_true", help="list the planned jobs and stop")
    args = parser.parse_args(argv)
    unknown = [t for t in args.tasks if t not in TASKS]
    if unknown:
        parser.error(f"unknown task {unknown[0]!r}; use {','.join(TASKS)}")
    if args.methods:
        bad = [m for m in args.methods if m not in METHODS and m not in ABLATIONS]
        if bad:
            parser.error(f"unknown method {bad[0]!r}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    study = Study(args)
    if args.dry_run:
        for job in study.planned():
            print(*job, sep=" | ")
        return 0
    if not args.summary:
        study.run_all()
    write_summary(study)
    return 0


# ---- summary ----------------------------------------------------------------------------------------------------
CLAIMS = (  # (claim, the method it is about, what it is compared with, tasks)
    ("(a) NeuroAda k=20 vs LoRA at similar trainable count", "neuroada k20", ("lora qv r8", "lora all r8"), TASKS),
    ("(b) per-neuron vs layer vs global placement, same budget (random scores)", "k20 random neuron",
     ("k20 random layer", "k20 random global"), ABLATION_TASKS),
    ("(c) full vs half neuron coverage, same budget", "neuroada k20", ("k40 half coverage",), ABLATION_TASKS),
    ("(d) magnitude vs random vs reverse selection (per neuron)", "neuroada k20",
     ("k20 random neuron", "k20 reverse"), ABLATION_TASKS),
)


def collect(study: Study) -> dict:
    """(task, method) -> {"scores": [report-part score per finished seed], "params": trainable count}."""
    from neuroada_cli.eval.summary import read_run_results

    table = {}
    for task in study.args.tasks:
        for method in study.methods_of(task):
            lr = study.picked_lr(task, method)
            scores, params = [], None
            for seed in range(study.args.seeds if lr is not None else 0):
                run = study.run_dir(task, method, seed, lr)
                if not study.finished(run):
                    continue
                entry = read_run_results(run).get(f"glue/{task}", {})
                if entry.get("done"):
                    scores.append(100 * entry["value"])
                    params = json.loads((run / "run.json").read_text()).get("trainable_params")
            table[(task, method)] = {"scores": scores, "params": params, "lr": lr}
    return table


def mean_std(scores: list[float]) -> str:
    if not scores:
        return "-"
    spread = statistics.stdev(scores) if len(scores) > 1 else 0.0
    return f"{statistics.mean(scores):.2f} ± {spread:.2f}" + ("" if len(scores) > 1 else " (1 seed)")


def average(table: dict, method: str, tasks) -> float | None:
    means = [statistics.mean(table[(t, method)]["scores"]) for t in tasks
             if (t, method) in table and table[(t, method)]["scores"]]
    return statistics.mean(means) if len(means) == len(tasks) and means else None


def claims_lines(table: dict, tasks: list[str]) -> list[str]:
    lines = ["| claim | method: avg score | compared with: avg score | holds here? |", "|---|---|---|---|"]
    for claim, subject, others, claim_tasks in CLAIMS:
        claim_tasks = [t for t in claim_tasks if t in tasks]
        mine = average(table, subject, claim_tasks)
        if mine is None or not claim_tasks:
            lines.append(f"| {claim} | {subject}: not finished | | |")
            continue
        theirs = {o: average(table, o, claim_tasks) for o in others}
        shown = ", ".join(f"{o}: {'-' if v is None else f'{v:.2f}'}" for o, v in theirs.items())
        known = [v for v in theirs.values() if v is not None]
        verdict = "-" if not known else ("yes" if all(mine >= v for v in known) else "no")
        lines.append(f"| {claim} (over {', '.join(claim_tasks)}) | {subject}: {mine:.2f} | {shown} | {verdict} |")
    return lines


def write_summary(study: Study) -> None:
    table = collect(study)
    tasks = list(study.args.tasks)
    methods = list(dict.fromkeys(m for t in tasks for m in study.methods_of(t)))
    lines = ["# GLUE study (all-MiniLM-L6-v2)", "",
             f"Report-part score x 100 (accuracy; MCC for CoLA; Pearson/Spearman for STS-B as the task's metric), "
             f"mean ± std over {study.args.seeds} seeds; training capped at {study.args.train_limit} rows, "
             f"{study.args.epochs} epoch(s), max_length {study.args.max_length}; lr picked on the selection part.", "",
             "| method | " + " | ".join(tasks) + " | average | trainable params | lr |",
             "|---|" + "---|" * (len(tasks) + 3)]
    for method in methods:
        cells = [mean_std(table[(t, method)]["scores"]) if (t, method) in table else "n/a" for t in tasks]
        avg = average(table, method, tasks)
        params = next((table[(t, method)]["params"] for t in tasks if table.get((t, method), {}).get("params")), None)
        lrs = sorted({f"{table[(t, method)]['lr']:g}" for t in tasks if table.get((t, method), {}).get("lr")})
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {'-' if avg is None else f'{avg:.2f}'} | "
                     f"{'-' if params is None else f'{params:,}'} | {', '.join(lrs) or '-'} |")
    lines += ["", "## Claims", "", *claims_lines(table, tasks), ""]
    study.root.mkdir(parents=True, exist_ok=True)
    (study.root / "summary.md").write_text("\n".join(lines))
    plot(table, tasks, methods, study.root / "summary.png")
    print("\n".join(lines))
    print(f"[study] wrote {study.root / 'summary.md'} and {study.root / 'summary.png'}")


def plot(table: dict, tasks: list[str], methods: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(max(6, 1.8 * len(tasks)), 4.5))
    width = 0.8 / max(1, len(methods))
    for number, method in enumerate(methods):
        means, spreads, where = [], [], []
        for position, task in enumerate(tasks):
            scores = table.get((task, method), {}).get("scores") or []
            if scores:
                where.append(position + number * width)
                means.append(statistics.mean(scores))
                spreads.append(statistics.stdev(scores) if len(scores) > 1 else 0.0)
        axis.bar(where, means, width, yerr=spreads, label=method, capsize=2)
    axis.set_xticks([p + 0.4 - width / 2 for p in range(len(tasks))], tasks)
    axis.set_ylabel("report-part score x 100")
    axis.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    raise SystemExit(main())
