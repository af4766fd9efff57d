"""The GLUE study of issue 14: does NeuroAda's per-neuron placement matter, and what is it worth?

all-MiniLM-L6-v2 (recipe minilm_glue) on SST-2, MRPC, STS-B, CoLA and RTE; training sets capped at a seeded
2k rows for 1 epoch (data.train_limit, trainer.epochs; the subset follows trainer.seed); the LoReFT split
(validation cut into a selection part, used for the best epoch and the learning rate, and a report part,
the score); 3 seeds.

Size: 165 jobs (30 of them the seed-0 learning-rate grid). At the defaults that took 1 h 37 min on the
2-core machine with --workers 2 (two 1-thread jobs side by side do 1.46x the jobs/hour of one 2-thread job).
The cost is linear in --train-limit and --epochs (training time; ~15 s per job is start-up and evaluation),
in --seeds and in the grid; the issue's 5k rows x 2 epochs is about 4-5x the training time.

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
  python scripts/study_glue.py --root outputs/study_glue                       # all of it (~1.6 h here)
  python scripts/study_glue.py --root outputs/study_glue --max-minutes 80      # one chunk; run again to go on
  python scripts/study_glue.py --root outputs/study_glue --summary             # tables + plot
  python scripts/study_glue.py --root /tmp/s --tasks rte --seeds 1 --train-limit 64 --epochs 1  # smoke test
"""
from __future__ import annotations

import argparse
import json
import math
import os
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
    "head only": (["method=head"], "head"),
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
    "head": (5e-3, 2e-2),
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
        """Keep --workers jobs running (each on cores/workers threads) until nothing is left or a limit stops it."""
        started, done_now, running = time.monotonic(), 0, {}  # run dir -> (process, log file, job, start time)
        stopping = None
        while True:
            jobs = self.planned()
            todo = [j for j in jobs if j[3] is not None and not self.finished(self.run_dir(*j))
                    and self.run_dir(*j) not in self.failed_now and self.run_dir(*j) not in running]
            waiting = sum(1 for j in jobs if j[3] is None)
            mean = self.mean_job_seconds()
            elapsed_min = (time.monotonic() - started) / 60
            if stopping is None and self.args.chunk is not None and done_now + len(running) >= self.args.chunk:
                stopping = f"--chunk {self.args.chunk} jobs started"
            if stopping is None and self.args.max_minutes is not None and \
                    elapsed_min + (mean or 0) / 60 > self.args.max_minutes:
                stopping = f"the next job would end past --max-minutes {self.args.max_minutes}"
            if todo and stopping is None and len(running) < self.args.workers:
                if not running:
                    self.print_eta(len(todo) + waiting)
                job = todo[0]
                running[self.run_dir(*job)] = self.start_job(*job)
                continue
            if not running:
                if stopping:
                    print(f"stopping: {stopping}; run again to continue")
                elif waiting:
                    print(f"nothing left to run now ({waiting} jobs wait for a grid that failed)")
                else:
                    print("all done")
                return
            self.wait_one(running)
            done_now += 1
            self.print_eta(len(todo) + waiting + len(running))

    def start_job(self, task: str, method: str, seed: int, lr: float):
        run = self.run_dir(task, method, seed, lr)
        if run.exists():  # a half-written run (interrupted): start it again from scratch
            shutil.rmtree(run)
        run.parent.mkdir(parents=True, exist_ok=True)
        print(f"[study] {task} / {method} / seed {seed} / lr {lr:g} -> {run}", flush=True)
        threads = max(1, (os.cpu_count() or 1) // self.args.workers)
        log = open(run.parent / f"{run.name}.log", "w")
        process = subprocess.Popen(self.command(task, method, seed, lr, run), stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, "OMP_NUM_THREADS": str(threads)})
        return process, log, time.monotonic()

    def wait_one(self, running: dict) -> None:
        """Block until one running job ends; record its time and exit status."""
        while True:
            for run, (process, log, began) in list(running.items()):
                code = process.poll()
                if code is None:
                    continue
                log.close()
                del running[run]
                with open(self.root / "jobs.jsonl", "a") as record:
                    record.write(json.dumps({"run": str(run), "seconds": time.monotonic() - began, "rc": code,
                                             "workers": self.args.workers}) + "\n")
                if code != 0:
                    self.failed_now.add(run)
                    print(f"[study] FAILED (exit {code}); see {run.parent / (run.name + '.log')}; retried on the "
                          "next invocation", flush=True)
                return
            time.sleep(1)

    def job_records(self) -> list[dict]:
        path = self.root / "jobs.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line] if path.is_file() else []

    def mean_job_seconds(self) -> float | None:
        times = [r["seconds"] for r in self.job_records() if r["rc"] == 0]
        return statistics.mean(times) if times else None

    def print_eta(self, remaining: int) -> None:
        mean = self.mean_job_seconds()  # wall seconds of one job while --workers run side by side
        eta = "unknown until one job finished" if mean is None else \
            f"{remaining * mean / self.args.workers / 3600:.1f} h"
        print(f"[study] {remaining} jobs left; mean job {mean or 0:.0f} s; ETA {eta}", flush=True)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="outputs/study_glue", help="one run directory per job below it")
    parser.add_argument("--tasks", type=lambda s: s.split(","), default=list(TASKS))
    parser.add_argument("--methods", type=lambda s: s.split(","), default=None,
                        help=f"subset of: {', '.join(list(METHODS) + list(ABLATIONS))}")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--train-limit", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2,
                        help="jobs side by side, each on cores/workers threads (2 x 1 thread: 1.46x the jobs/hour of "
                             "1 x 2 threads on the 2-core machine)")
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
    ("(e) NeuroAda k=20 vs full fine-tuning (the paper: it matches full with a fraction of the parameters)",
     "neuroada k20", ("full",), TASKS),
    ("(f) what the bypasses add: NeuroAda k=20 vs k=1 vs the head alone", "neuroada k20",
     ("neuroada k1", "head only"), TASKS),
)


def collect(study: Study) -> dict:
    """(task, method) -> {"scores": [report-part score per finished seed], "params": trainable count}."""
    from neuroada_cli.eval.summary import read_run_results

    table = {}
    for task in study.args.tasks:
        for method in study.methods_of(task):
            lr = study.picked_lr(task, method)
            scores, by_seed, params = [], {}, None
            for seed in range(study.args.seeds if lr is not None else 0):
                run = study.run_dir(task, method, seed, lr)
                if not study.finished(run):
                    continue
                entry = read_run_results(run).get(f"glue/{task}", {})
                if entry.get("done"):
                    scores.append(100 * entry["value"])
                    by_seed[seed] = scores[-1]
                    params = json.loads((run / "run.json").read_text()).get("trainable_params")
            table[(task, method)] = {"scores": scores, "by_seed": by_seed, "params": params, "lr": lr}
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


def sign_test(wins: int, losses: int) -> float:
    """Two-sided sign test p-value (ties dropped): robust to tasks whose differences differ in size."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(wins, losses) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def verdict(table: dict, subject: str, other: str, tasks) -> str:
    """Paired by (task, seed): a seed draws the same training rows for every method. "yes"/"no" when the sign
    test over the pairs gives p < 0.05, else "within noise"; with the mean difference and its standard error."""
    pairs = [table[(t, subject)]["by_seed"][seed] - table[(t, other)]["by_seed"][seed] for t in tasks
             if (t, subject) in table and (t, other) in table
             for seed in table[(t, subject)]["by_seed"] if seed in table[(t, other)]["by_seed"]]
    if len(pairs) < 2:
        return "-"
    wins, losses = sum(d > 0 for d in pairs), sum(d < 0 for d in pairs)
    p_value = sign_test(wins, losses)
    word = "within noise" if p_value >= 0.05 else ("yes" if wins > losses else "no")
    mean, error = statistics.mean(pairs), statistics.stdev(pairs) / len(pairs) ** 0.5
    return (f"{word}: {mean:+.2f} ± {error:.2f}; better in {wins}, worse in {losses} of {len(pairs)} "
            f"task-seed pairs (sign test p={p_value:.3f})")


def claims_lines(table: dict, tasks: list[str]) -> list[str]:
    lines = ["| claim | method: avg | compared with: avg | does the method win? (paired by task and seed) |",
             "|---|---|---|---|"]
    for claim, subject, others, claim_tasks in CLAIMS:
        claim_tasks = [t for t in claim_tasks if t in tasks]
        others = [o for o in others if any((t, o) in table for t in claim_tasks)]
        if not others or not any((t, subject) in table for t in claim_tasks):
            continue  # a method this study (--tasks/--methods) does not run
        mine = average(table, subject, claim_tasks)
        if mine is None:
            lines.append(f"| {claim} | {subject}: not finished | | |")
            continue
        for other in others:
            theirs = average(table, other, claim_tasks)
            lines.append(f"| {claim} (over {', '.join(claim_tasks)}) | {subject}: {mine:.2f} | "
                         f"{other}: {'-' if theirs is None else f'{theirs:.2f}'} | "
                         f"{verdict(table, subject, other, claim_tasks)} |")
    return lines


def write_summary(study: Study) -> None:
    table = collect(study)
    tasks = list(study.args.tasks)
    methods = list(dict.fromkeys(m for t in tasks for m in study.methods_of(t)))
    lines = ["# GLUE study (all-MiniLM-L6-v2)", "",
             f"Report-part score x 100 (accuracy; MCC for CoLA; Pearson/Spearman for STS-B as the task's metric), "
             f"mean ± std over {study.args.seeds} seeds; training capped at {study.args.train_limit} rows, "
             f"{study.args.epochs} epoch(s), max_length {study.args.max_length}; lr picked on the selection part.", "",
             "| method | " + " | ".join(tasks) + " | average | trainable params | lr picked (per task) |",
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
    """Two panels: the core methods on every task, the placement ablations (with NeuroAda k=20) on theirs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    core = [m for m in methods if m in METHODS]
    ablation = (["neuroada k20"] if "neuroada k20" in methods else []) + [m for m in methods if m in ABLATIONS]
    panels = [(core, tasks, "core methods")]
    if len(ablation) > 1:
        panels.append((ablation, [t for t in tasks if t in ABLATION_TASKS], "same budget as k=20, placed elsewhere"))
    palette = plt.get_cmap("tab20").colors
    colour = {method: palette[number % len(palette)] for number, method in enumerate(methods)}  # same in both panels
    figure, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.5), squeeze=False)
    for axis, (names, panel_tasks, title) in zip(axes[0], panels):
        width = 0.8 / max(1, len(names))
        for number, method in enumerate(names):
            means, spreads, where = [], [], []
            for position, task in enumerate(panel_tasks):
                scores = table.get((task, method), {}).get("scores") or []
                if scores:
                    where.append(position + number * width)
                    means.append(statistics.mean(scores))
                    spreads.append(statistics.stdev(scores) if len(scores) > 1 else 0.0)
            axis.bar(where, means, width, yerr=spreads, label=method, capsize=2, color=colour[method])
        axis.set_xticks([p + 0.4 - width / 2 for p in range(len(panel_tasks))], panel_tasks)
        axis.set_ylabel("report-part score x 100 (mean ± std over seeds)")
        axis.set_title(title)
        axis.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    raise SystemExit(main())
