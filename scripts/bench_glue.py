"""GLUE speed on MiniLM, side by side: NeuroAda k=1, NeuroAda k=20, full fine-tuning, LoRA r=8.

Launch:  NEUROADA_DATA_DIR=/path/to/data python scripts/bench_glue.py [--task rte] [--json]

Each variant runs in its own subprocess (clean peak memory, no allocator or thread state carried over),
on the same examples: ``--steps`` timed optimizer steps (after one warm-up step) over length-bucketed
batches of ``--batch-size`` (the training code path: the sequence-classification kind's collate + loss_sum, AdamW over
the trainable parameters), then eval over ``--eval-examples`` validation examples with the code the
toolkit uses: the in-training selection eval (adapter not merged) and ``neuroada eval`` (merged,
eval.merge=true). Printed: examples/s, peak RSS of the process, trainable parameters, and ratios to
NeuroAda k=20. Timings on a shared machine vary; compare the ratios of one run.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = ("neuroada_k1", "neuroada_k20", "full", "lora_r8")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded:all-minilm-l6-v2")
    parser.add_argument("--task", default="rte")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--steps", type=int, default=8, help="timed optimizer steps")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--eval-examples", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def attach(variant: str, model, args):
    """The method exactly as ``neuroada train recipe=minilm_glue`` applies it (same composed config)."""
    from neuroada_cli import config
    from neuroada_cli.methods import get_method

    method = {"neuroada_k1": "neuroada", "neuroada_k20": "neuroada", "full": "full", "lora_r8": "lora"}[variant]
    overrides = [f"task=glue/{args.task}", f"model.name_or_path={args.model}", f"method={method}"]
    if method == "neuroada":
        overrides.append(f"neuroada.k={variant.rsplit('k', 1)[1]}")
    cfg = config.validate(config.compose("minilm_glue", overrides), world_size=1)
    return get_method(cfg.method).attach(cfg, model)


def worker(args) -> dict:
    import torch

    from neuroada_cli import unload
    from neuroada_cli.kinds.classification import SequenceClassification, predict_logits
    from neuroada_cli.models import load_model_and_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    # seed 42: the LoReFT selection part the in-training eval scores (the full train split needs no seed)
    kind = SequenceClassification(task=args.task, data_dir=None, max_length=args.max_length, train_limit=None,
                                  seed=42)
    model, tokenizer = load_model_and_tokenizer(args.model, kind=kind.name, **kind.model_options())
    train = kind.train_examples(tokenizer)
    # Length-bucketed batches as in training: sort a seeded sample by length, cut into batches.
    rng = random.Random(0)
    sample = sorted(rng.sample(train, min(len(train), args.batch_size * (args.steps + 1))),
                    key=lambda e: len(e["input_ids"]))
    batches = [sample[i:i + args.batch_size] for i in range(0, len(sample), args.batch_size)]
    rng.shuffle(batches)
    evaluation = kind.validation_examples(tokenizer)
    evaluation = (evaluation * (args.eval_examples // max(len(evaluation), 1) + 1))[:args.eval_examples]
    pad = tokenizer.pad_token_id

    model = attach(args.worker, model, args)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    model.train()
    examples_done, started = 0, None
    for number, batch_examples in enumerate(batches[: args.steps + 1]):
        if number == 1:
            started = time.perf_counter()  # step 0 is warm-up (allocations, first-call overheads)
        batch = kind.collate(batch_examples, pad)
        (kind.loss_sum(model, batch) / len(batch_examples)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        examples_done += len(batch_examples) if number else 0
    train_seconds = time.perf_counter() - started

    def eval_rate(current) -> float:
        predict_logits(current, evaluation[:8], pad, 8)  # warm-up
        begin = time.perf_counter()
        predict_logits(current, evaluation, pad, 64)
        return len(evaluation) / (time.perf_counter() - begin)

    unmerged = eval_rate(model)
    if args.worker.startswith("neuroada"):
        model = unload(model)
    elif hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    merged = eval_rate(model)
    return {
        "variant": args.worker, "train_examples_per_s": examples_done / train_seconds,
        "eval_unmerged_examples_per_s": unmerged, "eval_merged_examples_per_s": merged,
        "trainable_params": sum(p.numel() for p in trainable),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "train_tokens_per_batch": sum(len(e["input_ids"]) for b in batches[1:args.steps + 1] for e in b) / args.steps,
    }


def run_variant(variant: str, args) -> dict:
    command = [sys.executable, __file__, "--worker", variant, "--model", args.model, "--task", args.task,
               "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
               "--eval-examples", str(args.eval_examples)] + (["--threads", str(args.threads)] if args.threads else [])
    environment = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, capture_output=True, text=True, env=environment)
    if result.returncode != 0:
        raise SystemExit(f"variant {variant} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def table(rows: list[dict], args) -> str:
    reference = next((r for r in rows if r["variant"] == "neuroada_k20"), rows[0])
    head = (f"GLUE {args.task} on {args.model}: batch {args.batch_size}, max length {args.max_length}, "
            f"{args.steps} timed steps, {args.eval_examples} eval examples; ratios vs {reference['variant']}")
    lines = [head, f"{'variant':<14}{'trainable':>11}{'train ex/s':>12}{'x':>7}{'eval ex/s (unmerged)':>22}"
                   f"{'eval ex/s (merged)':>20}{'x':>7}{'peak RSS MiB':>14}"]
    for r in rows:
        lines.append(f"{r['variant']:<14}{r['trainable_params']:>11,}{r['train_examples_per_s']:>12.1f}"
                     f"{r['train_examples_per_s'] / reference['train_examples_per_s']:>7.2f}"
                     f"{r['eval_unmerged_examples_per_s']:>22.1f}{r['eval_merged_examples_per_s']:>20.1f}"
                     f"{r['eval_merged_examples_per_s'] / reference['eval_merged_examples_per_s']:>7.2f}"
                     f"{r['peak_rss_mib']:>14.0f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    rows = [run_variant(variant, args) for variant in variants]
    print(json.dumps({"settings": vars(args), "results": rows}, indent=2) if args.json else table(rows, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
