"""Ways to compute the NeuroAda delta gradient g[r, j] = sum_t dY[t, r] X[t, idx[r, j]] on this machine.

Compares, interleaved in one run, for the layer shapes of the step benchmark: the dense weight
gradient dY^T X (what masked tuning and the authors' code pay), the column path (one gathered input
column per selected slot, our choice for k <= sddmm.COLUMN_PATH_MAX_K), torch.sparse.sampled_addmm
(our choice above it), and the chunked gather + bmm fallback. Times are medians, reported as ratios
to the dense product.   python scripts/bench_sddmm.py [--tokens 1024] [--shapes smollm2] [--json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from neuroada_cli.core import selection
from neuroada_cli.core.sddmm import sddmm_columns, sddmm_gather, sddmm_sparse

SHAPES = {"llama2048": [(2048, 2048), (5504, 2048), (2048, 5504)],  # (d_out, d_in)
          "smollm2": [(576, 576), (192, 576), (1536, 576), (576, 1536)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--k", type=int, nargs="+", default=[1, 2, 4, 8, 20])
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="llama2048",
                        help="layer shapes: the step benchmark's 2048/5504 Llama, or SmolLM2-135M's 576/1536 layers")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shapes = SHAPES[args.shapes]
    rows = []
    for d_out, d_in in shapes:
        grad_out, inputs = torch.randn(args.tokens, d_out), torch.randn(args.tokens, d_in)
        for k in args.k:
            idx = selection.magnitude(torch.randn(d_out, d_in), k)
            strategies = {
                "dense dW": lambda: grad_out.t() @ inputs,
                "columns": lambda: sddmm_columns(grad_out, inputs, idx),
                "sampled_addmm": lambda: sddmm_sparse(grad_out, inputs, idx),
                "gather+bmm": lambda: sddmm_gather(grad_out, inputs, idx),
            }
            times = {name: [] for name in strategies}
            for fn in strategies.values():
                fn()  # warm-up
            for _ in range(args.repeats):  # interleaved, so load changes hit all strategies alike
                for name, fn in strategies.items():
                    start = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - start)
            dense = statistics.median(times["dense dW"])
            rows.append({"shape": f"{d_out}x{d_in}", "k": k,
                         **{name: statistics.median(t) / dense for name, t in times.items()}})
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"delta-gradient cost as a fraction of the dense dW, {args.tokens} tokens, fp32")
    for column in ("d_out x d_in", "k", "columns", "sampled_addmm", "gather+bmm"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(row["shape"], str(row["k"]), *(f"{row[name]:.3f}" for name in ("columns", "sampled_addmm", "gather+bmm")))
    Console().print(table)


if __name__ == "__main__":
    main()
