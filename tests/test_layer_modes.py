"""One NeuroAda layer, two modes: merged (W holds orig + delta) and unmerged (W never written; the forward adds
the delta's sparse product), on full-precision bases and on bitsandbytes-quantized ones (nf4, fp4, int8 on CPU)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from neuroada_cli import NeuroAdaConfig, inject, load_adapter, neuroada_layers, save_adapter, unload
from neuroada_cli.core import selection
from neuroada_cli.core.model import disabled
from neuroada_cli.errors import UserError

from helpers import tiny_llama

TARGETS = ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]
WIDE = dict(hidden_size=64, intermediate_size=128)  # whole 64-value quantization blocks per row


def batch(seed: int = 0, rows: int = 2, length: int = 10) -> torch.Tensor:
    return torch.randint(2, 400, (rows, length), generator=torch.Generator().manual_seed(seed))


def randomise(model, seed: int = 1, scale: float = 0.05) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in neuroada_layers(model).values():
            layer.delta.copy_(torch.randn(layer.delta.shape, generator=generator) * scale)


def loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), {name: layer.delta.grad.clone() for name, layer in neuroada_layers(model).items()}


@pytest.mark.parametrize("placement", [dict(), dict(scope="layer"), dict(neuron_fraction=0.5)])
@pytest.mark.parametrize("k", [2, 7])
def test_unmerged_equals_merged_and_never_writes_w(k, placement):
    base = tiny_llama(seed=0)
    pristine = {name: p.detach().clone() for name, p in base.named_parameters()}
    merged = inject(copy.deepcopy(base), NeuroAdaConfig(k=k, target_modules=TARGETS, **placement))
    unmerged = inject(copy.deepcopy(base), NeuroAdaConfig(k=k, target_modules=TARGETS, mode="unmerged", **placement))
    assert {layer.mode for layer in neuroada_layers(unmerged).values()} == {"unmerged"}
    randomise(merged)
    randomise(unmerged)
    ids = batch()
    logits_m, grads_m = loss_and_grads(merged, ids)
    logits_u, grads_u = loss_and_grads(unmerged, ids)
    torch.testing.assert_close(logits_u, logits_m, rtol=1e-5, atol=1e-5)
    for name in grads_m:
        torch.testing.assert_close(grads_u[name], grads_m[name], rtol=1e-4, atol=1e-7)
    optimizer = torch.optim.AdamW([p for p in unmerged.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        unmerged(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    for name, layer in neuroada_layers(unmerged).items():  # W is never written in the unmerged mode
        assert torch.equal(layer.base_layer.weight, pristine[f"{name}.weight"]), name
    # and it still merges exactly like the merged mode (full-precision base)
    reference = copy.deepcopy(unmerged)
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
        torch.testing.assert_close(unload(unmerged)(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_unmerged_input_gradient_flows_through_base_and_delta():
    torch.manual_seed(0)
    base = nn.Linear(12, 6)
    layer_model = nn.Sequential(copy.deepcopy(base))
    inject(layer_model, NeuroAdaConfig(k=3, target_modules=["0"], mode="unmerged"))
    layer = neuroada_layers(layer_model)["0"]
    with torch.no_grad():
        layer.delta.normal_()
    x = torch.randn(4, 5, 12, dtype=torch.float64, requires_grad=True)
    dense = base.weight.double() + layer.get_delta_weight("default").double()
    expected_x, = torch.autograd.grad((x @ dense.t() + base.bias.double()).square().sum(), x)
    layer_model.double()
    got_x, = torch.autograd.grad(layer_model(x).square().sum(), x)
    torch.testing.assert_close(got_x, expected_x)


def test_disabled_gives_the_base_bitwise_in_both_modes_and_restores():
    ids = batch()
    base = tiny_llama(seed=2)
    with torch.no_grad():
        expected = base(input_ids=ids).logits
    for mode in ("merged", "unmerged"):
        model = inject(copy.deepcopy(base), NeuroAdaConfig(k=2, target_modules=TARGETS, mode=mode))
        randomise(model)
        with torch.no_grad():
            adapted = model(input_ids=ids).logits
            with disabled(model):
                assert torch.equal(model(input_ids=ids).logits, expected), mode
            assert torch.equal(model(input_ids=ids).logits, adapted), mode


# ----------------------------------------------------------------------------------------------- quantized bases
bnb = pytest.importorskip("bitsandbytes")


def quantize(model, kind: str):
    """Replace every target nn.Linear by its bitsandbytes twin (CPU), as transformers' loader would."""
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS:
            if kind == "int8":
                new = bnb.nn.Linear8bitLt(module.in_features, module.out_features, bias=module.bias is not None,
                                          has_fp16_weights=False)
            else:
                new = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                        compute_dtype=torch.float32, quant_type=kind)
                new.support_avx512bf16_for_cpu = False  # keep the layout dequantize_4bit reads (see api.md [quant])
            new.load_state_dict(module.state_dict())
            new = new.to("cpu")
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, new)
    return model


def fp_weights(model) -> dict[str, torch.Tensor]:
    return {name: m.weight.detach().clone() for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS}


@pytest.mark.parametrize("kind", ["nf4", "fp4", "int8"])
def test_quantized_delta_grad_equals_dense_reference_on_the_dequantized_weight(kind):
    from neuroada_cli.core.quantized import dequantized_weight

    full = tiny_llama(seed=3, **WIDE)
    weights = fp_weights(full)
    quantized = quantize(copy.deepcopy(full), kind)
    model = inject(quantized, NeuroAdaConfig(k=3, target_modules=TARGETS), weights=weights)
    layers = neuroada_layers(model)
    assert all(layer.mode == "unmerged" and layer.quantized for layer in layers.values())
    # cells and original values are the full-precision run's
    plain = inject(copy.deepcopy(full), NeuroAdaConfig(k=3, target_modules=TARGETS))
    for name, layer in layers.items():
        assert torch.equal(layer.neuroada_idx, neuroada_layers(plain)[name].neuroada_idx), name
        assert torch.equal(layer.neuroada_orig, neuroada_layers(plain)[name].neuroada_orig), name
    randomise(model)
    # reference: plain linears holding the dequantized weights, the authors' dense gradient at the same cells
    reference = copy.deepcopy(full)
    for name, layer in layers.items():
        reference.get_submodule(name).weight.data.copy_(dequantized_weight(layer.base_layer))
    reference = inject(reference, NeuroAdaConfig(k=3, target_modules=TARGETS, impl="reference"),
                       indices={name: layer.neuroada_idx for name, layer in layers.items()})
    with torch.no_grad():
        for name, layer in neuroada_layers(reference).items():
            layer.delta.copy_(layers[name].delta)
    ids = batch(seed=4)
    logits_q, grads_q = loss_and_grads(model, ids)
    logits_r, grads_r = loss_and_grads(reference, ids)
    torch.testing.assert_close(logits_q, logits_r, rtol=1e-4, atol=1e-4)
    for name in grads_r:
        scale = grads_r[name].abs().max().clamp_min(1e-8)
        assert (grads_q[name] - grads_r[name]).abs().max() / scale < 1e-3, name


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_quantized_training_lowers_the_loss_saves_and_merges_into_the_full_precision_base(kind, tmp_path):
    full = tiny_llama(seed=5, **WIDE)
    model = inject(quantize(copy.deepcopy(full), kind), NeuroAdaConfig(k=4, target_modules=TARGETS),
                   weights=fp_weights(full))
    ids = batch(seed=6, rows=4)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    losses = []
    for _ in range(6):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    with pytest.raises(UserError, match="quantized"):
        unload(model)
    save_adapter(model, tmp_path / "a")
    # exported: merged exactly into the full-precision base (the fingerprint is that base's)
    merged = unload(load_adapter(copy.deepcopy(full), tmp_path / "a"))
    with torch.no_grad():
        fp_logits = merged(input_ids=ids).logits
        q_logits = model(input_ids=ids).logits
    # the unmerged quantized forward differs from it by the quantization error of the base only
    with torch.no_grad():
        base_gap = (quantize(copy.deepcopy(full), kind)(input_ids=ids).logits - full(input_ids=ids).logits).abs().max()
    assert (q_logits - fp_logits).abs().max() <= 1.5 * base_gap + 1e-4
    # and reloads onto the quantized base without its full-precision weights (looser fingerprint)
    again = load_adapter(quantize(copy.deepcopy(full), kind), tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, q_logits, rtol=1e-3, atol=2e-2)


def test_quantized_without_weights_selects_on_the_dequantized_weight_deterministically():
    from neuroada_cli.core.quantized import dequantized_weight

    full = tiny_llama(seed=7, **WIDE)
    first = inject(quantize(copy.deepcopy(full), "nf4"), NeuroAdaConfig(k=5, target_modules=TARGETS))
    second = inject(quantize(copy.deepcopy(full), "nf4"), NeuroAdaConfig(k=5, target_modules=TARGETS))
    for name, layer in neuroada_layers(first).items():
        dequantized = dequantized_weight(layer.base_layer)
        assert torch.equal(layer.neuroada_idx, selection.magnitude(dequantized, 5)), name  # ties -> lower column
        assert torch.equal(layer.neuroada_idx, neuroada_layers(second)[name].neuroada_idx), name
        assert torch.equal(layer.neuroada_orig, dequantized.gather(1, layer.neuroada_idx)), name


def test_merged_mode_on_a_quantized_base_is_refused_in_one_line():
    model = quantize(tiny_llama(seed=8, **WIDE), "nf4")
    with pytest.raises(UserError, match="mode=merged cannot write a quantized base"):
        inject(model, NeuroAdaConfig(k=2, target_modules=TARGETS, mode="merged"))
