"""Packing vs length bucketing on the real length distributions: padding share, forwards and tokens/s.

    python scripts/bench_packing.py                       # commonsense_15k and math_10k, SmolLM2 tokenizer
    python scripts/bench_packing.py --steps 0             # padding only (no model, seconds)

Data: the LLM-Adapters sets under $NEUROADA_DATA_DIR (else the packaged sample), tokenised exactly as training
does (kinds/causal_lm.py, SmolLM2's tokenizer, ``--max-length`` 512 as configs/data/default.yaml), global
batches of ``--batch-size`` 16 and micro-batches of ``--micro-batch-size`` 4 (the defaults).

Padding share (whole epoch, no model): the share of the micro-batch tensors' cells that are padding.
bucketed = today (data.bucket_batches=32, micro-batches of 4 examples right-padded to the longest);
packed = data.packing=true (the same global batches, micro-batches of up to 4 rows of max_length, each as wide
as its widest row); packed, shuffled = packing with bucket_batches=1 (lengths mixed in a batch fill rows better).
"forwards/step" = micro-batches per optimizer step (one forward + backward each).

tokens/s: ``--steps`` optimizer steps of each layout after one warm-up step each, the layouts taking turns step
by step in this process (the same global batches), on SmolLM2-135M with
its first ``--layers`` blocks (fp32, CPU, frozen base, RMSNorm weights training, chunked loss); real (non-pad)
tokens per second, as the ratio packed / bucketed. Other jobs share the cores: read the ratios.
"""
from __future__ import annotations

import argparse
import os
import time


def load_examples(dataset: str, tokenizer, max_length: int, limit: int | None):
    from neuroada_cli.kinds.causal_lm import CausalLM

    template = "commonsense" if "commonsense" in dataset else "alpaca"
    kind = CausalLM(train_dataset=dataset, data_dir=os.environ.get("NEUROADA_DATA_DIR"), template=template,
                    max_length=max_length, train_limit=limit, seed=0)
    return kind.train_examples(tokenizer)


def layout_stats(plan, micro_batch_size: int, max_length: int, packed: bool) -> dict:
    """Tokens, tensor cells and forwards over one epoch of ``plan`` (one process)."""
    from neuroada_cli.data.packing import balanced_rows

    tokens = cells = forwards = 0
    for step in range(plan.steps_per_epoch):
        for chunk in plan.micro_batches(step, 0, 1, micro_batch_size):
            lengths = [plan.lengths[i] for i in chunk]
            tokens += sum(lengths)
            forwards += 1
            if packed:
                rows = balanced_rows(lengths, max_length)
                cells += len(rows) * max(sum(lengths[p] for p in row) for row in rows)
            else:
                cells += len(lengths) * max(lengths)
    return {"padding": 1 - tokens / cells, "forwards_per_step": forwards / plan.steps_per_epoch}


def small_model(layers: int):
    import torch
    from transformers import AutoModelForCausalLM

    from neuroada_cli.models.cache import cached_checkpoint, resolve_model_source

    path = cached_checkpoint(resolve_model_source("embedded:smollm2-135m-instruct"))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation="sdpa")
    model.model.layers = model.model.layers[:layers]
    model.config.num_hidden_layers = layers
    model.requires_grad_(False)
    for name, parameter in model.named_parameters():
        if "norm" in name:
            parameter.requires_grad_(True)
    return model.train()


def tokens_per_second(model, examples, plans: dict, micro_batch_size: int, steps: int, max_length: int,
                      pad_id: int) -> dict:
    """Real tokens per second of each layout in ``plans`` ({name: (plan, packing)}): one untimed warm-up step
    each, then the layouts take turns step by step (so a slower moment of the shared machine hits both)."""
    from neuroada_cli.kinds.causal_lm import CausalLM

    kinds = {}
    for name, (plan, packing) in plans.items():
        kinds[name] = CausalLM(train_dataset="unused", data_dir=None, template="alpaca", max_length=max_length,
                               train_limit=None, seed=0, cross_entropy="chunked", packing=packing)
        kinds[name].prepare_model(model)
    weights = [kinds["bucketed"].weight(example) for example in examples]
    tokens, seconds = dict.fromkeys(plans, 0), dict.fromkeys(plans, 0.0)
    for step in range(steps + 1):  # step 0: warm-up, not counted
        for name, (plan, _) in plans.items():
            global_batch = plan.global_batch(step)
            weight = sum(weights[i] for i in global_batch)
            start = time.perf_counter()
            for chunk in plan.micro_batches(step, 0, 1, micro_batch_size):
                batch = kinds[name].collate([examples[i] for i in chunk], pad_id)
                (kinds[name].loss_sum(model, batch) / weight).backward()
            model.zero_grad(set_to_none=True)
            if step:
                seconds[name] += time.perf_counter() - start
                tokens[name] += sum(plan.lengths[i] for i in global_batch)
    return {name: tokens[name] / seconds[name] for name in plans}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="commonsense_15k,math_10k")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--limit", type=int, default=None, help="rows per data set (default: all)")
    parser.add_argument("--steps", type=int, default=4, help="timed optimizer steps per layout (0: padding only)")
    parser.add_argument("--layers", type=int, default=4, help="SmolLM2 decoder blocks kept for the timing")
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer

    from neuroada_cli.data.batching import BatchPlan
    from neuroada_cli.models.cache import cached_checkpoint, resolve_model_source

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(
        str(cached_checkpoint(resolve_model_source("embedded:smollm2-135m-instruct"))))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model = small_model(args.layers) if args.steps else None
    print(f"max_length {args.max_length}, batch {args.batch_size}, micro-batch {args.micro_batch_size} "
          f"(examples unpacked, rows packed); timing: SmolLM2-135M with {args.layers} blocks, fp32, CPU, "
          f"{args.steps} steps per layout")
    print(f"{'data set':>16} {'examples':>8} {'mean len':>8} {'layout':>16} {'padding':>8} {'forwards/step':>14} "
          f"{'tokens/s vs bucketed':>21}")
    for dataset in args.datasets.split(","):
        examples = load_examples(dataset, tokenizer, args.max_length, args.limit)
        lengths = [len(example["input_ids"]) for example in examples]
        layouts = {"bucketed": BatchPlan(lengths, args.batch_size, 0, 32),
                   "packed": BatchPlan(lengths, args.batch_size, 0, 32, pack_length=args.max_length),
                   "packed, shuffled": BatchPlan(lengths, args.batch_size, 0, 1, pack_length=args.max_length)}
        speed = {}
        if args.steps:
            timed = {"bucketed": (layouts["bucketed"], False), "packed": (layouts["packed"], True)}
            speed = tokens_per_second(model, examples, timed, args.micro_batch_size, args.steps, args.max_length,
                                      pad_id)
        for name, plan in layouts.items():
            stats = layout_stats(plan, args.micro_batch_size, args.max_length, name != "bucketed")
            ratio = f"{speed[name] / speed['bucketed']:.2f}" if name in speed else "-"
            print(f"{dataset:>16} {len(examples):>8} {sum(lengths) / len(lengths):>8.0f} {name:>16} "
                  f"{stats['padding']:>8.1%} {stats['forwards_per_step']:>14.2f} {ratio:>21}", flush=True)


if __name__ == "__main__":
    main()
