"""The NeuroAda layer and library: fused == reference == by hand, the kernels, dtypes, save/load and errors,
on tiny Llama, BERT, RoBERTa and GPT-NeoX models (helpers.py). The shared matrix is test_method_matrix.py."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from neuroada_cli import (
    NeuroAdaConfig, count_parameters, inject, load_adapter, merge, neuroada_layers, save_adapter, unload, unmerge,
)
from neuroada_cli.errors import UserError

from helpers import ARCH_HEADS, ARCHS, adapted, arch_batch, build_arch, naive_forward, randomise_deltas


@pytest.mark.parametrize("k", [3, 8])  # the column path (small k) and sampled_addmm (larger k)
@pytest.mark.parametrize("arch", ARCHS)
def test_fused_equals_naive_reference_and_reference_impl(arch, k):
    inputs = arch_batch(arch)
    fused = adapted(arch, k=k)
    reference = adapted(arch, k=k, impl="reference")
    out_fused = fused(**inputs)
    out_ref = reference(**inputs)
    naive = naive_forward(fused, arch, inputs)
    torch.testing.assert_close(out_fused.logits, naive.logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_fused.logits, out_ref.logits, rtol=1e-5, atol=1e-6)
    out_fused.loss.backward()
    out_ref.loss.backward()
    for (name, a), (_, b) in zip(neuroada_layers(fused).items(), neuroada_layers(reference).items()):
        assert a.delta.grad is not None, name
        torch.testing.assert_close(a.delta.grad, b.delta.grad, rtol=1e-4, atol=1e-7)
    for name, param in fused.named_parameters():
        if param.requires_grad is False:
            assert param.grad is None, f"frozen {name} got a gradient"


@pytest.mark.parametrize("arch", ["llama", "roberta"])
def test_bf16_base_fused_matches_reference_and_keeps_fp32_deltas(arch):
    inputs = arch_batch(arch)
    fused = adapted(arch, dtype=torch.bfloat16)
    reference = adapted(arch, impl="reference", dtype=torch.bfloat16)
    for layer in neuroada_layers(fused).values():
        assert layer.base_layer.weight.dtype == torch.bfloat16 and layer.delta.dtype == torch.float32
    out_fused, out_ref = fused(**inputs), reference(**inputs)
    assert out_fused.logits.dtype == torch.bfloat16  # the option took effect: the model really runs in bf16
    torch.testing.assert_close(out_fused.logits, out_ref.logits, rtol=0, atol=0)
    with torch.no_grad():  # and the deltas take effect: not the plain bf16 base's output
        assert not torch.equal(out_fused.logits, build_arch(arch, dtype=torch.bfloat16)[0](**inputs).logits)
    out_fused.loss.backward()
    out_ref.loss.backward()
    for a, b in zip(neuroada_layers(fused).values(), neuroada_layers(reference).values()):
        assert a.delta.grad.dtype == torch.float32
        scale = b.delta.grad.abs().max().clamp_min(1e-6)
        assert ((a.delta.grad - b.delta.grad).abs().max() / scale) < 0.05


def test_autocast_bf16_grads_match_reference():
    inputs = arch_batch("llama")
    fused, reference = adapted("llama"), adapted("llama", impl="reference")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_fused, out_ref = fused(**inputs), reference(**inputs)
    torch.testing.assert_close(out_fused.logits, out_ref.logits)
    out_fused.loss.backward()
    out_ref.loss.backward()
    for a, b in zip(neuroada_layers(fused).values(), neuroada_layers(reference).values()):
        scale = b.delta.grad.abs().max().clamp_min(1e-6)
        assert ((a.delta.grad - b.delta.grad).abs().max() / scale) < 0.05


def test_layers_whose_selection_is_few_columns_save_only_those_columns():
    """k=1 on weights with a dominant input feature: backward keeps [T, few], not [T, d_in]; siblings agree."""
    def model_with_outlier_feature(impl, layers=("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "gate_proj")):
        model, targets = build_arch("llama")
        with torch.no_grad():
            for name, module in model.named_modules():
                if name.endswith(layers):
                    module.weight[:, 5] = 1.0  # every row's largest |W| is input 5
        inject(model, NeuroAdaConfig(k=1, target_modules=targets, impl=impl))
        randomise_deltas(model)
        return model

    # q/k/v/o (one parent, one input width) decide together: k, v narrow but q wide -> all keep the input
    mixed = neuroada_layers(model_with_outlier_feature("fused", layers=("k_proj", "v_proj")))
    assert all(layer.neuroada_input_cols is None for name, layer in mixed.items() if "self_attn" in name)
    inputs = arch_batch("llama")
    fused, reference = model_with_outlier_feature("fused"), model_with_outlier_feature("reference")
    compact = {n: l for n, l in neuroada_layers(fused).items() if not n.endswith("down_proj")}
    assert all(l.neuroada_input_cols is not None and l.neuroada_input_cols.tolist() == [5] for l in compact.values())
    saved_shapes = []

    def note_shape(tensor):
        saved_shapes.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(note_shape, lambda t: t):
        out_fused = fused(**inputs)
    tokens = inputs["input_ids"].numel()
    assert saved_shapes.count((tokens, 1)) == len(compact)  # one [T, 1] column block per compact layer
    out_ref = reference(**inputs)
    torch.testing.assert_close(out_fused.logits, out_ref.logits, rtol=1e-5, atol=1e-6)
    out_fused.loss.backward()
    out_ref.loss.backward()
    for a, b in zip(neuroada_layers(fused).values(), neuroada_layers(reference).values()):
        torch.testing.assert_close(a.delta.grad, b.delta.grad, rtol=1e-4, atol=1e-7)


def test_gated_mlp_input_is_recomputed_from_its_factors_not_kept_twice():
    from neuroada_cli.core.layer import NeuroAdaLinear, product_factors

    torch.manual_seed(0)
    a = torch.randn(2, 4, 7, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 4, 7, dtype=torch.float64, requires_grad=True)
    assert product_factors(a * b) is not None
    assert product_factors(torch.randn(7, dtype=torch.float64) * a) is None  # frozen factor: not kept by autograd
    assert product_factors(a + b) is None
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):  # checkpointing: just save x
        assert product_factors(a * b) is None
    base = nn.Linear(7, 5).double()
    idx = torch.sort(torch.stack([torch.randperm(7)[:3] for _ in range(5)]), dim=1).values
    fused, reference = NeuroAdaLinear(base, idx), NeuroAdaLinear(copy.deepcopy(base), idx, impl="reference")
    for layer in (fused, reference):
        with torch.no_grad():
            layer.delta.copy_(torch.randn(5, 3, generator=torch.Generator().manual_seed(3)))

    def run(layer, a, b):
        return layer(a * b)

    # input gradients by gradcheck; the delta gradient against the materialising reference below
    assert torch.autograd.gradcheck(lambda a, b: run(fused, a, b), (a, b), atol=1e-8)
    run(fused, a, b).pow(2).sum().backward()
    run(reference, a, b).pow(2).sum().backward()
    torch.testing.assert_close(fused.delta.grad, reference.delta.grad)
    # in a Llama, down_proj is fed act(gate) * up: the factor path is the one taken there
    model = adapted("llama")
    seen = []
    model.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda m, args: seen.append(product_factors(args[0])))
    model(**arch_batch("llama")).loss.backward()
    assert seen and seen[0] is not None


def test_gradcheck_float64():
    """The fused autograd function against finite differences of W + scatter(delta)."""
    from neuroada_cli.core.layer import FusedLinearFunction

    torch.manual_seed(0)
    weight = torch.randn(5, 7, dtype=torch.float64)
    idx = torch.sort(torch.stack([torch.randperm(7)[:3] for _ in range(5)]), dim=1).values
    x = torch.randn(2, 4, 7, dtype=torch.float64, requires_grad=True)
    delta = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, dtype=torch.float64, requires_grad=True)

    input_cols, local_idx = torch.unique(idx, return_inverse=True)

    def fused(x, delta, bias, compact):
        merged = weight.clone()
        merged.scatter_add_(1, idx, delta.detach())  # what the fused layer keeps in W during training
        if compact:  # save only the selected input columns, indices relative to them
            return FusedLinearFunction.apply(x, merged, bias, delta, idx, input_cols, local_idx, None)
        return FusedLinearFunction.apply(x, merged, bias, delta, idx, None, None, None)

    for compact in (False, True):
        assert torch.autograd.gradcheck(lambda *a: fused(*a, compact), (x, delta, bias), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sddmm_strategies_agree_with_dense_product(dtype):
    from neuroada_cli.core.sddmm import sddmm_columns, sddmm_gather, sddmm_sparse, sampled_delta_grad

    torch.manual_seed(0)
    grad_out, inputs = torch.randn(37, 11, dtype=dtype), torch.randn(37, 23, dtype=dtype)
    idx = torch.sort(torch.stack([torch.randperm(23)[:4] for _ in range(11)]), dim=1).values
    dense = (grad_out.t() @ inputs).gather(1, idx)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    for strategy in (sddmm_columns, sddmm_gather, sddmm_sparse, sampled_delta_grad):
        torch.testing.assert_close(strategy(grad_out, inputs, idx), dense, **tol)
        torch.testing.assert_close(strategy(grad_out, inputs, idx[:, :1]), dense[:, :1], **tol)
    assert sampled_delta_grad(grad_out.bfloat16(), inputs.bfloat16(), idx).dtype == torch.float32


@pytest.mark.parametrize("arch", ARCHS)
def test_merge_equals_unmerged_and_unmerge_restores_bitwise(arch):
    inputs = arch_batch(arch)
    model = adapted(arch, scale=0.3)
    pristine, _ = build_arch(arch)
    with torch.no_grad():
        base_out = pristine(**inputs).logits
        before = model(**inputs).logits
        assert (before - base_out).abs().max() > 1e-4  # the deltas matter: 100x the tolerance of the checks below
        merge(model)
        for name, layer in neuroada_layers(model).items():
            expected = pristine.get_submodule(name).weight.clone()
            expected.scatter_(1, layer.neuroada_idx, layer.neuroada_orig + layer.delta)
            assert torch.equal(layer.base_layer.weight, expected), name
        after = model(**inputs).logits
        torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)
        unmerge(model)
        for name, layer in neuroada_layers(model).items():
            layer.set_impl("reference")  # the fused path keeps W merged while training; reference shows W as is
            assert torch.equal(layer.base_layer.weight, pristine.get_submodule(name).weight), name
            layer.set_impl("fused")
        torch.testing.assert_close(model(**inputs).logits, before, rtol=1e-5, atol=1e-6)
        plain = unload(model)
    assert not neuroada_layers(plain)
    with torch.no_grad():
        torch.testing.assert_close(plain(**inputs).logits, before, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_into_fresh_model_reproduces_outputs(arch, tmp_path):
    inputs = arch_batch(arch)
    model = adapted(arch, train_bias=True)
    with torch.no_grad():
        for layer in neuroada_layers(model).values():
            if layer.base_layer.bias is not None:
                layer.base_layer.bias.add_(0.3)
        for name in ARCH_HEADS.get(arch, []):
            for p in model.get_submodule(name).parameters():
                p.add_(0.2)
        expected = model(**inputs).logits
    save_adapter(model, tmp_path / "adapter")
    fresh, _ = build_arch(arch)
    load_adapter(fresh, tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(fresh(**inputs).logits, expected, rtol=1e-5, atol=1e-6)
    assert count_parameters(fresh).trainable == count_parameters(model).trainable


def test_adapter_file_is_compact(tmp_path):
    from safetensors.torch import load_file

    model = adapted("llama", k=2)
    save_adapter(model, tmp_path / "a")
    tensors = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    for name, layer in neuroada_layers(model).items():
        delta, indices = (tensors[f"base_model.model.{name}.neuroada_{part}"] for part in ("delta", "indices"))
        assert delta.dtype == torch.float32 and delta.shape == (layer.out_features, 2)
        assert indices.dtype == torch.int16 and torch.equal(indices.long(), layer.neuroada_idx)
    assert not any("weight" in key for key in tensors)  # no base weights in the adapter


def test_mismatched_base_is_rejected(tmp_path):
    model = adapted("llama")
    save_adapter(model, tmp_path / "adapter")
    other, _ = build_arch("llama", seed=123)
    with pytest.raises(UserError, match="another base model"):
        load_adapter(other, tmp_path / "adapter")
    bert, _ = build_arch("bert")
    with pytest.raises(UserError, match="adapts layer .* which this model does not have"):
        load_adapter(bert, tmp_path / "adapter")


def test_bf16_reload_of_same_base_is_accepted_and_applies_the_adapter(tmp_path):
    inputs = arch_batch("llama")
    model = adapted("llama", scale=0.3)
    save_adapter(model, tmp_path / "adapter")
    same_bf16, _ = build_arch("llama", dtype=torch.bfloat16)
    with torch.no_grad():
        base_error = (same_bf16(**inputs).logits.float() - model(**inputs).logits).abs().max()
        load_adapter(same_bf16, tmp_path / "adapter")
        loaded_error = (same_bf16(**inputs).logits.float() - model(**inputs).logits).abs().max()
    for name, layer in neuroada_layers(same_bf16).items():
        assert layer.delta.dtype == torch.float32
        assert torch.equal(layer.delta, neuroada_layers(model)[name].delta), name
    assert loaded_error < 0.2 * base_error  # only bf16 rounding is left of the adapter's effect


def test_training_updates_reach_the_forward_in_bf16():
    model = adapted("llama", dtype=torch.bfloat16)
    reference = adapted("llama", impl="reference", dtype=torch.bfloat16)
    inputs = arch_batch("llama")
    with torch.no_grad():
        start = model(**inputs).logits
    params = [p for p in model.parameters() if p.requires_grad]
    ref_params = [p for p in reference.parameters() if p.requires_grad]
    opt, ref_opt = torch.optim.SGD(params, lr=0.5), torch.optim.SGD(ref_params, lr=0.5)
    for _ in range(3):
        for m, o in ((model, opt), (reference, ref_opt)):
            o.zero_grad()
            m(**inputs).loss.backward()
            o.step()
    with torch.no_grad():
        trained, trained_ref = model(**inputs).logits, reference(**inputs).logits
    assert (trained - start).abs().max() > 0.1  # the steps moved the output, well beyond the tolerance below
    torch.testing.assert_close(trained, trained_ref, rtol=0.02, atol=0.02)


def test_updates_below_bf16_resolution_accumulate_in_the_fp32_delta_and_reach_the_forward():
    inputs = arch_batch("llama")
    model = adapted("llama", dtype=torch.bfloat16, scale=0.0)
    layer = model.model.layers[0].self_attn.q_proj
    orig = layer.neuroada_orig
    ulp = torch.pow(2.0, torch.floor(torch.log2(orig.float().abs())) - 7)  # bf16 spacing at each selected value
    step = ulp / 8  # each step alone rounds away in bf16 ...
    assert torch.equal((orig.float() + step).bfloat16(), orig)
    stored_in_w = orig.clone()
    with torch.no_grad():
        start = model(**inputs).logits
        for i in range(64):
            layer.delta.add_(step)  # what an optimizer step does
            stored_in_w.add_(step)  # the same updates applied to the bf16 weight itself
            if i % 8 == 7:
                model(**inputs)  # the fused layer rewrites W from the delta in forward
        assert torch.equal(stored_in_w, orig)  # ... so in bf16 they all vanish
        cells = layer.base_layer.weight.gather(1, layer.neuroada_idx)
        assert torch.equal(cells, (orig.float() + 8 * ulp).bfloat16())  # the fp32 delta kept all 64
        unmerged = model(**inputs).logits
        assert not torch.equal(unmerged, start)
        merge(model)
        assert torch.equal(layer.base_layer.weight.gather(1, layer.neuroada_idx), cells)
        assert torch.equal(model(**inputs).logits, unmerged)


def test_gradient_checkpointing_gives_same_delta_grads():
    inputs = arch_batch("llama")
    plain, checkpointed = adapted("llama"), adapted("llama")
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointed.train()
    plain.train()
    calls = {"plain": 0, "checkpointed": 0}
    for key, model in (("plain", plain), ("checkpointed", checkpointed)):
        model.model.layers[0].self_attn.q_proj.register_forward_hook(
            lambda *_, key=key: calls.__setitem__(key, calls[key] + 1))
        model(**inputs).loss.backward()
    assert calls == {"plain": 1, "checkpointed": 2}  # checkpointing took effect: backward recomputed the layer
    for a, b in zip(neuroada_layers(plain).values(), neuroada_layers(checkpointed).values()):
        torch.testing.assert_close(a.delta.grad, b.delta.grad, rtol=1e-5, atol=1e-8)


def test_only_deltas_bias_and_head_are_trainable_and_counted():
    model = adapted("bert", k=2, train_bias=True)
    count = count_parameters(model)
    layers = neuroada_layers(model)
    assert count.bypass == sum(layer.out_features * 2 for layer in layers.values())
    assert count.bias == sum(layer.out_features for layer in layers.values())
    assert count.head == sum(p.numel() for p in model.classifier.parameters())
    assert count.trainable == count.bypass + count.bias + count.head
    assert count.total == sum(p.numel() for p in build_arch("bert")[0].parameters())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all("neuroada_delta" in n or n.endswith(".bias") or n.startswith("classifier") for n in trainable)


def test_bad_targets_and_k_are_clear_errors():
    model, _ = build_arch("llama")
    with pytest.raises(UserError, match="match no layer"):
        inject(model, NeuroAdaConfig(k=1, target_modules=["nonexistent_proj"]))
    with pytest.raises(UserError, match="exceeds the 32 inputs"):
        inject(build_arch("llama")[0], NeuroAdaConfig(k=33, target_modules=["q_proj"]))
    with pytest.raises(UserError, match="k=0"):
        NeuroAdaConfig(k=0)
    with pytest.raises(UserError, match="selection"):
        NeuroAdaConfig(selection="best")
    injected = adapted("llama")
    with pytest.raises(UserError, match="already has"):
        inject(injected, NeuroAdaConfig(k=1, target_modules=["q_proj"]))


def test_deepcopy_and_state_dict_do_not_carry_selection_buffers():
    model = adapted("llama")
    assert not any("neuroada_idx" in key or "neuroada_orig" in key for key in model.state_dict())
    clone = copy.deepcopy(model)
    with torch.no_grad():
        torch.testing.assert_close(clone(**arch_batch("llama")).logits, model(**arch_batch("llama")).logits)


def test_a_fused_optimizer_step_reaches_the_forward_of_an_injected_model():
    """torch's fused AdamW writes the delta without bumping its version counter: the fused layer must still
    rewrite its cells before the next forward (transformers' Trainer uses fused AdamW by default)."""
    model = adapted("llama", scale=0.0)
    inputs = arch_batch("llama")
    before = model(**inputs).logits.detach()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, fused=True)
    model(**inputs).logits.float().pow(2).mean().backward()
    optimizer.step()
    after = model(**inputs).logits.detach()
    assert not torch.allclose(after, before)
    for layer in neuroada_layers(model).values():  # the forward used exactly orig + delta at the selected cells
        rows = torch.arange(layer.out_features).unsqueeze(1)
        torch.testing.assert_close(layer.weight[rows, layer.neuroada_idx].float(), layer.merged_values().float())
