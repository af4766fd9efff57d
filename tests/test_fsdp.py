"""FSDP2 with NeuroAda on CPU: 2 gloo processes, a tiny Llama, the strategy module's own minimal loop.

One launch of two worker processes (this file run as a script) trains, checkpoints and resumes; the tests
compare what they wrote with a 1-process run in this process: the adapter within 1e-5 (same global batch),
about half the parameter bytes per process, resume bitwise, LoRA sharded like NeuroAda, a bf16 base.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import REPO, tiny_llama, tiny_llama_config  # noqa: E402

STEPS, CHECKPOINT_STEP, SEQUENCES, LENGTH, LR, CLIP = 4, 2, 4, 12, 1e-2, 0.05  # CLIP: below the gradient norm (~0.13)
TARGETS = ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]


# ----------------------------------------------------------------------------- shared by test and workers
def neuroada_config():
    from neuroada_cli import NeuroAdaConfig

    return NeuroAdaConfig(k=2, target_modules=TARGETS)


def global_batches() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    return [torch.randint(2, 400, (SEQUENCES, LENGTH), generator=generator) for _ in range(STEPS)]


def train_steps(model, optimizer, batches, rank: int, world: int) -> None:
    """Each process takes its rows of the global batch; equal lengths, so the mean loss averages exactly."""
    per_rank = SEQUENCES // world
    for batch in batches:
        ids = batch[rank * per_rank:(rank + 1) * per_rank]
        model(input_ids=ids, labels=ids).loss.backward()
        # clipping as the recipe does (max_grad_norm): under fsdp the norm spans the sharded gradients
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def delta_tensors(model) -> dict[str, torch.Tensor]:
    from neuroada_cli.core.adapter import adapter_state

    return {k: v for k, v in adapter_state(model)[0].items() if k.endswith(("delta", "indices"))}


def attached(method: str, meta: bool, dtype: torch.dtype = torch.float32):
    """The tiny Llama (seed 0) with the method on it, real or on the meta device (structure only)."""
    from transformers import LlamaForCausalLM

    from neuroada_cli import inject

    if meta:
        with torch.device("meta"):
            model = LlamaForCausalLM(tiny_llama_config())
    else:
        model = tiny_llama(seed=0)
    model = model.to(dtype)
    if method == "lora":
        import peft

        torch.manual_seed(1)
        return peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False))
    return inject(model, neuroada_config())


# ------------------------------------------------------------------------------------------ the workers
def worker(out: Path) -> None:
    import torch.distributed as dist

    from neuroada_cli import load_adapter, save_adapter
    from neuroada_cli.strategies import fsdp as strategy

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    batches = global_batches()
    results = {}

    def build(method: str, adapter_dir: Path | None = None, dtype: torch.dtype = torch.float32):
        full = None
        if rank == 0:
            full = attached(method, False, dtype) if adapter_dir is None else load_adapter(tiny_llama(seed=0), adapter_dir)
        model = strategy.lean_load(attached(method, True, dtype), full, "cpu")
        return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)

    # 1. train with a checkpoint at CHECKPOINT_STEP (adapter + gathered optimizer state)
    model, optimizer = build("neuroada")
    results["local_bytes"] = strategy.local_parameter_bytes(model)
    train_steps(model, optimizer, batches[:CHECKPOINT_STEP], rank, world)
    with strategy.full_trainable_view(model):
        if rank == 0:
            save_adapter(model, out / "checkpoint" / "adapter")
    state = strategy.optimizer_state(model, optimizer)
    if rank == 0:
        torch.save(state, out / "checkpoint" / "optimizer.pt")
    train_steps(model, optimizer, batches[CHECKPOINT_STEP:], rank, world)
    with strategy.full_trainable_view(model):
        if rank == 0:
            torch.save(delta_tensors(model), out / "straight.pt")
    # 2. resume in fresh models from the checkpoint
    dist.barrier()
    model, optimizer = build("neuroada", adapter_dir=out / "checkpoint" / "adapter")
    saved = torch.load(out / "checkpoint" / "optimizer.pt", weights_only=False) if rank == 0 else None
    strategy.load_optimizer_state(model, optimizer, saved)
    train_steps(model, optimizer, batches[CHECKPOINT_STEP:], rank, world)
    with strategy.full_trainable_view(model):
        if rank == 0:
            torch.save(delta_tensors(model), out / "resumed.pt")
    # 3. LoRA sharded the same way
    model, optimizer = build("lora")
    train_steps(model, optimizer, batches[:CHECKPOINT_STEP], rank, world)
    with strategy.full_trainable_view(model):
        lora = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    if rank == 0:
        torch.save(lora, out / "lora.pt")
    # 4. a bf16 base with fp32 deltas (FSDP2 gathers each parameter in its own dtype)
    model, optimizer = build("neuroada", dtype=torch.bfloat16)
    train_steps(model, optimizer, batches[:CHECKPOINT_STEP], rank, world)
    with strategy.full_trainable_view(model):
        if rank == 0:
            torch.save(delta_tensors(model), out / "bf16.pt")
    (out / f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


# --------------------------------------------------------------------------------------------- the tests
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp")
    (out / "checkpoint").mkdir()
    port = str(free_port())
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": "2",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    procs = [subprocess.Popen([sys.executable, __file__, str(out)], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outputs)
    return out


def one_process(method: str, steps: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    model = attached(method, False, dtype)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    train_steps(model, optimizer, global_batches()[:steps], 0, 1)
    if method == "lora":
        return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    return delta_tensors(model)


def assert_close(expected: dict, got: dict, tolerance: float) -> None:
    assert expected.keys() == got.keys()
    moved = 0
    for name, value in expected.items():
        if value.is_floating_point():
            assert (value - got[name]).abs().max() <= tolerance, name
            moved += int(value.abs().max() > 0)
        else:
            assert torch.equal(value, got[name]), name
    assert moved > 0  # the runs trained something


def test_fsdp_two_processes_equal_one_process(two_ranks):
    assert_close(one_process("neuroada", STEPS), torch.load(two_ranks / "straight.pt"), 1e-5)


def test_fsdp_resume_is_bitwise(two_ranks):
    straight, resumed = torch.load(two_ranks / "straight.pt"), torch.load(two_ranks / "resumed.pt")
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_fsdp_lora_equals_one_process(two_ranks):
    assert_close(one_process("lora", CHECKPOINT_STEP), torch.load(two_ranks / "lora.pt"), 1e-5)


def test_fsdp_bf16_base_keeps_fp32_deltas(two_ranks):
    got = torch.load(two_ranks / "bf16.pt")
    assert all(v.dtype == torch.float32 for k, v in got.items() if k.endswith("delta"))
    assert_close(one_process("neuroada", CHECKPOINT_STEP, torch.bfloat16), got, 2e-3)


def test_fsdp_halves_parameter_bytes(two_ranks):
    from neuroada_cli.strategies.fsdp import local_parameter_bytes, prepare_for_sharding

    full = local_parameter_bytes(prepare_for_sharding(attached("neuroada", meta=False)))
    per_rank = [json.loads((two_ranks / f"rank{r}.json").read_text())["local_bytes"] for r in range(2)]
    assert sum(per_rank) == full
    assert all(0.45 * full <= b <= 0.55 * full for b in per_rank), (per_rank, full)


def test_decoder_blocks_are_the_layers():
    from neuroada_cli.strategies.fsdp import decoder_blocks

    model = tiny_llama()
    assert decoder_blocks(model) == list(model.model.layers)


def run_config(*overrides: str):
    from neuroada_cli import config

    return config.validate(config.compose("smollm2_commonsense", list(overrides)), world_size=2)


@pytest.mark.parametrize("strategy, world, overrides, fragment", [
    ("fsdp", 1, [], "needs at least 2 processes"),
    ("fsdp", 2, ["method=full"], "does not support method=full"),
    ("fsdp", 2, ["method=head"], "does not support method=head"),
    ("fsdp", 2, ["neuroada.neuron_fraction=0.5"], "not the uneven cells of neuroada.neuron_fraction=0.5"),
    ("fsdp", 2, ["neuroada.scope=layer"], "not the uneven cells of neuroada.scope=layer"),
    ("fsdp", 2, ["model.quantization=nf4", "neuroada.mode=auto"], "model.quantization=nf4 is not supported with trainer.strategy=fsdp yet"),
])
def test_fsdp_refuses_what_it_cannot_shard(strategy, world, overrides, fragment):
    from neuroada_cli.errors import UserError
    from neuroada_cli.strategies import get_strategy

    with pytest.raises(UserError) as caught:
        get_strategy(strategy).check(run_config(*overrides), world)
    assert fragment in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("method", ["neuroada", "lora"])
def test_fsdp_accepts_what_it_shards(method):
    from neuroada_cli.strategies import get_strategy

    get_strategy("fsdp").check(run_config(f"method={method}"), 2)
    get_strategy("ddp").check(run_config("method=full", "neuroada.neuron_fraction=0.5"), 2)  # ddp refuses nothing


def test_unknown_strategy_is_one_line_error():
    from neuroada_cli.errors import UserError
    from neuroada_cli.strategies import get_strategy

    with pytest.raises(UserError, match="trainer.strategy='zero3' is unknown; use one of: ddp, fsdp"):
        get_strategy("zero3")


def test_unknown_strategy_rejected_by_config():
    from helpers import cli

    result = cli("validate", "recipe=smollm2_commonsense", "trainer.strategy=zero3", check=False)
    assert result.returncode == 2 and "trainer.strategy" in result.stderr and "Traceback" not in result.stderr


def test_cli_fsdp_equals_one_process(tiny_llama_dir, tmp_path):
    """The recipe end to end: accelerate launch, trainer.strategy=fsdp, against one process (~1 min)."""
    from helpers import deltas, tiny_overrides, write_train_rows
    from helpers import accelerate_launch

    overrides = tiny_overrides(tiny_llama_dir, write_train_rows(tmp_path / "data"), tmp_path / "unused", steps=3)
    overrides = [o for o in overrides if not o.startswith("trainer.output_dir")]
    from helpers import cli

    cli("train", *overrides, f"trainer.output_dir={tmp_path / 'one'}")
    accelerate_launch("train", *overrides, "trainer.strategy=fsdp", f"trainer.output_dir={tmp_path / 'two'}",
                      cwd=tmp_path)
    record = json.loads((tmp_path / "two" / "run.json").read_text())
    assert record["strategy"] == "fsdp" and record["world_size"] == 2
    assert_close(deltas(tmp_path / "one"), deltas(tmp_path / "two"), 1e-5)



def test_cli_fsdp_ablation_refused_before_model_work_on_every_process(tmp_path):
    """Two processes, fsdp, neuron_fraction=0.5: one line per process, exit 2, before the model is read (the
    model folder is empty: loading it would fail with another message) and before the run directory exists."""
    import shutil

    from helpers import free_port

    launcher = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")
    if launcher is None:
        pytest.skip("the accelerate launcher is not installed")
    (tmp_path / "no_model").mkdir()
    command = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
               "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), "-m", "neuroada_cli", "train",
               "recipe=smollm2_commonsense", f"model.name_or_path={tmp_path / 'no_model'}", "trainer.strategy=fsdp",
               "neuroada.neuron_fraction=0.5", f"trainer.output_dir={tmp_path / 'run'}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    refusal = ("error: trainer.strategy=fsdp shards NeuroAda's k cells per row only, not the uneven cells of "
               "neuroada.neuron_fraction=0.5 (an ablation); use trainer.strategy=ddp")
    # (the launcher itself reports a failed child with its own traceback; none may come from our processes)
    ours = [line for line in result.stderr.splitlines() if line.strip().startswith('File "') and "neuroada_cli" in line]
    assert result.returncode != 0 and not ours, result.stderr[-3000:]
    # Each process refuses by itself (no collective call before the check); the launcher may stop the second
    # one as soon as the first exits, so one or two copies of the line (two writes may share a line).
    assert 1 <= result.stderr.count(refusal) <= 2, result.stderr[-3000:]
    assert not (tmp_path / "run" / "config.yaml").exists()


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
