"""DDP against FSDP2 with NeuroAda at 2 processes: per-process memory and step time, as ratios.

Each strategy runs in its own pair of processes (gloo on CPU, NCCL on GPU: one device per process), on the
same random Llama with NeuroAda k=20 on all seven projections, each process stepping on its own half of the
global batch. ddp: every process builds the whole model, torch DDP. fsdp: neuroada_cli.strategies.fsdp.lean_load
(process 0 builds the model, the others the meta-device structure; FSDP2 per decoder block and root).

Reported per process, then the max over processes: parameter bytes held, peak memory during the measured
steps (CPU: VmHWM after resetting it once set-up is done, so the load-time full copy of process 0 is not
counted there; it is reported as "set-up peak"; GPU: max_memory_allocated), and the median step time.

  python scripts/bench_fsdp.py                          # 8 x 1024/2752, vocab 8000, 2 x 2 x 128 tokens
  python scripts/bench_fsdp.py --layers 8 --hidden 2048 --intermediate 5504 --json
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time

from bench_train_step import TARGETS, add_shape_arguments, llama_config, rss_kb  # scripts/ is on sys.path when a script (or its worker) runs

COLUMNS = ("param_mb", "after_setup_mb", "peak_mb", "peak_minus_runtime_mb", "setup_peak_mb", "step_s")


def build(args, meta: bool):
    import torch
    from transformers import LlamaForCausalLM

    from neuroada_cli import NeuroAdaConfig, inject

    config = llama_config(args, head_dim=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("meta" if meta else "cpu"):
        model = LlamaForCausalLM(config)
    return inject(model.to(getattr(torch, args.dtype)), NeuroAdaConfig(k=args.k, target_modules=TARGETS))


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from neuroada_cli.strategies import fsdp as strategy

    cuda = torch.cuda.is_available()
    rank = int(os.environ["RANK"])
    if cuda:
        torch.cuda.set_device(rank)
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    torch.set_num_threads(args.threads)
    dist.init_process_group("nccl" if cuda else "gloo")
    runtime_kb = rss_kb("VmRSS")  # torch, transformers, the process group: what no strategy can shard
    if args.strategy == "ddp":
        model = build(args, meta=False).to(device)
        model = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
    else:
        full = build(args, meta=False) if rank == 0 else None
        model = strategy.lean_load(build(args, meta=True), full, device)
        del full
    setup_peak_kb = rss_kb("VmHWM")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(rank)).to(device)

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    with open("/proc/self/clear_refs", "w") as handle:  # VmHWM := current RSS
        handle.write("5")
    baseline_kb = rss_kb("VmRSS")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else rss_kb("VmHWM") / 1024
    result = {"rank": rank, "param_mb": strategy.local_parameter_bytes(model) / 2**20, "peak_mb": peak,
              "after_setup_mb": torch.cuda.memory_allocated() / 2**20 if cuda else baseline_kb / 1024,
              "runtime_mb": 0.0 if cuda else runtime_kb / 1024,
              "setup_peak_mb": setup_peak_kb / 1024, "step_s": statistics.median(times)}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, result)
    if rank == 0:
        print("RESULT " + json.dumps(gathered), flush=True)
    dist.destroy_process_group()


def launch(args, strategy_name: str) -> list[dict]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    argv = [sys.executable, __file__, "--worker", "--strategy", strategy_name] + [
        f"--{key}={value}" for key, value in vars(args).items()
        if key not in ("worker", "strategy", "json") and value is not None]
    # glibc's mmap threshold held fixed (as bench_train_step.py): freed tensors go back to the OS, so RSS
    # tracks the tensors alive (with the adaptive default, process 0's freed load-time copy would stay resident)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": str(args.processes),
           "OMP_NUM_THREADS": str(args.threads), "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    procs = [subprocess.Popen(argv, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(args.processes)]
    outputs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"{strategy_name} failed:\n" + "\n".join(o[-3000:] for o in outputs))
    line = next(line for line in outputs[0].splitlines() if line.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_arguments(parser, layers=8, hidden=1024, intermediate=2752, vocab=8000, batch=2, seq=128,
                        batch_help="sequences per process")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--strategy", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    results = {name: launch(args, name) for name in ("ddp", "fsdp")}
    summary = {}
    for name, rows in results.items():  # max over processes; "peak - runtime": the model's own share of the peak
        for row in rows:
            row["peak_minus_runtime_mb"] = row["peak_mb"] - row["runtime_mb"]
        summary[name] = {key: max(r[key] for r in rows) for key in COLUMNS}
    ratios = {key: summary["fsdp"][key] / summary["ddp"][key] for key in summary["ddp"]}
    if args.json:
        print(json.dumps({"args": vars(args), "per_process": results, "max": summary, "fsdp_over_ddp": ratios}))
        return
    print(f"{args.processes} processes, {args.layers} x {args.hidden}/{args.intermediate}, vocab {args.vocab}, "
          f"{args.dtype}, NeuroAda k={args.k}, {args.batch} x {args.seq} tokens per process")
    print("| strategy | parameters MB | after set-up MB | peak MB (steps) | peak - runtime MB | set-up peak MB "
          "| step s |")
    print("|---|---|---|---|---|---|---|")
    for name, row in [*summary.items(), ("fsdp / ddp", ratios)]:
        digits = 3 if name == "fsdp / ddp" else 1
        print(f"| {name} | " + " | ".join(f"{row[key]:.{digits}f}" for key in COLUMNS[:-1])
              + f" | {row['step_s']:.3f} |")


if __name__ == "__main__":
    main()
