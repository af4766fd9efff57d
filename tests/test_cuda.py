"""The NeuroAda layer on a CUDA device (marked ``cuda``; skipped without one): ``pytest -m cuda tests/test_cuda.py``.

Autocast in bf16 and fp16 against the reference layer, every delta-gradient kernel against the dense
product, merge / unmerge bitwise, a training step of a small Llama, and the CLI's commands on the GPU: train
(3 steps, bf16, packing, chunked loss, eval after training), eval run=DIR (generation and log-likelihood) and
export, each asserting that every parameter, buffer and batch it sees is on the GPU.
"""
from __future__ import annotations

import pytest
import torch

from helpers import tiny_llama

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
DEVICE = "cuda"


def make_layer(impl: str, d_out=96, d_in=80, k=4, dtype=torch.float32, seed=0):
    from neuroada_cli.core import selection
    from neuroada_cli.core.layer import NeuroAdaLinear

    torch.manual_seed(seed)
    base = torch.nn.Linear(d_in, d_out, bias=True).to(DEVICE, dtype)
    layer = NeuroAdaLinear(base, selection.magnitude(base.weight, k), impl=impl)
    with torch.no_grad():
        layer.delta.normal_(0, 0.05)
    return layer


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k", [1, 20])
def test_fused_matches_reference_under_autocast(autocast_dtype, k):
    fused, reference = make_layer("fused", k=k), make_layer("reference", k=k)
    x = torch.randn(3, 7, 80, device=DEVICE)
    outputs, grads = [], []
    for layer in (fused, reference):
        inputs = x.clone().requires_grad_(True)
        with torch.autocast("cuda", dtype=autocast_dtype):
            out = layer(inputs)
        out.float().square().sum().backward()
        outputs.append(out.float())
        grads.append((inputs.grad, layer.delta.grad))
    assert outputs[0].dtype == torch.float32 and fused.delta.grad.dtype == torch.float32
    tolerance = 2e-2 if autocast_dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(outputs[0], outputs[1], rtol=tolerance, atol=tolerance)
    for a, b in zip(grads[0], grads[1]):
        torch.testing.assert_close(a.float(), b.float(), rtol=5 * tolerance, atol=5 * tolerance)


@pytest.mark.parametrize("kernel", ["sddmm_columns", "sddmm_sparse", "sddmm_gather"])
@pytest.mark.parametrize("shape", [(64, 48, 1), (300, 200, 4), (128, 512, 20)])
def test_delta_gradient_kernels_match_dense(kernel, shape):
    from neuroada_cli.core import sddmm as layer

    d_out, d_in, k = shape
    torch.manual_seed(1)
    grad, inputs = torch.randn(333, d_out, device=DEVICE), torch.randn(333, d_in, device=DEVICE)
    idx = torch.sort(torch.randperm(d_in, device=DEVICE)[:k].repeat(d_out, 1), dim=1).values
    dense = (grad.t() @ inputs).gather(1, idx)
    got = getattr(layer, kernel)(grad, inputs, idx)
    assert got.device.type == "cuda" and got.shape == (d_out, k)
    torch.testing.assert_close(got, dense, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer.sampled_delta_grad(grad, inputs, idx), dense, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_unmerge_bitwise_on_cuda(dtype):
    layer = make_layer("fused", dtype=dtype)
    pristine = layer.base_layer.weight.detach().clone()
    pristine_cells = pristine.gather(1, layer.neuroada_idx)
    x = torch.randn(5, 80, device=DEVICE, dtype=dtype)
    before = layer(x)
    layer.merge()
    assert torch.equal(layer(x), before)
    layer.unmerge()
    assert torch.equal(layer.base_layer.weight, pristine)
    assert torch.equal(layer.neuroada_orig, pristine_cells)


def test_training_step_on_cuda_bf16():
    from neuroada_cli import NeuroAdaConfig, inject

    model = inject(tiny_llama().to(DEVICE, torch.bfloat16), NeuroAdaConfig(k=2)).train()
    deltas = [p for p in model.parameters() if p.requires_grad]
    assert deltas and all(p.dtype == torch.float32 and p.device.type == "cuda" for p in deltas)
    optimizer = torch.optim.AdamW(deltas, lr=1e-2)
    ids = torch.randint(2, 400, (2, 16), device=DEVICE)
    losses = []
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert all(p.abs().max() > 0 for p in deltas)


# ------------------------------------------------------------------- the CLI's commands on the GPU (issue 20)
def tensor_devices(model) -> set[str]:
    return {t.device.type for t in model.parameters()} | {t.device.type for t in model.buffers()}


@pytest.fixture(scope="module")
def cuda_run(tmp_path_factory):
    """A tiny Llama trained 3 steps on CUDA (bf16 autocast and weights, packing, chunked loss), evaluated after
    training; every training batch, parameter and buffer is checked to be on the GPU. Trained once per module."""
    from helpers import make_tokenizer, tiny_overrides, train_in_process, write_train_rows
    from neuroada_cli.eval import runner
    from neuroada_cli.kinds.causal_lm import CausalLM

    tmp_path = tmp_path_factory.mktemp("cuda-run")
    model_dir = tmp_path / "tiny-llama"
    tiny_llama().save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    data = write_train_rows(tmp_path / "data")
    write_train_rows(data, n=6, seed=3, stem="boolq")  # an eval test file: llm_adapters/boolq/test.json
    (data / "llm_adapters" / "boolq" / "train.json").rename(data / "llm_adapters" / "boolq" / "test.json")

    seen = {"train": set(), "batch": set(), "eval": []}
    real_loss, real_evaluate = CausalLM.loss_sum, runner.evaluate

    def loss_sum(self, model, batch):
        seen["train"] |= tensor_devices(model)
        seen["batch"] |= {value.device.type for value in batch.values() if torch.is_tensor(value)}
        return real_loss(self, model, batch)

    def evaluate(model, *args, **kwargs):
        seen["eval"].append(tensor_devices(model))
        return real_evaluate(model, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(CausalLM, "loss_sum", loss_sum)
        patch.setattr(runner, "evaluate", evaluate)
        run = train_in_process(tiny_overrides(model_dir, data, tmp_path / "run", steps=3) + [
            "trainer.precision=bf16", "model.dtype=bfloat16", "data.packing=true", "trainer.cross_entropy=chunked",
            "eval.after_train=true", "eval.tasks=[boolq]", "eval.max_new_tokens=4", "eval.batch_size=4"])
    return {"run": run, "seen": seen, "data": data}


def test_cli_train_and_eval_after_training_run_on_cuda(cuda_run):
    import json

    seen, run = cuda_run["seen"], cuda_run["run"]
    assert seen["train"] == {"cuda"} and seen["batch"] == {"cuda"}
    assert seen["eval"] == [{"cuda"}]  # eval.after_train: the in-memory model, on the GPU
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 3 and all(torch.isfinite(torch.tensor(line["loss"])) for line in log)
    results = json.loads((run / "eval" / "results.json").read_text())
    assert results["device"].startswith("cuda") and results["tasks"]["boolq"]["n"] == 6


@pytest.mark.parametrize("scoring", ["generate", "loglik"])
def test_cli_eval_reloads_onto_cuda(cuda_run, scoring, monkeypatch):
    """`neuroada eval run=DIR`: the base and adapter are loaded, moved to the GPU in bf16, merged, evaluated."""
    import json

    from neuroada_cli.cli import main
    from neuroada_cli.eval import runner

    out = cuda_run["run"] / f"eval_{scoring}"
    real_place, placed = runner.place, []

    def place(model, device):
        model = real_place(model, device)
        placed.append((tensor_devices(model), {p.dtype for p in model.parameters()}))
        return model

    monkeypatch.setattr(runner, "place", place)
    assert main(["eval", f"run={cuda_run['run']}", f"eval.scoring={scoring}", f"eval.output_dir={out}",
                 "eval.max_new_tokens=4"]) == 0
    assert placed == [({"cuda"}, {torch.bfloat16})]
    entry = json.loads((out / "results.json").read_text())["tasks"]["boolq"]
    assert entry["n"] == 6 and entry["scoring"] == scoring and 0.0 <= entry["value"] <= 1.0


def test_cli_export_merges_on_cuda(cuda_run, monkeypatch):
    from transformers import AutoModelForCausalLM

    from neuroada_cli import methods
    from neuroada_cli.export import export

    real_load, merged = methods.load_trained, []

    def load_trained(*args, **kwargs):
        model, tokenizer, info = real_load(*args, **kwargs)
        merged.append(tensor_devices(model))
        return model, tokenizer, info

    monkeypatch.setattr(methods, "load_trained", load_trained)
    target = export(cuda_run["run"], cuda_run["run"].parent / "merged")
    assert merged == [{"cuda"}]
    exported = AutoModelForCausalLM.from_pretrained(target)
    assert exported.dtype == torch.bfloat16 and not any("neuroada" in name for name, _ in exported.named_parameters())
