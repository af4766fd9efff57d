"""How long switching between task adapters on one loaded base takes, NeuroAda against the alternatives.

On SmolLM2-135M-Instruct (the embedded checkpoint, fp32), all seven projections, in one process:

  neuroada set_adapter (same cells)   N NeuroAda adapters (k=20, magnitude selection: same cells on the same
                                      base, so they share indices); a switch rewrites d_out x k cells per layer
  neuroada set_adapter (other cells)  the next adapter selected other cells (random): restore, then write
  lora set_adapter                    PEFT LoRA (r=8) adapters loaded under names; a switch flips flags, but
                                      every forward then pays the extra low-rank matmuls
  lora hotswap_adapter                peft.utils.hotswap: read a saved LoRA adapter and copy it in place
  reload model + adapter              load the base again and apply a NeuroAda adapter from disk

Each is reported in ms, as a ratio to the NeuroAda switch and to one forward pass of the base on 512
tokens (target for NeuroAda: under a tenth of it), with what a forward costs afterwards (LoRA keeps its
extra low-rank matmuls; NeuroAda's forward is the base's). The outputs after each switch are checked
against the adapter loaded alone. Usage: ``OMP_NUM_THREADS=1 python scripts/bench_switch.py``.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

MODEL = "embedded:smollm2-135m-instruct"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def timed(action, repeats: int) -> float:
    """Median wall time of ``action()`` in milliseconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def load_base():
    from neuroada_cli.models import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(MODEL)
    return model.eval()


def randomize(model, adapter: str, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(f".{adapter}") and ("neuroada_delta" in name or "lora_B" in name):
                param.copy_(torch.randn(param.shape, generator=generator) * 1e-2)


def neuroada_adapters(folder: Path, count: int) -> dict[str, Path]:
    """Save ``count`` NeuroAda adapters trained (here: randomised) on the base; the last selects other cells."""
    from peft import get_peft_model

    from neuroada_cli import NeuroAdaPeftConfig

    dirs = {}
    for i in range(count):
        selection = "random" if i == count - 1 else "magnitude"
        model = get_peft_model(load_base(), NeuroAdaPeftConfig(k=20, target_modules=TARGETS, selection=selection))
        randomize(model, "default", seed=i)
        dirs[f"task{i}"] = folder / f"neuroada{i}"
        model.save_pretrained(dirs[f"task{i}"])
    return dirs


def lora_adapters(folder: Path, count: int) -> dict[str, Path]:
    from peft import LoraConfig, get_peft_model

    dirs = {}
    base = load_base()
    for i in range(count):
        model = get_peft_model(base, LoraConfig(r=8, target_modules=TARGETS, init_lora_weights=False))
        randomize(model, "default", seed=i)
        dirs[f"task{i}"] = folder / f"lora{i}"
        model.save_pretrained(dirs[f"task{i}"])
        base = model.unload()
    return dirs


def load_all(dirs: dict[str, Path]):
    from peft import PeftModel

    names = list(dirs)
    model = PeftModel.from_pretrained(load_base(), dirs[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(dirs[name], adapter_name=name)
    return model.eval()


def main() -> None:
    from peft import PeftModel
    from peft.utils.hotswap import hotswap_adapter

    import neuroada_cli  # noqa: F401  (registers NeuroAda with PEFT)

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=3, help="adapters per model (the last selects other cells)")
    parser.add_argument("--repeats", type=int, default=20, help="switches measured per variant (median)")
    parser.add_argument("--tokens", type=int, default=512, help="tokens of the reference forward pass")
    args = parser.parse_args()
    torch.manual_seed(0)
    inputs = torch.randint(0, 49152, (1, args.tokens))
    probe = inputs[:, :32]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        load_base()  # converts and caches the embedded checkpoint once, outside any timing
        nd, ld = neuroada_adapters(folder, args.adapters), lora_adapters(folder, args.adapters)
        same, other = list(nd)[:-1], list(nd)[-1]

        neuroada = load_all(nd)
        with torch.no_grad():
            alone = {n: PeftModel.from_pretrained(load_base(), d).eval()(probe).logits for n, d in nd.items()}
            for name in nd:  # correctness: after a switch the model is that adapter alone, bitwise
                neuroada.set_adapter(name)
                assert torch.equal(neuroada(probe).logits, alone[name]), name
            base = load_base()
            cycle = iter(range(10**9))
            same_ms = timed(lambda: neuroada.set_adapter(same[next(cycle) % len(same)]), args.repeats)
            other_ms = timed(lambda: neuroada.set_adapter([same[0], other][next(cycle) % 2]), args.repeats)
            with neuroada.disable_adapter():
                pass
            lora = load_all(ld)
            lora_ms = timed(lambda: lora.set_adapter(list(ld)[next(cycle) % len(ld)]), args.repeats)
            hot = PeftModel.from_pretrained(load_base(), ld["task0"]).eval()
            hot_ms = timed(lambda: hotswap_adapter(hot, str(ld[list(ld)[next(cycle) % len(ld)]]), "default"),
                           max(3, args.repeats // 4))
            reload_ms = timed(lambda: PeftModel.from_pretrained(load_base(), nd["task0"]), 3)
            # what a forward costs once switched (NeuroAda's is the base's: the cells are in W); rounds
            # interleaved so that a load change on the shared machine hits all three alike
            forwards = {"base": [], "neuroada": [], "lora": []}
            for _ in range(3):
                for label, model in (("base", base), ("neuroada", neuroada), ("lora", lora)):
                    forwards[label].append(timed(lambda: model(inputs), 1))
            forward_ms, neuroada_forward_ms, lora_forward_ms = (statistics.median(forwards[k]) for k in forwards)

    rows = [
        ("neuroada set_adapter (same cells)", same_ms, neuroada_forward_ms),
        ("neuroada set_adapter (other cells: restore + write)", other_ms, neuroada_forward_ms),
        ("peft LoRA r=8 set_adapter", lora_ms, lora_forward_ms),
        ("peft LoRA r=8 hotswap_adapter (from disk)", hot_ms, lora_forward_ms),
        ("reload base + NeuroAda adapter", reload_ms, neuroada_forward_ms),
    ]
    print(f"\nSmolLM2-135M-Instruct fp32, 7 projections, k=20, {args.adapters} adapters, "
          f"torch threads={torch.get_num_threads()}; one forward of {args.tokens} tokens: {forward_ms:.1f} ms\n")
    print(f"| switch | ms | × neuroada switch | × base forward of {args.tokens} tokens "
          "| forward afterwards × base |")
    print("|---|---|---|---|---|")
    for label, ms, after_ms in rows:
        print(f"| {label} | {ms:.3f} | {ms / same_ms:.2f} | {ms / forward_ms:.4f} | {after_ms / forward_ms:.3f} |")


if __name__ == "__main__":
    main()
