"""One DPO step against one supervised step: time and peak memory as ratios, NeuroAda against LoRA.

Every (method, step) runs in its own process on the same random Llama (SmolLM2-135M's width: 576 / 1536,
9 heads, 3 key/value heads, vocabulary 49152; --layers of its 30 blocks) and the same data:

  sft   B examples prompt + chosen, the loss on the completion (kinds/causal_lm.py's loss_sum), AdamW step
  dpo   the B pairs (2B rows: chosen and rejected), the reference pass with the adapter disabled (no grad), the
        policy pass, DPO loss (kinds/preference.py's loss_sum), AdamW step

Methods: NeuroAda k=20 (inject, fused) and LoRA r=8 (peft), on all seven projections. Step time: median of
--steps after --warmup, default allocator; peak memory: peak RSS during one step above the RSS after set-up,
glibc's mmap threshold held fixed (see bench_train_step.py, whose helpers this uses). --repeats R interleaves R
rounds (medians). Only ratios are printed: DPO / SFT per method, and NeuroAda / LoRA per step kind.

  python scripts/bench_dpo.py                  # 4 layers, 4 pairs of 96 + 32 tokens, 2 rounds
  python scripts/bench_dpo.py --layers 2 --repeats 1 --json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train_step import MMAP_THRESHOLD, TARGETS, reset_peak, rss_kb

METHODS = ("neuroada", "lora")
STEPS = ("sft", "dpo")


def build(args):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=args.layers,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=1024,
                         tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    if args.method == "neuroada":
        from neuroada_cli import NeuroAdaConfig, inject

        model = inject(model, NeuroAdaConfig(k=20, target_modules=TARGETS))
    else:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS))
    return model.train()


def data(args):
    """B pairs: a shared random prompt, two different random completions (the same tokens for both step kinds)."""
    import torch

    generator = torch.Generator().manual_seed(1)
    tokens = lambda n: torch.randint(3, 49152, (n,), generator=generator).tolist()
    return [{"prompt_ids": tokens(args.prompt), "chosen_ids": tokens(args.completion),
             "rejected_ids": tokens(args.completion)} for _ in range(args.pairs)]


def run_one(args) -> dict:
    import torch

    from neuroada_cli.kinds.causal_lm import CausalLM
    from neuroada_cli.kinds.preference import Preference, collate_pairs

    torch.set_num_threads(args.threads)
    model = build(args)
    pairs = data(args)
    common = {"train_dataset": "unused", "data_dir": None, "template": "commonsense", "max_length": 1024,
              "train_limit": None, "seed": 0}
    if args.kind == "dpo":
        kind = Preference(**common)
        batch = collate_pairs(pairs, 0)
    else:
        kind = CausalLM(**common)
        ids = torch.tensor([p["prompt_ids"] + p["chosen_ids"] for p in pairs])
        labels = ids.clone()
        labels[:, :args.prompt] = -100
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    kind.prepare_model(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        kind.loss_sum(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times = []
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            baseline = rss_kb("VmRSS")
            reset_peak()
        start = time.perf_counter()
        step()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    return {"step_s": statistics.median(times), "peak_mb": (rss_kb("VmHWM") - baseline) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=96)
    parser.add_argument("--completion", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--kind", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.method:
        print(json.dumps(run_one(args)))
        return
    common = [f"--{name}={getattr(args, name)}" for name in
              ("layers", "pairs", "prompt", "completion", "threads", "steps", "warmup")]
    runs = {(method, kind): [] for method in METHODS for kind in STEPS}
    for round_ in range(args.repeats):  # interleaved: a change of load hits every variant alike
        for (method, kind), measured in runs.items():
            command = [sys.executable, __file__, "--method", method, "--kind", kind] + common
            timed = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            sized = subprocess.run(command + ["--steps=1"], check=True, capture_output=True, text=True,
                                   env={**os.environ, "MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD}).stdout
            timed, sized = (json.loads(out.strip().splitlines()[-1]) for out in (timed, sized))
            measured.append({"step_s": timed["step_s"], "peak_mb": sized["peak_mb"]})
            print(f"  round {round_ + 1}/{args.repeats}: {method} {kind}", file=sys.stderr)
    median = {key: {field: statistics.median(r[field] for r in values) for field in ("step_s", "peak_mb")}
              for key, values in runs.items()}
    rows = []
    for method in METHODS:
        sft, dpo = median[(method, "sft")], median[(method, "dpo")]
        rows.append({"method": method, "dpo_time_x_sft": dpo["step_s"] / sft["step_s"],
                     "dpo_memory_x_sft": dpo["peak_mb"] / sft["peak_mb"],
                     "sft_time_x_lora": sft["step_s"] / median[("lora", "sft")]["step_s"],
                     "dpo_time_x_lora": dpo["step_s"] / median[("lora", "dpo")]["step_s"],
                     "sft_memory_x_lora": sft["peak_mb"] / median[("lora", "sft")]["peak_mb"],
                     "dpo_memory_x_lora": dpo["peak_mb"] / median[("lora", "dpo")]["peak_mb"]})
    setup = {name: getattr(args, name) for name in ("layers", "pairs", "prompt", "completion", "threads", "steps",
                                                    "repeats")}
    if args.json:
        print(json.dumps({"setup": setup, "rows": rows}, indent=2))
        return
    print(f"DPO step vs supervised step, SmolLM2-width random Llama, fp32 CPU, {setup}")
    print("| method | DPO time x SFT | DPO peak memory x SFT | SFT time x LoRA | DPO time x LoRA | "
          "SFT memory x LoRA | DPO memory x LoRA |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['method']} | {row['dpo_time_x_sft']:.2f} | {row['dpo_memory_x_sft']:.2f} | "
              f"{row['sft_time_x_lora']:.2f} | {row['dpo_time_x_lora']:.2f} | {row['sft_memory_x_lora']:.2f} | "
              f"{row['dpo_memory_x_lora']:.2f} |")


if __name__ == "__main__":
    main()
