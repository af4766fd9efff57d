"""One training step on a GPU: step time and peak CUDA memory as ratios to the frozen floor, plus kernels.

The CUDA twin of bench_train_step.py (which measures RSS on CPU): a random Llama of the 7B shape cut to a
few layers (default 4 x 4096 / 11008, vocabulary 32000), bf16 weights, fp32 deltas, batch 8 x 512.

  floor      frozen base, backward for input gradients only, no optimizer
  neuroada   fused layer (W merged in place, sparse delta gradient), AdamW on the deltas (k=1 and k=20)
  reference  W + scatter(delta) materialised every forward (the authors' approach)
  lora       peft LoRA r=8 on the same modules

Every variant runs in this process one after another on a freshly built model; peak memory is
torch.cuda.max_memory_allocated during the measured steps above the allocation after set-up. Step time is
the median of --steps steps after --warmup, each closed by torch.cuda.synchronize(). --kernels also times
the delta-gradient kernels of method/layer.py (column path with several token blocks, sampled_addmm,
gather) against the dense dW = dY^T X on the same device, to choose the kernel and block sizes per device.

  python scripts/bench_gpu_step.py                     # all variants, the 7B-shaped defaults
  python scripts/bench_gpu_step.py --kernels --json
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import time

import torch

from bench_train_step import adapt, add_shape_arguments, llama_config  # scripts/ is on sys.path when a script runs

VARIANTS = [("floor", None), ("neuroada", 1), ("neuroada", 20), ("reference", 1), ("reference", 20), ("lora", None)]


def build(args, variant: str, k: int | None):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    config = llama_config(args)
    with torch.device(args.device):
        model = LlamaForCausalLM(config).to(getattr(torch, args.dtype))
    model.train()
    return adapt(model, variant, k)  # the same variants as the CPU step benchmark


def measured(args, variant: str, k: int | None) -> dict:
    """measure() in its own frame, then the freed blocks go back to CUDA before the next variant builds."""
    result = measure(args, variant, k)
    gc.collect()
    torch.cuda.empty_cache()
    return result


def measure(args, variant: str, k: int | None) -> dict:
    model = build(args, variant, k)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.0) if trainable else None
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1)).to(args.device)
    embeddings = model.get_input_embeddings()

    def step():
        if variant == "floor":
            loss = model(inputs_embeds=embeddings(ids).detach().requires_grad_(True), labels=ids).loss
        else:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() - baseline
    result = {"variant": variant, "k": k, "step_s": statistics.median(times), "peak_gb": peak / 2**30,
              "trainable": sum(p.numel() for p in trainable)}
    return result  # the model and its optimizer go with this frame; measured() empties the cache after


def time_cuda(fn, repeats: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def kernels(args) -> list[dict]:
    """Each delta-gradient kernel as a fraction of the dense dW, per layer shape and k (fp32 inputs)."""
    from neuroada_cli.core import sddmm as layer

    tokens, rows = args.batch * args.seq, []
    default_scratch = layer.COLUMN_SCRATCH_ELEMENTS
    for d_out, d_in in ((args.hidden, args.hidden), (args.intermediate, args.hidden), (args.hidden, args.intermediate)):
        grad = torch.randn(tokens, d_out, device=args.device)
        inputs = torch.randn(tokens, d_in, device=args.device)
        dense = time_cuda(lambda: grad.t() @ inputs, args.repeats)
        for k in (1, 2, 4, 8, 20):
            idx = torch.sort(torch.randint(0, d_in, (d_out, k), device=args.device), dim=1).values
            row = {"shape": f"{d_out}x{d_in}", "k": k, "dense_ms": 1000 * dense}
            blocks = {"columns_4M": 1 << 20, "columns_64M": 1 << 24, "columns_one_block": tokens * d_out}
            for key, scratch in blocks.items():  # fp32 scratch per token block: CPU-cache sized, large, all tokens
                layer.COLUMN_SCRATCH_ELEMENTS = scratch
                row[key] = time_cuda(lambda: layer.sddmm_columns(grad, inputs, idx), args.repeats) / dense
            layer.COLUMN_SCRATCH_ELEMENTS = default_scratch
            row["sampled_addmm"] = time_cuda(lambda: layer.sddmm_sparse(grad, inputs, idx), args.repeats) / dense
            row["gather"] = time_cuda(lambda: layer.sddmm_gather(grad, inputs, idx), args.repeats) / dense
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_arguments(parser, layers=4, hidden=4096, intermediate=11008, vocab=32000, batch=8, seq=512)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="kernel timings: median of this many")
    parser.add_argument("--kernels", action="store_true", help="also time the delta-gradient kernels")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--save", help="also write the JSON report to this file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu_step.py needs a CUDA device (see bench_train_step.py for CPU)")
    results = [measured(args, variant, k) for variant, k in VARIANTS]
    floor = results[0]
    for r in results:
        r["time_x_floor"], r["memory_x_floor"] = r["step_s"] / floor["step_s"], r["peak_gb"] / max(floor["peak_gb"], 1e-9)
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "args": vars(args), "steps": results}
    if args.kernels:
        report["kernels"] = kernels(args)
    if args.save:
        with open(args.save, "w") as handle:
            json.dump(report, handle, indent=1)
    if args.json:
        print(json.dumps(report, indent=1))
        return
    print(f"{report['device']}, torch {report['torch']}, {args.layers} x {args.hidden}/{args.intermediate}, "
          f"{args.dtype}, batch {args.batch} x {args.seq}")
    print("| variant | k | trainable | step s | step time x floor | peak GB | peak memory x floor |\n|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['variant']} | {r['k'] or '-'} | {r['trainable']:,} | {r['step_s']:.4f} | {r['time_x_floor']:.3f} "
              f"| {r['peak_gb']:.2f} | {r['memory_x_floor']:.3f} |")
    for row in report.get("kernels", []):
        print(json.dumps(row))


if __name__ == "__main__":
    main()
