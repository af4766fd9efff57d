"""NeuroAda on a quantized base (issue 21): what 8 and 4 bits buy and cost, on SmolLM2-135M (embedded).

Four parts, each printing a table of ratios measured side by side in this run (other jobs may share the CPU
cores: the step-time ratios are medians of interleaved rounds, still read them as +-10 %):

  memory  the README's per-GPU memory formula for Llama-2 7B / 13B / 70B with bf16 and with nf4 weights
          (computed from the shapes, not measured).
  ties    for every all-linear layer: the share of rows whose k-th and (k+1)-th largest |W| tie, on the
          checkpoint's weights and on the dequantized nf4 / fp4 / int8 weights, and how many selected cells a
          selection on the dequantized weights shares with the one on the full-precision weights.
  step    peak memory and step time of the frozen base (input gradients only), NeuroAda k=1 / k=20 and QLoRA
          r=8 on fp32, bf16, int8 and nf4 bases, each variant in its own process, as ratios to the frozen base
          of the same precision; plus the weight bytes of each base as a ratio to fp32.
  train   a short NeuroAda k=20 training per precision through the CLI (same rows, same steps, same seed): its
          loss curve and validation loss.

  python scripts/bench_quantized.py                 # everything: tens of minutes on 2 CPU cores (4-bit matmuls
                                                    # dequantize every weight there); minutes on a GPU
  python scripts/bench_quantized.py --part ties --json
  python scripts/bench_quantized.py --part train --train-steps 24

Peak memory on a CPU is the RSS peak during the steps above the RSS after set-up (see bench_train_step.py, whose
measurement this reuses); on CUDA it is torch.cuda.max_memory_allocated above the allocation after set-up.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train_step import MMAP_THRESHOLD, reset_peak, rss_kb  # noqa: E402

MODEL = "embedded:smollm2-135m-instruct"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PRECISIONS = ("fp32", "bf16", "int8", "nf4")
# model.dtype and model.quantization of each precision; int8/nf4 compute in bf16 (the QLoRA recipe)
SETTINGS = {"fp32": ("float32", None), "bf16": ("bfloat16", None), "int8": ("bfloat16", "int8"),
            "nf4": ("bfloat16", "nf4"), "fp4": ("bfloat16", "fp4")}
VARIANTS = ("frozen", "neuroada_k1", "neuroada_k20", "qlora_r8")


def load(precision: str):
    from neuroada_cli.models import load_model_and_tokenizer

    dtype, quantization = SETTINGS[precision]
    return load_model_and_tokenizer(MODEL, dtype=dtype, quantization=quantization)


# ------------------------------------------------------------------------------------------------------ ties
def tie_share(weight, k: int) -> float:
    """Share of rows whose k-th and (k+1)-th largest |W| are equal (the k-th cell is then a tie-break)."""
    import torch

    top = torch.topk(weight.abs().float(), k + 1, dim=1).values
    return (top[:, k - 1] == top[:, k]).float().mean().item()


def shared_cells(a, b) -> int:
    """How many of the [d_out, k] cells ``a`` and ``b`` have in common (row by row)."""
    import torch

    width = int(max(a.max(), b.max())) + 1
    chosen = torch.zeros(a.shape[0], width, dtype=torch.bool).scatter_(1, a, True)
    return int(chosen.gather(1, b).sum())


def tie_table(ks: tuple[int, ...]) -> list[dict]:
    import torch

    from neuroada_cli.core import selection
    from neuroada_cli.core.model import find_targets
    from neuroada_cli.core.quantized import dequantized_weight
    from neuroada_cli.models import full_precision_weights

    rows = []
    reference = None
    for precision in ("fp32", "int8", "fp4", "nf4"):
        model, _ = load(precision) if precision != "fp32" else load("fp32")
        from neuroada_cli.core import NeuroAdaConfig

        targets = find_targets(model, NeuroAdaConfig(k=1, target_modules=TARGETS))
        if reference is None:  # the checkpoint's own (full-precision) weights, read as a quantized run reads them
            shapes = {name: (m.out_features, m.in_features) for name, m in targets.items()}
            stored = full_precision_weights(model.neuroada_checkpoint, shapes, torch.float32)
            reference = {name: stored[name] for name in shapes}
        weights = {name: dequantized_weight(module) for name, module in targets.items()}
        for k in ks:
            rows_total = sum(w.shape[0] for w in weights.values())
            tied = sum(tie_share(w, k) * w.shape[0] for w in weights.values()) / rows_total
            same = sum(shared_cells(selection.magnitude(weights[name], k), selection.magnitude(reference[name], k))
                       for name in weights)
            cells = sum(w.shape[0] * k for w in weights.values())
            rows.append({"weights": "checkpoint" if precision == "fp32" else f"dequantized {precision}", "k": k,
                         "rows with k-th = (k+1)-th": tied, "cells as full precision": same / cells})
        del model
    return rows


# ------------------------------------------------------------------------------------------------------ step
def attach(model, variant: str):
    from omegaconf import OmegaConf

    from neuroada_cli.methods import get_method

    if variant == "frozen":
        for param in model.parameters():
            param.requires_grad_(False)
        model.enable_input_require_grads()  # the floor: backward for input gradients only
        return model
    if variant.startswith("neuroada"):
        cfg = OmegaConf.create({"model": {"dtype": str(model.dtype).split(".")[-1]}, "neuroada": {
            "k": int(variant.split("k")[-1]), "target_modules": TARGETS, "selection": "magnitude", "train_bias": False,
            "modules_to_save": [], "seed": 0, "impl": "fused", "scope": "neuron", "neuron_fraction": 1.0,
            "mode": "auto"}})
        return get_method("neuroada").attach(cfg, model)
    cfg = OmegaConf.create({"lora": {"r": 8, "alpha": 16, "dropout": 0.0, "modules_to_save": None,
                                     "target_modules": TARGETS}, "task": {"kind": "causal_lm"}})
    return get_method("lora").attach(cfg, model)


def run_variant(args) -> dict:
    """One variant in this process: set-up, warm-up step, measured steps."""
    import torch

    torch.manual_seed(0)
    model, _ = load(args.precision)
    weight_bytes = model.get_memory_footprint()
    model = attach(model, args.variant)
    model.train()
    device = next(model.parameters()).device
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4) if trainable else None
    ids = torch.randint(0, 49152, (args.batch, args.seq), generator=torch.Generator().manual_seed(1)).to(device)

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: optimizer state, caches
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        baseline = rss_kb("VmRSS") * 1024
        reset_peak()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() if cuda else rss_kb("VmHWM") * 1024) - baseline
    return {"step_s": statistics.median(times), "peak_bytes": peak, "weight_bytes": weight_bytes,
            "trainable": sum(p.numel() for p in trainable)}


def step_table(args) -> list[dict]:
    runs: dict[tuple[str, str], list[dict]] = {}
    for _ in range(args.repeats):  # rounds interleaved, so a busy minute hits every variant alike
        for precision in args.precisions:
            for variant in VARIANTS:
                command = [sys.executable, __file__, "--one", variant, "--precision", precision, "--steps",
                           str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq)]
                env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD, "HF_HUB_OFFLINE": "1"}
                result = subprocess.run(command, capture_output=True, text=True, env=env)
                if result.returncode != 0:
                    raise SystemExit(f"{precision} {variant} failed:\n{result.stderr[-2000:]}")
                runs.setdefault((precision, variant), []).append(json.loads(result.stdout.strip().splitlines()[-1]))
    medians = {key: {field: statistics.median(r[field] for r in measured) for field in measured[0]}
               for key, measured in runs.items()}
    fp32_weights = medians[(args.precisions[0], "frozen")]["weight_bytes"]
    rows = []
    for (precision, variant), row in medians.items():
        floor = medians[(precision, "frozen")]
        rows.append({"base": precision, "variant": variant, "trainable": int(row["trainable"]),
                     "weights x fp32": row["weight_bytes"] / fp32_weights,
                     "step mem x frozen": row["peak_bytes"] / max(floor["peak_bytes"], 1),
                     "step time x frozen": row["step_s"] / floor["step_s"]})
    return rows


# ----------------------------------------------------------------------------------------------------- train
def train_table(args) -> list[dict]:
    """One short NeuroAda k=20 run per precision through the CLI; loss curve from its metrics log."""
    data = Path(os.environ.get("NEUROADA_DATA_DIR", "/work/shared/data"))
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for precision in args.precisions:
            dtype, quantization = SETTINGS[precision]
            out = Path(scratch) / precision
            overrides = [f"model.name_or_path={MODEL}", f"model.dtype={dtype}",
                         f"model.quantization={'null' if quantization is None else quantization}",
                         f"data.dir={data}", f"trainer.output_dir={out}", f"trainer.max_steps={args.train_steps}",
                         "trainer.batch_size=4", "trainer.micro_batch_size=4", "data.max_length=64",
                         "data.train_limit=240", "data.val_fraction=0.1", f"trainer.eval_every={args.train_steps}",
                         "neuroada.k=20", "optimizer.lr=2e-3", "trainer.checkpoint_every=0", "trainer.seed=0",
                         "eval.after_train=false", "trainer.log_every=1"]
            start = time.perf_counter()
            result = subprocess.run([sys.executable, "-m", "neuroada_cli", "train", *overrides], capture_output=True,
                                    text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            if result.returncode != 0:
                raise SystemExit(f"training on {precision} failed:\n{result.stderr[-2000:]}")
            losses, validation = read_losses(out)
            rows.append({"base": precision, "seconds": time.perf_counter() - start, "losses": losses,
                         "val_loss": validation})
    first = rows[0]["seconds"]
    for row in rows:
        row["time x " + rows[0]["base"]] = row.pop("seconds") / first
    return rows


def read_losses(run: Path) -> tuple[list[float], float | None]:
    """Training losses per step and the last validation loss, from the run's metrics log (JSON lines)."""
    losses, validation = [], None
    for line in (run / "train_log.jsonl").read_text().splitlines():
        record = json.loads(line)
        if isinstance(record.get("validation"), dict):
            metrics = record["validation"]
            validation = metrics.get("loss", next(iter(metrics.values()), None))
        elif "loss" in record:
            losses.append(record["loss"])
    return losses, validation


# ---------------------------------------------------------------------------------------------------- memory
# Llama-2 shapes: (layers, hidden, key/value width, intermediate, vocabulary); the README's 7B / 13B / 70B rows.
LLAMA_SHAPES = {"7B": (32, 4096, 4096, 11008, 32000), "13B": (40, 5120, 5120, 13824, 32000),
                "70B": (80, 8192, 1024, 28672, 32000)}
# nf4 with double quantization: 4 bits per weight + an 8-bit absmax per 64-weight block + an fp32 scale per 256
# blocks (bitsandbytes' defaults). Embeddings, the output head and norms stay in bf16 (2 B).
NF4_BYTES = (4 + 8 / 64 + 32 / (64 * 256)) / 8


def memory_table(k: int = 20) -> list[dict]:
    """The README's per-GPU formula (DDP: 2P + 30C bytes, bf16 weights) next to the same with 4-bit linear
    weights: 2 (P - L) + NF4_BYTES L + 30C, L = the parameters of the quantized linear layers. The 30 B per
    cell are unchanged: fp32 delta, gradient and AdamW moments (16), int64 column + bf16 original value (10),
    DDP gradient bucket (4). Activations, the CUDA context and workspaces are not included, as in the README."""
    rows = []
    for name, (layers, hidden, kv, intermediate, vocab) in LLAMA_SHAPES.items():
        linear = layers * (2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * intermediate)
        rows_out = layers * (2 * hidden + 2 * kv + 2 * intermediate + hidden)
        other = 2 * vocab * hidden + layers * 2 * hidden + hidden  # embeddings, head, norms
        total, cells = linear + other, rows_out * k
        bf16 = 2 * total + 30 * cells
        four = 2 * other + NF4_BYTES * linear + 30 * cells
        rows.append({"model": name, "params (B)": total / 1e9, "cells (M)": cells / 1e6,
                     "DDP bf16 (GB)": bf16 / 1e9, "DDP nf4 (GB)": four / 1e9, "nf4 x bf16": four / bf16})
    return rows


# ------------------------------------------------------------------------------------------------------ main
def print_table(rows: list[dict]) -> None:
    columns = list(rows[0])
    print(" | ".join(columns))
    for row in rows:
        cells = []
        for column in columns:
            value = row[column]
            if isinstance(value, float):
                cells.append(f"{value:.3f}")
            elif isinstance(value, list):
                cells.append(" ".join(f"{v:.2f}" for v in value))
            else:
                cells.append(str(value))
        print(" | ".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("memory", "ties", "step", "train", "all"), default="all")
    parser.add_argument("--precisions", default=",".join(PRECISIONS))
    parser.add_argument("--steps", type=int, default=2, help="measured steps per variant (step part)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--train-steps", type=int, default=8)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one variant in this process
    parser.add_argument("--precision", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.precisions = args.precisions.split(",")
    if args.one:
        args.variant = args.one
        print(json.dumps(run_variant(args)))
        return
    results = {"memory": memory_table()}
    if args.part in ("ties", "all"):
        results["ties"] = tie_table((1, 20))
    if args.part in ("step", "all"):
        results["step"] = step_table(args)
    if args.part in ("train", "all"):
        results["train"] = train_table(args)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    for part, rows in results.items():
        print(f"\n== {part}")
        print_table(rows)


if __name__ == "__main__":
    main()
