"""The NeuroAda layer on a CUDA device (marked ``cuda``; skipped without one): ``pytest -m cuda tests/test_cuda.py``.

Autocast in bf16 and fp16 against the reference layer, every delta-gradient kernel against the dense
product, merge / unmerge bitwise, and a training step of a small Llama.
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
        layer.neuroada_delta.normal_(0, 0.05)
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
        grads.append((inputs.grad, layer.neuroada_delta.grad))
    assert outputs[0].dtype == torch.float32 and fused.neuroada_delta.grad.dtype == torch.float32
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
