"""The shared method matrix: every check runs on each tiny architecture (Llama, BERT, RoBERTa, GPT-NeoX)
and, where the implementation matters, on both impls (fused, reference), as PEFT's shared tests do.

(a) real optimizer steps change only the adapter, and W only at the selected cells, by the merged delta;
(b) merge twice == merge once, unmerge of an unmerged model is a no-op; (c) greedy generate() unmerged ==
merged; (d) what state_dict() holds; (e) a second adapter is refused; (f) save/load under impl=reference;
(g) an fp16 base.
"""
from __future__ import annotations

import pytest
import torch

from neuroada_cli import NeuroAdaConfig, inject, load_adapter, merge, neuroada_layers, save_adapter, unmerge
from neuroada_cli.errors import UserError

from helpers import ARCH_HEADS, ARCHS, CAUSAL_ARCHS, adapted, arch_batch, build_arch, naive_forward

IMPLS = ("fused", "reference")


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def assert_same_state(model, expected: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert state.keys() == expected.keys()
    for name, value in state.items():
        assert torch.equal(value, expected[name]), name


def merged_weight(pristine_weight: torch.Tensor, layer) -> torch.Tensor:
    """W with orig + delta (fp32, rounded once to W's dtype) written at the layer's selected cells."""
    cells = (pristine_weight.gather(1, layer.neuroada_idx).float() + layer.delta.detach())
    return pristine_weight.clone().scatter_(1, layer.neuroada_idx, cells.to(pristine_weight.dtype))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", ARCHS)
def test_a_optimizer_steps_change_only_the_adapter_and_w_only_at_the_selected_cells(arch, impl):
    model, targets = build_arch(arch)
    pristine = snapshot(model)
    inject(model, NeuroAdaConfig(k=3, target_modules=targets, impl=impl, modules_to_save=ARCH_HEADS.get(arch, [])))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    heads = tuple(f"{head}." for head in ARCH_HEADS.get(arch, []))
    assert trainable and all(name.endswith("neuroada_delta.default") or name.startswith(heads) for name in trainable)
    # AdamW over EVERY parameter: a frozen one that wrongly received a gradient would move too
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    inputs = arch_batch(arch)
    for _ in range(3):
        optimizer.zero_grad()
        model(**inputs).loss.backward()
        optimizer.step()
    layers = neuroada_layers(model)
    assert all(layer.delta.abs().max() > 1e-3 for layer in layers.values())
    merge(model)
    for name, value in model.state_dict().items():
        if name.endswith("neuroada_delta.default"):
            continue
        layer = layers.get(name.removesuffix(".base_layer.weight"))
        before = pristine[name.replace(".base_layer.", ".")]
        if layer is not None:  # a target weight: changed exactly at the selected cells, by the delta
            assert torch.equal(value, merged_weight(before, layer)), name
            changed = (value != before)
            assert changed.sum() > 0 and changed.sum() <= layer.neuroada_idx.numel()
            assert not changed.scatter(1, layer.neuroada_idx, False).any(), name  # nothing outside the cells
            torch.testing.assert_close((value - before).gather(1, layer.neuroada_idx), layer.delta.detach())
        elif name.startswith(heads):
            assert not torch.equal(value, before), f"head parameter {name} did not train"
        else:
            assert torch.equal(value, before), f"frozen {name} changed"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", ARCHS)
def test_b_merge_twice_equals_merge_once_and_unmerge_of_unmerged_is_a_no_op(arch, impl):
    inputs = arch_batch(arch)
    model = adapted(arch, impl=impl, scale=0.3)
    with torch.no_grad():
        unmerged_out = model(**inputs).logits
        state = snapshot(model)
        weights = {name: layer.base_layer.weight.clone() for name, layer in neuroada_layers(model).items()}
        unmerge(model)
        for name, layer in neuroada_layers(model).items():  # W itself untouched, not just rewritten later
            assert torch.equal(layer.base_layer.weight, weights[name]), name
        assert_same_state(model, state)
        assert torch.equal(model(**inputs).logits, unmerged_out)
        merge(model)
        merged_state, merged_out = snapshot(model), model(**inputs).logits
        merge(model)
        assert_same_state(model, merged_state)
        assert torch.equal(model(**inputs).logits, merged_out)
        torch.testing.assert_close(merged_out, unmerged_out, rtol=1e-5, atol=1e-6)
        unmerge(model)
        assert torch.equal(model(**inputs).logits, unmerged_out)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", CAUSAL_ARCHS)
def test_c_greedy_generate_unmerged_equals_merged(arch, impl):
    model = adapted(arch, impl=impl, scale=0.5)
    pristine, _ = build_arch(arch)
    ids = arch_batch(arch)["input_ids"][:, :5]
    settings = dict(attention_mask=torch.ones_like(ids), max_new_tokens=6, min_new_tokens=6, do_sample=False,
                    pad_token_id=0)
    with torch.no_grad():
        unmerged = model.generate(ids, **settings)
        assert not torch.equal(unmerged, pristine.generate(ids, **settings))  # the adapter changes the text
        merge(model)
        assert torch.equal(model.generate(ids, **settings), unmerged)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", ARCHS)
def test_d_state_dict_holds_the_pristine_base_and_the_deltas(arch, impl):
    inputs = arch_batch(arch)
    model = adapted(arch, impl=impl)  # deltas written after injection, no forward since
    pristine, _ = build_arch(arch)
    state = model.state_dict()
    assert not any("neuroada_idx" in key or "neuroada_orig" in key for key in state)  # selection: not persistent
    for name, layer in neuroada_layers(model).items():
        assert torch.equal(state[f"{name}.neuroada_delta.default"], layer.delta)
        # the base as loaded, whatever impl (PEFT's get_base_model_state_dict); the next forward rewrites the cells
        assert torch.equal(state[f"{name}.base_layer.weight"], pristine.get_submodule(name).weight), name
    # so it moves to another model of the same base, selection and impl and reproduces the outputs
    other = adapted(arch, impl=impl, scale=0.0)
    other.load_state_dict(snapshot(model))
    with torch.no_grad():
        torch.testing.assert_close(other(**inputs).logits, model(**inputs).logits, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model(**inputs).logits, naive_forward(model, arch, inputs).logits,
                                   rtol=1e-5, atol=1e-6)
    merge(model)  # merged on purpose: then the state dict holds the merged weight (what unload gives)
    for name, layer in neuroada_layers(model).items():
        assert torch.equal(model.state_dict()[f"{name}.base_layer.weight"],
                           merged_weight(pristine.get_submodule(name).weight, layer)), name


@pytest.mark.parametrize("arch", ARCHS)
def test_e_loading_onto_a_model_that_already_has_an_adapter_is_refused(arch, tmp_path):
    model = adapted(arch)
    save_adapter(model, tmp_path / "adapter")
    state = snapshot(model)
    for target in (model, adapted(arch, scale=0.1)):  # the same cells or other values: both refused
        with pytest.raises(UserError, match="already has an adapter") as error:
            load_adapter(target, tmp_path / "adapter")
        assert "\n" not in str(error.value) and "fresh base" in str(error.value)
    assert_same_state(model, state)  # and nothing was touched


@pytest.mark.parametrize("arch", ARCHS)
def test_f_save_load_with_impl_reference(arch, tmp_path):
    inputs = arch_batch(arch)
    model = adapted(arch, impl="reference", train_bias=True, scale=0.3)
    with torch.no_grad():
        expected = model(**inputs).logits
        assert not torch.equal(expected, build_arch(arch)[0](**inputs).logits)
    save_adapter(model, tmp_path / "adapter")
    reloaded = load_adapter(build_arch(arch)[0], tmp_path / "adapter")
    as_fused = load_adapter(build_arch(arch)[0], tmp_path / "adapter", impl="fused")
    assert {layer.impl for layer in neuroada_layers(reloaded).values()} == {"reference"}  # kept from the file
    assert {layer.impl for layer in neuroada_layers(as_fused).values()} == {"fused"}
    for name, layer in neuroada_layers(model).items():
        assert torch.equal(neuroada_layers(reloaded)[name].delta, layer.delta)
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, expected)
        torch.testing.assert_close(as_fused(**inputs).logits, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_g_fp16_base_keeps_fp32_deltas_matches_reference_and_restores_bitwise(arch, tmp_path):
    inputs = arch_batch(arch)
    # heads stay frozen: AdamW on fp16 parameters themselves (eps underflows) is not what is tested here
    fused = adapted(arch, dtype=torch.float16, scale=0.3, modules_to_save=[])
    reference = adapted(arch, impl="reference", dtype=torch.float16, scale=0.3, modules_to_save=[])
    pristine, _ = build_arch(arch, dtype=torch.float16)
    out_fused, out_ref = fused(**inputs), reference(**inputs)
    assert out_fused.logits.dtype == torch.float16
    assert torch.equal(out_fused.logits, out_ref.logits)  # the same fp16 weights, so the same numbers
    out_fused.loss.backward()
    out_ref.loss.backward()
    for a, b in zip(neuroada_layers(fused).values(), neuroada_layers(reference).values()):
        assert a.delta.dtype == a.delta.grad.dtype == torch.float32
        scale = b.delta.grad.abs().max().clamp_min(1e-6)
        assert (a.delta.grad - b.delta.grad).abs().max() / scale < 0.05
    torch.optim.AdamW([p for p in fused.parameters() if p.requires_grad], lr=1e-2).step()
    with torch.no_grad():
        merge(fused)
        for name, layer in neuroada_layers(fused).items():  # rounded once from fp32 orig + delta
            assert torch.equal(layer.base_layer.weight, merged_weight(pristine.get_submodule(name).weight, layer))
        save_adapter(fused, tmp_path / "adapter")
        expected = fused(**inputs).logits
        unmerge(fused)
        fused.eval()
        for name, layer in neuroada_layers(fused).items():
            layer.set_impl("reference")  # shows W as stored
            assert torch.equal(layer.base_layer.weight, pristine.get_submodule(name).weight), name
        reloaded = load_adapter(build_arch(arch, dtype=torch.float16)[0], tmp_path / "adapter")
        assert torch.equal(reloaded(**inputs).logits, expected)
