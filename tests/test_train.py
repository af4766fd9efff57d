"""The training loop on a tiny random Llama: batching plan, loss normalisation, methods, resume after SIGKILL."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from neuroada_cli import config
from neuroada_cli.data.batching import BatchPlan, split_global_batch
from neuroada_cli.errors import UserError

REPO = Path(__file__).resolve().parents[1]
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "answer", "solution1", "option2"]


# ------------------------------------------------------------------------------------------ helpers
def write_train_rows(data_dir: Path, n: int = 48, seed: int = 0, stem: str = "commonsense_15k") -> Path:
    """LLM-Adapters style rows of varied length under <data_dir>/llm_adapters/<stem>/train.json."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        answer = rng.choice(["true", "false"])
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 24)))
        rows.append({"instruction": f"Please choose the correct answer to the question: {words}", "input": "",
                     "output": f"the correct answer is {answer}", "answer": answer})
    folder = data_dir / "llm_adapters" / stem
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.json").write_text(json.dumps(rows))
    return data_dir


def tiny_overrides(model_dir: Path, data_dir: Path, output_dir: Path, steps: int = 4) -> list[str]:
    return [f"model.name_or_path={model_dir}", f"data.dir={data_dir}", f"trainer.output_dir={output_dir}",
            f"trainer.max_steps={steps}", "trainer.batch_size=8", "trainer.micro_batch_size=2", "data.max_length=64",
            "neuroada.k=4", "optimizer.lr=1e-2", "trainer.checkpoint_every=0", "optimizer.warmup_ratio=0.25"]


def train_in_process(overrides: list[str]) -> Path:
    from neuroada_cli.train import train

    return train(config.validate(config.compose(None, overrides)))


def deltas(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def cli(*args: str, cwd: Path | None = None, check: bool = True, timeout: float = 300,
        **popen) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "neuroada_cli", *args], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=timeout, **popen)
    if check and result.returncode != 0:
        raise AssertionError(f"neuroada {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


@pytest.fixture
def data_dir(tmp_path):
    return write_train_rows(tmp_path / "data")


# ------------------------------------------------------------------------------------------ batching
def test_plan_covers_each_example_once_per_epoch_and_is_deterministic():
    lengths = [random.Random(i).randint(5, 200) for i in range(103)]
    plan = BatchPlan(lengths, batch_size=8, seed=3, bucket_batches=4)
    assert plan.steps_per_epoch == 12  # 103 // 8, the incomplete batch is dropped
    epoch0 = plan.epoch_batches(0)
    flat = [i for batch in epoch0 for i in batch]
    assert len(flat) == len(set(flat)) == 96 and all(len(b) == 8 for b in epoch0)
    assert BatchPlan(lengths, 8, 3, 4).epoch_batches(0) == epoch0
    assert plan.epoch_batches(1) != epoch0  # reshuffled every epoch
    assert plan.global_batch(13) == plan.epoch_batches(1)[1] and plan.position(13) == (1, 1)
    for batch in epoch0:  # longest first inside a batch
        assert [lengths[i] for i in batch] == sorted((lengths[i] for i in batch), reverse=True)


def test_length_bucketing_cuts_padding():
    lengths = [random.Random(i).randint(5, 300) for i in range(512)]

    def padded(plan):
        return sum(8 * max(lengths[i] for i in chunk) for batch in plan.epoch_batches(0)
                   for chunk in split_global_batch(batch, 0, 1, 8))

    assert padded(BatchPlan(lengths, 16, 0, bucket_batches=16)) < 0.75 * padded(BatchPlan(lengths, 16, 0, bucket_batches=1))


def test_split_global_batch_across_processes():
    batch = list(range(16))
    ranks = [split_global_batch(batch, rank, 2, 4) for rank in range(2)]
    assert ranks[0] == [[0, 1, 2, 3], [8, 9, 10, 11]] and ranks[1] == [[4, 5, 6, 7], [12, 13, 14, 15]]
    assert split_global_batch(batch, 0, 1, 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
    with pytest.raises(ValueError):
        split_global_batch(list(range(10)), 0, 2, 4)


# ------------------------------------------------------------------------------------------ the loop
def test_loss_is_normalised_by_the_global_batch(tiny_llama_dir, data_dir, tmp_path):
    """Accumulating 4 micro-batches of 2 equals 2 micro-batches of 4: same global batch, same update."""
    base = tiny_overrides(tiny_llama_dir, data_dir, tmp_path / "a")
    small = train_in_process(base)
    large = train_in_process([o for o in base if not o.startswith(("trainer.output_dir", "trainer.micro_batch_size"))]
                             + [f"trainer.output_dir={tmp_path / 'b'}", "trainer.micro_batch_size=4"])
    a, b = deltas(small), deltas(large)
    assert a.keys() == b.keys()
    for name in a:
        if name.endswith(".delta"):
            assert a[name].abs().max() > 0
            torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6)
    log_a = [json.loads(line) for line in (small / "train_log.jsonl").read_text().splitlines()]
    log_b = [json.loads(line) for line in (large / "train_log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in log_a] == pytest.approx([r["loss"] for r in log_b], rel=1e-5)
    assert log_a[0]["lr"] == pytest.approx(1e-2) and log_a[-1]["lr"] == 0.0  # one warmup step, linear decay


@pytest.mark.parametrize("extra", [
    ["method=lora", "lora.r=2", "lora.target_modules=[q_proj,v_proj]"],
    ["neuroada.selection=gradient", "neuroada.gradient_batches=1", "trainer.gradient_checkpointing=true"],
    ["trainer.precision=bf16", "optimizer.max_grad_norm=1.0", "trainer.tensorboard=true"],
    ["method=full", "optimizer.lr=1e-4"],
], ids=["lora", "gradient-selection+checkpointing", "bf16+clip+tensorboard", "full"])
def test_methods_and_options_train(tiny_llama_dir, data_dir, tmp_path, extra):
    run = train_in_process(tiny_overrides(tiny_llama_dir, data_dir, tmp_path / "run", steps=2) + extra)
    record = json.loads((run / "run.json").read_text())
    assert 0 < record["trainable_params"] <= record["total_params"]
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and all(r["loss"] == r["loss"] for r in log)  # no NaN
    files = {p.name for p in (run / "adapter").iterdir()}
    assert "adapter_model.safetensors" in files or "model.safetensors" in files
    if "trainer.tensorboard=true" in extra:
        assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    if "method=lora" in extra:
        assert record["trainable_params"] == 2 * (2 * (32 + 32) + 2 * (32 + 16))  # 2 layers x r(in + out) of q, v


def test_output_dir_holding_a_run_needs_resume(tiny_llama_dir, data_dir, tmp_path):
    overrides = tiny_overrides(tiny_llama_dir, data_dir, tmp_path / "run", steps=1)
    train_in_process(overrides)
    with pytest.raises(UserError, match="already holds a run"):
        train_in_process(overrides)


def test_resume_after_sigkill_is_bitwise_identical(tiny_llama_dir, data_dir, tmp_path):
    """Kill a run with SIGKILL once a checkpoint exists; the resumed run ends with the same adapter."""
    common = [o for o in tiny_overrides(tiny_llama_dir, data_dir, tmp_path, steps=40)
              if not o.startswith(("trainer.output_dir", "trainer.checkpoint_every", "trainer.batch_size"))]
    common += ["trainer.checkpoint_every=4", "trainer.batch_size=4"]
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    cli("train", *common, f"trainer.output_dir={reference}")

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, "-m", "neuroada_cli", "train", *common,
                                f"trainer.output_dir={interrupted}"], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list((interrupted / "checkpoints").glob("step-*")) and time.monotonic() < deadline:
        if process.poll() is not None:
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (interrupted / "run.json").exists()

    cli("train", *common, f"trainer.output_dir={interrupted}", "trainer.resume=true")
    resumed = json.loads((interrupted / "run.json").read_text())
    assert resumed["resumed_from_step"] and resumed["resumed_from_step"] % 4 == 0
    a, b = deltas(reference), deltas(interrupted)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    log = [json.loads(line) for line in (interrupted / "train_log.jsonl").read_text().splitlines()]
    reference_log = [json.loads(line) for line in (reference / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 41))
    assert [r["loss"] for r in log] == [r["loss"] for r in reference_log]
    assert [p.name for p in (interrupted / "checkpoints").iterdir()] == ["step-40"]  # only the last one kept


def test_eval_after_train_checks_its_inputs_before_training(tiny_llama_dir, data_dir, tmp_path):
    overrides = tiny_overrides(tiny_llama_dir, data_dir, tmp_path / "run", steps=1)
    with pytest.raises(UserError, match="boolq"):
        train_in_process(overrides + ["eval.after_train=true", "eval.tasks=[boolq]"])
    assert not (tmp_path / "run").exists()


def test_fp16_on_cpu_is_refused(tiny_llama_dir, data_dir, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("fp16 autocast is available on this machine")
    with pytest.raises(UserError, match="fp16 needs a GPU"):
        train_in_process(tiny_overrides(tiny_llama_dir, data_dir, tmp_path / "run", steps=1) + ["trainer.precision=fp16"])


def test_glue_classification_keeps_the_best_epoch(tmp_path, bert_dir):
    """sequence_classification through the same loop: loss per example, selection after every epoch."""
    from glue_fixtures import write_glue_task

    model_dir = bert_dir
    data = write_glue_task(tmp_path / "data", "rte")
    run = train_in_process([
        "task=glue/rte", f"model.name_or_path={model_dir}", "model.family=bert", f"data.dir={data}",
        f"trainer.output_dir={tmp_path / 'run'}", "trainer.epochs=2", "trainer.batch_size=8", "trainer.micro_batch_size=4",
        "trainer.select_best=true", "trainer.checkpoint_every=0", "neuroada.k=2", "neuroada.modules_to_save=[classifier]",
        "neuroada.target_modules=[query,value]", "optimizer.lr=1e-2",
    ])
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    selections = [r for r in log if "selection" in r]
    steps = [r for r in log if "loss" in r]
    assert len(selections) == 2 and selections[-1]["step"] == steps[-1]["step"]
    assert all(r["target_tokens"] == 8 for r in steps)  # one term per example of the global batch
    record = json.loads((run / "run.json").read_text())
    best = max(selections, key=lambda r: r["selection"]["accuracy"])
    assert record["selection"]["metric"] == "accuracy" and record["selection"]["step"] == best["step"]
    assert record["head_params"] > 0 and (run / "adapter" / "adapter_model.safetensors").is_file()


def test_select_best_needs_a_glue_task(tiny_llama_dir, data_dir, tmp_path):
    with pytest.raises(UserError, match="select_best"):
        train_in_process(tiny_overrides(tiny_llama_dir, data_dir, tmp_path / "run", steps=1) + ["trainer.select_best=true"])
