"""Eval throughput, side by side: greedy generation at batch 1, at batch N, and log-likelihood scoring.

Launch (data from NEUROADA_DATA_DIR, model via neuroada_cli.models):
    NEUROADA_DATA_DIR=../shared/data python scripts/bench_eval.py --tasks boolq,piqa --limit 64
    python scripts/bench_eval.py --json            # machine-readable

For each task the same examples go through the real eval code path (task.predict: tokenise, batch,
generate or score, extract the answer). The modes run interleaved, ``--rounds`` times, and the fastest
round of each mode counts, so a busy machine slows all modes alike. Printed: examples/s, accuracy
(zero-shot, unless --adapter is given) and the ratios batchN/batch1 and loglik/batchN.
Targets: batchN >= 3x batch1, loglik >= 5x batchN.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded:smollm2-135m-instruct")
    parser.add_argument("--adapter", default=None, help="a NeuroAda adapter folder to load and merge")
    parser.add_argument("--tasks", default="boolq,piqa")
    parser.add_argument("--limit", type=int, default=64, help="examples per task")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: the suite's (32 commonsense)")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved repetitions; the fastest counts")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from neuroada_cli import paths
    from neuroada_cli.eval.base import EvalOptions
    from neuroada_cli.eval.registry import resolve_tasks
    from neuroada_cli.models import load_model_and_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    tasks = resolve_tasks(args.tasks)
    data_dir = paths.data_dir()
    model, tokenizer = load_model_and_tokenizer(args.model, dtype=args.dtype)
    if args.adapter:
        from neuroada_cli import load_adapter, unload

        model = unload(load_adapter(model, args.adapter))
    from neuroada_cli.eval.processes import current_processes, place

    model = place(model, current_processes().device).eval()  # the GPU when there is one, as `neuroada eval` does
    modes = {
        "generate_b1": EvalOptions(batch_size=1, scoring="generate", max_new_tokens=args.max_new_tokens),
        f"generate_b{args.batch_size}": EvalOptions(batch_size=args.batch_size, scoring="generate",
                                                    max_new_tokens=args.max_new_tokens),
        "loglik": EvalOptions(batch_size=args.batch_size, scoring="loglik"),
    }
    rows = []
    for task in tasks:
        examples = task.load(data_dir, args.limit).examples
        for options in modes.values():
            task.check(options)
        task.predict(model, tokenizer, examples[:2], modes["loglik"])  # warm-up (allocator, kernels)
        best: dict[str, float] = {}
        accuracy: dict[str, float] = {}
        for _ in range(args.rounds):
            for mode, options in modes.items():
                started = time.perf_counter()
                records = task.predict(model, tokenizer, examples, options)
                seconds = time.perf_counter() - started
                best[mode] = min(seconds, best.get(mode, float("inf")))
                accuracy[mode] = task.score(records)[task.metric]
        for mode in modes:
            rows.append({"task": task.name, "mode": mode, "n": len(examples), "seconds": round(best[mode], 3),
                         "examples_per_s": round(len(examples) / best[mode], 3),
                         "accuracy": round(accuracy[mode], 4)})
    batched = f"generate_b{args.batch_size}"
    ratios = {}
    for task in tasks:
        rate = {row["mode"]: row["examples_per_s"] for row in rows if row["task"] == task.name}
        ratios[task.name] = {f"b{args.batch_size}/b1": round(rate[batched] / rate["generate_b1"], 2),
                             f"loglik/b{args.batch_size}": round(rate["loglik"] / rate[batched], 2)}
    report = {"model": args.model, "adapter": args.adapter, "limit": args.limit, "batch_size": args.batch_size,
              "threads": torch.get_num_threads(), "rounds": args.rounds, "rows": rows, "ratios": ratios,
              "data_dir": str(data_dir), "rule": "trigger (generate), argmax_loglik (loglik)"}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"eval throughput: {args.model}, {torch.get_num_threads()} threads, limit {args.limit}")
    for column in ("task", "mode", "n", "s", "examples/s", "accuracy", "ratio"):
        table.add_column(column, justify="left" if column in ("task", "mode") else "right")
    for row in rows:
        ratio = ""
        if row["mode"] == batched:
            ratio = f"{ratios[row['task']][f'b{args.batch_size}/b1']:.2f}x vs b1"
        elif row["mode"] == "loglik":
            ratio = f"{ratios[row['task']][f'loglik/b{args.batch_size}']:.2f}x vs b{args.batch_size}"
        table.add_row(row["task"], row["mode"], str(row["n"]), f"{row['seconds']:.2f}",
                      f"{row['examples_per_s']:.2f}", f"{100 * row['accuracy']:.1f}", ratio)
    Console().print(table)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
