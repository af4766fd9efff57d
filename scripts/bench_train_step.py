"""Step time and peak memory of one training step, NeuroAda against its alternatives.

Every variant runs in its own process on the same random Llama and batch, and is reported as a ratio
to the floor: the frozen model with input gradients only (the least any adapter method must pay).

  floor      frozen base, backward for input gradients only, no optimizer
  neuroada   ours: fused layer (W kept merged in place, sparse delta gradient), AdamW on the deltas
  neuroada_peft  the same through PEFT: get_peft_model(model, NeuroAdaPeftConfig(...)) (target: within 3 %
             of neuroada, column "step x inject")
  reference  NeuroAda materialising W + scatter(delta) every forward (the authors' approach)
  masked     in-place sparse tuning: full W trainable, gradient masked to the selected cells, AdamW on W
  lora       peft LoRA, r=8, on the same target modules

Step time is the median over the measured steps, in a process with the default allocator. Peak
memory is the peak RSS during the steps above the RSS right after set-up (Linux: VmHWM is reset
through /proc/self/clear_refs), measured in a separate process whose glibc mmap threshold is fixed
(MALLOC_MMAP_THRESHOLD_): with glibc's default, the threshold adapts to freed blocks, freed tensors
stay in the heap and the RSS peak swings by +-10 % with allocation history; fixed, every tensor is
returned on free and the RSS peak tracks the tensors alive at once. With --repeats R every variant
is measured R times, rounds interleaved, and medians are reported. Usage:

  python scripts/bench_train_step.py                      # defaults of the issue: 4 x 2048/5504, 4 x 256
  python scripts/bench_train_step.py --layers 2 --hidden 512 --intermediate 1376 --json
  python scripts/bench_train_step.py --only neuroada,neuroada_peft --k 20   # a subset (the floor always runs)
  python scripts/bench_train_step.py --model embedded:smollm2-135m-instruct --batch 8 --seq 128  # a real model
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

MMAP_THRESHOLD = str(128 * 1024)  # glibc's initial default, held fixed
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def add_shape_arguments(parser, *, layers: int, hidden: int, intermediate: int, vocab: int, batch: int, seq: int,
                        batch_help: str | None = None) -> None:
    """--layers ... --seq: the Llama-shaped model and batch every step benchmark builds (each has its own size)."""
    for name, default in (("layers", layers), ("hidden", hidden), ("intermediate", intermediate), ("vocab", vocab)):
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--batch", type=int, default=batch, help=batch_help)
    parser.add_argument("--seq", type=int, default=seq)


def llama_config(args, head_dim: int = 128, **extra):
    """The LlamaConfig of those arguments (heads = hidden // head_dim, as many key/value heads)."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                       num_hidden_layers=args.layers, num_attention_heads=args.hidden // head_dim,
                       num_key_value_heads=args.hidden // head_dim, max_position_embeddings=args.seq, **extra)


def rss_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def adapt(model, variant: str, k: int | None):
    """The model as one benchmark variant trains it: floor (frozen, input grads only), neuroada / reference
    (fused / materialising), neuroada_peft, masked in-place sparse tuning, or PEFT LoRA r=8. Also used by
    bench_gpu_step.py."""
    import torch

    if variant == "floor":
        for p in model.parameters():
            p.requires_grad_(False)
    elif variant in ("neuroada", "reference"):
        from neuroada_cli import NeuroAdaConfig, inject

        inject(model, NeuroAdaConfig(k=k, target_modules=TARGETS, impl="fused" if variant == "neuroada" else "reference"))
    elif variant == "neuroada_peft":
        from peft import get_peft_model

        from neuroada_cli import NeuroAdaPeftConfig

        model = get_peft_model(model, NeuroAdaPeftConfig(k=k, target_modules=TARGETS))
    elif variant == "masked":
        from neuroada_cli.core import selection

        for p in model.parameters():
            p.requires_grad_(False)
        for name, module in model.named_modules():
            if name.rsplit(".", 1)[-1] in TARGETS:
                idx = selection.magnitude(module.weight, k)
                mask = torch.zeros_like(module.weight, dtype=torch.bool)
                mask.scatter_(1, idx, True)
                module.weight.requires_grad_(True)
                module.weight.register_hook(lambda grad, mask=mask: grad * mask)
    elif variant == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS))
    else:
        raise SystemExit(f"unknown variant {variant}")
    return model


def run_variant(args) -> dict:
    import torch
    from transformers import LlamaForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.model:  # a real checkpoint (e.g. the embedded SmolLM2: 576/1536-wide layers, 30 blocks)
        from neuroada_cli.models.loading import load_model_and_tokenizer

        model, _ = load_model_and_tokenizer(args.model)
    else:
        model = LlamaForCausalLM(llama_config(args))
    model.train()
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    variant, k = args.variant, args.k[0]
    optimizer = None
    model = adapt(model, variant, k)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if trainable:
        optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.0)
    embeddings = model.get_input_embeddings()

    def step():
        if variant == "floor":
            embeds = embeddings(ids).detach().requires_grad_(True)
            loss = model(inputs_embeds=embeds, labels=ids).loss
        else:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    baseline = rss_kb("VmRSS")
    reset_peak()
    times = []
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        step()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    peak = rss_kb("VmHWM") - baseline
    return {"variant": variant, "k": k if variant not in ("floor", "lora") else None,
            "step_s": statistics.median(times), "peak_mb": peak / 1024,
            "trainable": sum(p.numel() for p in trainable)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_arguments(parser, layers=4, hidden=2048, intermediate=5504, vocab=32000, batch=4, seq=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", help="a model to load instead of the random Llama (e.g. "
                                        "embedded:smollm2-135m-instruct); --layers/--hidden/... are then ignored")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--k", type=int, nargs="+", default=[1, 20])
    parser.add_argument("--repeats", type=int, default=2, help="measure every variant this many times")
    parser.add_argument("--only", help="comma-separated variants to measure (the floor always runs)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    plan = [("floor", 0)]
    for k in args.k:
        plan += [("neuroada", k), ("neuroada_peft", k), ("reference", k), ("masked", k)]
    plan.append(("lora", 0))
    if args.only:
        wanted = set(args.only.split(","))
        plan = [(v, k) for v, k in plan if v == "floor" or v in wanted]
    common = [f"--{name}={getattr(args, name)}" for name in
              ("layers", "hidden", "intermediate", "vocab", "batch", "seq", "threads", "steps", "warmup")]
    common += [f"--model={args.model}"] if args.model else []
    runs = {plan_key: [] for plan_key in plan}
    for round_ in range(args.repeats):  # interleaved rounds: a load change hits every variant alike
        for variant, k in plan:
            command = [sys.executable, __file__, "--variant", variant, "--k", str(k or 1)] + common
            timed = subprocess.run(command, check=True, capture_output=True, text=True, env=os.environ).stdout
            memory_env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD}
            sized = subprocess.run(command + ["--steps=1"], check=True, capture_output=True, text=True,
                                   env=memory_env).stdout  # the peak is reached within a step
            timed, sized = (json.loads(out.strip().splitlines()[-1]) for out in (timed, sized))
            runs[(variant, k)].append({**timed, "peak_mb": sized["peak_mb"]})
            print(f"  round {round_ + 1}/{args.repeats}: measured {variant} k={k or '-'}", file=sys.stderr)
    results = [{**measured[0], "step_s": statistics.median(r["step_s"] for r in measured),
                "peak_mb": statistics.median(r["peak_mb"] for r in measured)} for measured in runs.values()]
    floor = results[0]
    for row in results:
        row["time_x_floor"] = row["step_s"] / floor["step_s"]
        row["mem_x_floor"] = row["peak_mb"] / floor["peak_mb"]
        masked = next((r for r in results if r["variant"] == "masked" and r["k"] == row["k"]), None)
        row["mem_x_masked"] = (row["peak_mb"] / masked["peak_mb"]
                               if masked and row["variant"] in ("neuroada", "neuroada_peft") else None)
        inject = next((r for r in results if r["variant"] == "neuroada" and r["k"] == row["k"]), None)
        row["time_x_inject"] = row["step_s"] / inject["step_s"] if inject and row["variant"] == "neuroada_peft" else None
    shape = ("batch", "seq") if args.model else ("layers", "hidden", "intermediate", "vocab", "batch", "seq")
    setup = {k: getattr(args, k) for k in (*shape, "threads", "steps", "repeats")}
    if args.json:
        print(json.dumps({"setup": setup, "results": results}, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"train step, {args.model or 'random Llama'} {setup}, fp32 CPU")
    for column in ("variant", "k", "trainable", "step x floor", "peak mem x floor", "mem x masked", "step x inject"):
        table.add_column(column, justify="right")
    for row in results:
        table.add_row(row["variant"], str(row["k"] or "-"), f"{row['trainable']:,}", f"{row['time_x_floor']:.3f}",
                      f"{row['mem_x_floor']:.3f}", f"{row['mem_x_masked']:.3f}" if row["mem_x_masked"] else "",
                      f"{row['time_x_inject']:.3f}" if row["time_x_inject"] else "")
    Console().print(table)


if __name__ == "__main__":
    main()
