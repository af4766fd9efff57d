"""Training throughput and memory of NeuroAda k=1, k=20 and LoRA r=8 through the same loop, side by side.

    python scripts/bench_train.py [--steps 8] [--recipe smollm2_commonsense] [--repeats 1] [--threads N] [--json]

Each configuration trains ``--steps`` optimizer steps of the recipe in its own subprocess (so peak memory
is its own) with a checkpoint half-way, then its run.json and train_log.jsonl are read:

* tokens/s over all steps, and "steady" tokens/s without the first step (allocator and kernel warm-up);
* peak memory of the process (RSS on CPU, CUDA max allocated on GPU), trainable parameters, adapter size;
* the loop's own overhead: time outside forward/backward/optimizer (batch assembly, logging, checkpoints)
  as a percentage of the loop time; the loop is expected to keep it under 5 %.

Ratios are against LoRA r=8. Configurations alternate when --repeats > 1, and the median is reported, so a
machine shared with other work biases all of them alike.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {
    "neuroada k=1": ["method=neuroada", "neuroada.k=1"],
    "neuroada k=20": ["method=neuroada", "neuroada.k=20"],
    "lora r=8": ["method=lora", "lora.r=8", "lora.alpha=16"],
}
BASELINE = "lora r=8"


def run_one(recipe: str, overrides: list[str], steps: int, workdir: Path, threads: int | None) -> dict:
    out = workdir / f"run-{time.time_ns()}"
    command = [sys.executable, "-m", "neuroada_cli", "train", f"recipe={recipe}", *overrides,
               f"trainer.max_steps={steps}", f"trainer.checkpoint_every={max(1, steps // 2)}",
               f"trainer.output_dir={out}"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if threads:  # fewer threads than cores keeps a shared machine from stalling OpenMP barriers
        env["OMP_NUM_THREADS"] = str(threads)
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    record = json.loads((out / "run.json").read_text())
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    steady = log[1:] or log
    record["steady_tokens_per_second"] = sum(r["tokens"] for r in steady) / sum(r["step_s"] for r in steady)
    record["median_step_seconds"] = statistics.median(r["step_s"] for r in log)
    return record


def median_record(records: list[dict]) -> dict:
    keys = ("tokens_per_second", "steady_tokens_per_second", "median_step_seconds", "peak_memory_bytes",
            "overhead_percent", "data_seconds", "log_seconds", "checkpoint_seconds", "loop_seconds")
    merged = dict(records[0])
    merged.update({key: statistics.median(r[key] for r in records) for key in keys})
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="smollm2_commonsense")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of each run (default: torch's)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    args = parser.parse_args()

    load_before = os.getloadavg()[0]
    results: dict[str, list[dict]] = {name: [] for name in CONFIGS}
    with tempfile.TemporaryDirectory(prefix="neuroada-bench-") as tmp:
        for _ in range(args.repeats):
            for name, overrides in CONFIGS.items():
                results[name].append(run_one(args.recipe, overrides, args.steps, Path(tmp), args.threads))
    rows = {name: median_record(records) for name, records in results.items()}
    base = rows[BASELINE]
    summary = {
        "recipe": args.recipe, "steps": args.steps, "repeats": args.repeats, "threads": args.threads,
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)], "cpu_count": os.cpu_count(),
        "configs": {name: {
            "tokens_per_second": row["tokens_per_second"], "steady_tokens_per_second": row["steady_tokens_per_second"],
            "throughput_vs_lora": row["steady_tokens_per_second"] / base["steady_tokens_per_second"],
            "median_step_seconds": row["median_step_seconds"], "peak_memory_bytes": row["peak_memory_bytes"],
            "peak_memory_kind": row["peak_memory_kind"], "memory_vs_lora": row["peak_memory_bytes"] / base["peak_memory_bytes"],
            "trainable_params": row["trainable_params"], "trainable_percent": row["trainable_percent"],
            "adapter_bytes": row["adapter_bytes"], "overhead_percent": row["overhead_percent"],
            "data_seconds": row["data_seconds"], "log_seconds": row["log_seconds"],
            "checkpoint_seconds": row["checkpoint_seconds"], "loop_seconds": row["loop_seconds"],
        } for name, row in rows.items()},
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{args.recipe}: {args.steps} steps x {args.repeats} (median), ratios vs {BASELINE}")
    for column in ("config", "tok/s", "steady tok/s", "vs LoRA", "step s", "peak mem", "vs LoRA", "trainable %",
                   "adapter", "overhead"):
        table.add_column(column, justify="left" if column == "config" else "right", no_wrap=True)
    for name, row in summary["configs"].items():
        table.add_row(
            name, f"{row['tokens_per_second']:.0f}", f"{row['steady_tokens_per_second']:.0f}",
            f"{row['throughput_vs_lora']:.2f}x", f"{row['median_step_seconds']:.2f}",
            f"{row['peak_memory_bytes'] / 2**30:.2f} GiB", f"{row['memory_vs_lora']:.2f}x",
            f"{row['trainable_percent']:.3f}%", f"{row['adapter_bytes'] / 2**20:.2f} MiB", f"{row['overhead_percent']:.2f}%",
        )
    detail = Table(title="loop overhead: time outside forward/backward/optimizer (seconds)")
    for column in ("config", "loop", "batch assembly", "logging", "checkpoints", "overhead %"):
        detail.add_column(column, justify="left" if column == "config" else "right", no_wrap=True)
    for name, row in summary["configs"].items():
        detail.add_row(name, f"{row['loop_seconds']:.2f}", f"{row['data_seconds']:.3f}", f"{row['log_seconds']:.3f}",
                       f"{row['checkpoint_seconds']:.3f}", f"{row['overhead_percent']:.2f}%")
    console = Console(width=max(Console().width, 130))
    console.print(table)
    console.print(detail)
    console.print(f"load average before/after: {summary['load_average']} on {summary['cpu_count']} CPUs "
                  "(other work on the machine slows every configuration)")


if __name__ == "__main__":
    main()
