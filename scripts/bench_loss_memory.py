"""Peak memory and time of one training step (forward + backward): trainer.cross_entropy=plain vs chunked.

    python scripts/bench_loss_memory.py                      # 2,048 and 8,192 target tokens, 49k and 128k vocab
    python scripts/bench_loss_memory.py --targets 2048 --layers 30

Model: SmolLM2-135M (embedded:smollm2-135m-instruct, 49,152-token vocabulary, tied head) with its first
``--layers`` decoder blocks (the loss's share of a step is what changes; fewer blocks keep the run to minutes
on 2 cores: say how many in any table you quote), and the same model with a random untied 128,256 x 576 head
(a Llama-3-sized vocabulary). fp32 on the CPU; the base is frozen and the RMSNorm weights train (a stand-in
for a small adapter: the backward runs through every block, no vocab-sized weight gradient). Every token of
rows of ``--row`` tokens is a target except each row's first, so 2,048 targets = 4 rows of 513 tokens.

Peak memory (CPU): torch has no CPU allocator statistics and tracemalloc does not see its allocations, so each
variant runs in a FRESH subprocess and reads the kernel's resident-set high-water mark (VmHWM in
/proc/self/status): it is reset (``echo 5 > /proc/self/clear_refs``) after the model is loaded and the batch
built, and the step's peak is VmHWM after the step minus VmRSS before it. Large tensors are mmap-ed by the
allocator (glibc's mmap threshold held at 128 KiB, ``MALLOC_MMAP_THRESHOLD_``) and returned to the kernel
when freed, so this follows live tensors closely; each subprocess does one
step only (after an 8-token warm-up), so nothing is cached between variants. On CUDA (``--device cuda``) torch's own
``max_memory_allocated`` is used instead. Step time is measured in the same subprocess (one step after the
warm-up); other jobs share the cores, so read the ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def build_model(vocab: str, layers: int, device: str):
    import torch
    from transformers import AutoModelForCausalLM

    from neuroada_cli.models.cache import cached_checkpoint, resolve_model_source

    path = cached_checkpoint(resolve_model_source("embedded:smollm2-135m-instruct"))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation="sdpa")
    model.model.layers = model.model.layers[:layers]
    model.config.num_hidden_layers = layers
    if vocab == "128k":  # a random untied head of Llama 3's vocabulary size
        torch.manual_seed(0)
        model.lm_head = torch.nn.Linear(model.config.hidden_size, 128_256, bias=False)
        model.config.tie_word_embeddings = False
        model.config.vocab_size = 128_256
    model.requires_grad_(False)
    for name, parameter in model.named_parameters():
        if "norm" in name:
            parameter.requires_grad_(True)
    return model.to(device).train()


def worker(args) -> dict:
    import torch

    from neuroada_cli.kinds.causal_lm import CausalLM

    torch.manual_seed(0)
    model = build_model(args.vocab, args.layers, args.device)
    rows = args.targets // (args.row - 1)
    vocab_in = model.get_input_embeddings().weight.shape[0]
    out_vocab = model.get_output_embeddings().weight.shape[0]
    input_ids = torch.randint(0, vocab_in, (rows, args.row), device=args.device)
    labels = torch.randint(0, out_vocab, (rows, args.row), device=args.device)
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
    kind = CausalLM(train_dataset="unused", data_dir=None, template="alpaca", max_length=args.row,
                    train_limit=None, seed=0, cross_entropy=args.impl)
    kind.prepare_model(model)
    warm = {key: value[:1, :8] for key, value in batch.items()}  # first-call costs (threads, kernels) go here
    kind.loss_sum(model, warm).backward()
    model.zero_grad(set_to_none=True)
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = rss_kib("VmRSS") * 1024
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # reset VmHWM to the current RSS
    start = time.perf_counter()
    loss = kind.loss_sum(model, batch)
    loss.backward()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() if cuda else rss_kib("VmHWM") * 1024) - before
    return {"peak_bytes": peak, "seconds": seconds, "loss": loss.item(), "targets": int((labels[:, 1:] >= 0).sum())}


def too_big_for_this_machine(vocab: str, targets: int, impl: str) -> str | None:
    """A reason to skip a CPU variant whose plain fp32 logits (~3 copies of [targets x vocab]) would not fit in
    70% of the memory available now (the machine is shared: an out-of-memory kill may hit someone else's job)."""
    if impl != "plain":
        return None
    need = 3 * targets * (128_256 if vocab == "128k" else 49_152) * 4 + 2**30
    with open("/proc/meminfo") as meminfo:
        available = next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:"))
    if need > 0.7 * available:
        return f"plain needs ~{need / 2**30:.0f} GiB, {available / 2**30:.0f} GiB available"
    return None


def run_variant(args, vocab: str, targets: int, impl: str) -> dict:
    command = [sys.executable, __file__, "--worker", "--vocab", vocab, "--targets", str(targets), "--impl", impl,
               "--layers", str(args.layers), "--row", str(args.row), "--device", args.device]
    # glibc's mmap threshold held fixed (as bench_train_step.py): by default it adapts to freed blocks and
    # freed tensors then stay in the heap, so RSS would count tensors already freed.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    result = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if result.returncode != 0:
        raise SystemExit(f"variant {vocab}/{targets}/{impl} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", default="2048,8192", help="comma-separated target-token counts")
    parser.add_argument("--vocabs", default="49k,128k", help="49k (SmolLM2's head) and/or 128k (random head)")
    parser.add_argument("--layers", type=int, default=2, help="decoder blocks kept (SmolLM2 has 30)")
    parser.add_argument("--row", type=int, default=513, help="tokens per row (row - 1 targets each)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--vocab", help=argparse.SUPPRESS)
    parser.add_argument("--impl", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.targets = int(args.targets)
        print(json.dumps(worker(args)))
        return
    from neuroada_cli.kinds.losses import CHUNK_BYTES

    print(f"one training step, SmolLM2-135M with {args.layers} decoder block(s), fp32, {args.device}, rows of "
          f"{args.row} tokens; chunk = {CHUNK_BYTES // 2**20} MiB of fp32 logits; each variant in a fresh process")
    print(f"{'vocab':>6} {'targets':>8} {'plain peak MiB':>15} {'chunked peak MiB':>17} "
          f"{'memory chunked/plain':>21} {'time chunked/plain':>19} {'|loss diff| rel':>16}")
    for vocab in args.vocabs.split(","):
        for targets in (int(t) for t in args.targets.split(",")):
            chunked = run_variant(args, vocab, targets, "chunked")
            skip = args.device == "cpu" and too_big_for_this_machine(vocab, targets, "plain")
            if skip:
                print(f"{vocab:>6} {chunked['targets']:>8} {'skipped':>15} {chunked['peak_bytes'] / 2**20:>17.0f}"
                      f"   plain skipped: {skip}", flush=True)
                continue
            plain = run_variant(args, vocab, targets, "plain")
            diff = abs(chunked["loss"] - plain["loss"]) / abs(plain["loss"])
            print(f"{vocab:>6} {plain['targets']:>8} {plain['peak_bytes'] / 2**20:>15.0f} "
                  f"{chunked['peak_bytes'] / 2**20:>17.0f} {chunked['peak_bytes'] / plain['peak_bytes']:>21.3f} "
                  f"{chunked['seconds'] / plain['seconds']:>19.2f} {diff:>16.1e}", flush=True)


if __name__ == "__main__":
    main()
