"""The PEFT face keeps PEFT's contract (issue 19 item 7) and is a thin face over inject's layer: the same cells for
every rule and scope, one declaration of the options, and PEFT's generic tuner battery (peft's
tests/test_custom_models.py + testing_common.py, rewritten here for NeuroAda rows; see the README for the battery
tests that cannot apply by design)."""
from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")

from neuroada_cli import NeuroAdaConfig, inject, neuroada_layers, save_adapter  # noqa: E402
from neuroada_cli.core.adapter_format import adapter_config_dict  # noqa: E402
from neuroada_cli.core.peft_tuner import NeuroAdaPeftConfig  # noqa: E402
from neuroada_cli.errors import UserError  # noqa: E402

from helpers import tiny_llama  # noqa: E402

TARGETS = ["q_proj", "v_proj", "down_proj"]


def ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(2, 400, (2, 9), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, input_ids=None) -> torch.Tensor:
    return model(input_ids=ids() if input_ids is None else input_ids).logits


def randomise(model, adapter: str = "default", seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in neuroada_layers(model).values():
            if adapter in layer.neuroada_delta:
                delta = layer.neuroada_delta[adapter]
                delta.copy_(torch.randn(delta.shape, generator=generator) * 0.05)


def cells(model) -> dict:
    return {name.removeprefix("base_model.model."): (layer.neuroada_row_counts, layer.neuroada_idx)
            for name, layer in neuroada_layers(model).items()}


# ------------------------------------------------------------------------------------ one face, one declaration
def test_the_peft_config_declares_exactly_neuroada_config_fields_with_the_same_defaults():
    plain = {f.name: f for f in dataclasses.fields(NeuroAdaConfig)}
    peft_fields = {f.name: f for f in dataclasses.fields(NeuroAdaPeftConfig)}
    own = set(peft_fields) - {f.name for f in dataclasses.fields(peft.PeftConfig)}
    assert own - {"base_fingerprint"} == set(plain)
    defaults = NeuroAdaPeftConfig().to_neuroada().to_dict()
    assert defaults == NeuroAdaConfig().to_dict()


def test_save_adapter_writes_what_peft_config_save_pretrained_writes(tmp_path):
    config = NeuroAdaConfig(k=3, target_modules=TARGETS, modules_to_save=[], mode="unmerged")
    written = adapter_config_dict(config, "some/base", "0123456789abcdef")
    NeuroAdaPeftConfig.from_neuroada(config, base_model_name_or_path="some/base", inference_mode=True,
                                     base_fingerprint="0123456789abcdef").save_pretrained(str(tmp_path))
    assert json.loads((tmp_path / "adapter_config.json").read_text()) == written


@pytest.mark.parametrize("selection", ["magnitude", "reverse", "random"])
@pytest.mark.parametrize("placement", [dict(scope="neuron"), dict(scope="neuron", neuron_fraction=0.5),
                                       dict(scope="layer"), dict(scope="global")])
def test_inject_and_the_peft_tuner_choose_identical_cells(selection, placement):
    options = dict(k=3, target_modules=TARGETS, selection=selection, seed=4, **placement)
    injected = inject(tiny_llama(seed=2), NeuroAdaConfig(**options))
    wrapped = peft.get_peft_model(tiny_llama(seed=2), NeuroAdaPeftConfig(**options))
    expected, got = cells(injected), cells(wrapped)
    assert set(got) == set(expected)
    for name, (counts, idx) in expected.items():
        assert (counts is None) == (got[name][0] is None), name
        assert torch.equal(idx, got[name][1]), name
        if counts is not None:
            assert torch.equal(counts, got[name][0]), name


def test_gradient_selection_is_refused_the_same_way_on_the_peft_face():
    with pytest.raises(UserError, match="needs training batches"):
        peft.get_peft_model(tiny_llama(), NeuroAdaPeftConfig(k=2, target_modules=TARGETS, selection="gradient"))


def test_peft_face_step_equals_inject_step():
    """Same layer class: the same forward, the same delta gradients (bitwise), so the same step time."""
    injected = inject(tiny_llama(seed=3), NeuroAdaConfig(k=3, target_modules=TARGETS))
    wrapped = peft.get_peft_model(tiny_llama(seed=3), NeuroAdaPeftConfig(k=3, target_modules=TARGETS))
    assert {type(m) for m in neuroada_layers(injected).values()} == {type(m) for m in neuroada_layers(wrapped).values()}
    for model in (injected, wrapped):
        randomise(model)
        model(input_ids=ids(), labels=ids()).loss.backward()
    for name, layer in neuroada_layers(injected).items():
        other = neuroada_layers(wrapped)[f"base_model.model.{name}"]
        assert torch.equal(layer.delta.grad, other.delta.grad), name


# ------------------------------------------------------------------------------------- issue 19 item 7 (a)-(f)
def trained_peft(tmp_path, seed: int = 5):
    model = peft.get_peft_model(tiny_llama(seed=seed), NeuroAdaPeftConfig(k=2, target_modules=TARGETS))
    randomise(model)
    expected = logits(model)
    model.save_pretrained(str(tmp_path / "a"))
    return expected


def test_a_low_cpu_mem_usage_loads_with_deltas_on_meta(tmp_path):
    expected = trained_peft(tmp_path)
    loaded = peft.PeftModel.from_pretrained(tiny_llama(seed=5), str(tmp_path / "a"), low_cpu_mem_usage=True)
    assert not any(p.is_meta for p in loaded.parameters())
    torch.testing.assert_close(logits(loaded), expected)
    # inject_adapter_in_model + set_peft_model_state_dict, the other low-memory entry
    base = tiny_llama(seed=5)
    config = NeuroAdaPeftConfig(k=2, target_modules=TARGETS)
    injected = peft.inject_adapter_in_model(config, base, low_cpu_mem_usage=True)
    assert any(p.is_meta for p in injected.parameters())  # deltas wait on meta: nothing may write them into W
    logits(injected)  # a forward before the load must not fail either
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    peft.set_peft_model_state_dict(injected, state, low_cpu_mem_usage=True)
    torch.testing.assert_close(logits(injected), expected)


def test_b_disable_adapter_after_merge_adapter_gives_the_base_bitwise():
    base = tiny_llama(seed=6)
    expected = logits(base)
    model = peft.get_peft_model(copy.deepcopy(base), NeuroAdaPeftConfig(k=2, target_modules=TARGETS))
    randomise(model)
    adapted = logits(model)
    model.merge_adapter()
    with model.disable_adapter():
        assert torch.equal(logits(model), expected)
    torch.testing.assert_close(logits(model), adapted)
    model.unmerge_adapter()
    with model.disable_adapter():
        assert torch.equal(logits(model), expected)
    torch.testing.assert_close(logits(model), adapted)


def test_c_merge_and_unload_of_one_adapter_leaves_no_other_adapter_merged():
    base = tiny_llama(seed=7)
    model = peft.get_peft_model(copy.deepcopy(base), NeuroAdaPeftConfig(k=2, target_modules=["q_proj", "v_proj"]),
                                adapter_name="A")
    model.add_adapter("B", NeuroAdaPeftConfig(k=2, target_modules=["q_proj"]))
    randomise(model, "A", seed=1)
    randomise(model, "B", seed=2)
    model.set_adapter("A")
    logits(model)  # A written into the cells of q_proj and v_proj
    only_b = copy.deepcopy(model)
    only_b.delete_adapter("A")  # the expected result: B alone
    only_b.set_adapter("B")
    expected = logits(only_b.merge_and_unload())
    merged = model.merge_and_unload(adapter_names=["B"])
    assert torch.equal(logits(merged), expected)
    for name, module in merged.named_modules():
        if name.endswith("v_proj"):  # held A only: pristine
            assert torch.equal(module.weight, base.get_submodule(name).weight), name


class FsdpStyleWrapper(nn.Module):
    """What FSDP(1) puts around a module: the real one as ``_fsdp_wrapped_module`` (here without sharding)."""

    def __init__(self, module):
        super().__init__()
        self._fsdp_wrapped_module = module

    def forward(self, *args, **kwargs):
        return self._fsdp_wrapped_module(*args, **kwargs)


def test_d_adapter_state_dict_of_an_fsdp_wrapped_model_has_the_model_keys_and_loads_back():
    model = peft.get_peft_model(tiny_llama(seed=8), NeuroAdaPeftConfig(k=2, target_modules=TARGETS))
    randomise(model)
    expected = logits(model)
    layers = model.base_model.model.model.layers
    layers[0] = FsdpStyleWrapper(layers[0])
    state = peft.get_peft_model_state_dict(model)
    assert state and not any("_fsdp_wrapped_module" in key for key in state)
    fresh = peft.get_peft_model(tiny_llama(seed=8), NeuroAdaPeftConfig(k=2, target_modules=TARGETS))
    result = peft.set_peft_model_state_dict(fresh, state)
    assert not [key for key in result.unexpected_keys if "neuroada" in key]
    torch.testing.assert_close(logits(fresh), expected)


def test_e_a_module_both_targeted_and_fully_trained_is_named_in_one_line():
    with pytest.raises(UserError) as caught:
        peft.get_peft_model(tiny_llama(), NeuroAdaPeftConfig(k=2, target_modules=["q_proj", "v_proj"],
                                                             modules_to_save=["v_proj"]))
    message = str(caught.value)
    assert "v_proj" in message and "modules_to_save" in message and "\n" not in message
    assert "ModulesToSaveWrapper" not in message and "original_module" not in message


def test_f_base_model_state_dict_is_pristine_and_a_new_base_is_never_overwritten():
    from peft.utils.save_and_load import get_base_model_state_dict, set_base_model_state_dict

    base = tiny_llama(seed=9)
    model = peft.get_peft_model(copy.deepcopy(base), NeuroAdaPeftConfig(k=2, target_modules=TARGETS))
    randomise(model)
    adapted = logits(model)  # cells written: W holds orig + delta
    state = get_base_model_state_dict(model)
    for key, value in base.state_dict().items():
        assert torch.equal(state[key], value), key
    torch.testing.assert_close(logits(model), adapted)  # and the adapter is back at the next forward
    new_base = tiny_llama(seed=10)
    set_base_model_state_dict(model, new_base.state_dict())
    with model.disable_adapter():
        assert torch.equal(logits(model), logits(new_base))
    unloaded = model.unload()
    for key, value in new_base.state_dict().items():
        assert torch.equal(unloaded.state_dict()[key], value), key


# ------------------------------------------------------------------- PEFT's generic battery on NeuroAda rows
def test_battery_save_load_roundtrip_and_inject_face_file_are_one_format(tmp_path):
    expected = trained_peft(tmp_path)
    loaded = peft.PeftModel.from_pretrained(tiny_llama(seed=5), str(tmp_path / "a"))
    torch.testing.assert_close(logits(loaded), expected)
    from neuroada_cli import load_adapter

    plain = load_adapter(tiny_llama(seed=5), tmp_path / "a")
    torch.testing.assert_close(logits(plain), expected)
    save_adapter(plain, tmp_path / "b")
    again = peft.PeftModel.from_pretrained(tiny_llama(seed=5), str(tmp_path / "b"))
    torch.testing.assert_close(logits(again), expected)


def test_battery_merge_unmerge_safe_merge_and_unload_give_back_the_base():
    base = tiny_llama(seed=11)
    expected = logits(base)
    model = peft.get_peft_model(copy.deepcopy(base), NeuroAdaPeftConfig(k=2, target_modules=TARGETS))
    randomise(model)
    adapted = logits(model)
    model.merge_adapter(safe_merge=True)
    torch.testing.assert_close(logits(model), adapted)
    model.unmerge_adapter()
    torch.testing.assert_close(logits(model), adapted)
    assert torch.equal(logits(copy.deepcopy(model).unload()), expected)
    torch.testing.assert_close(logits(model.merge_and_unload()), adapted)


def test_battery_training_moves_only_the_adapter_and_lowers_the_loss():
    model = peft.get_peft_model(tiny_llama(seed=12), NeuroAdaPeftConfig(k=2, target_modules=TARGETS))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".neuroada_delta.default" in name for name in trainable)
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    losses = []
    for _ in range(4):
        loss = model(input_ids=ids(), labels=ids()).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    state = get_pristine(model)
    for name, value in frozen.items():
        assert torch.equal(state[name], value), name


def get_pristine(model) -> dict:
    return dict(model.named_parameters()) | {k: v for k, v in model.state_dict().items()}


def test_battery_delete_adapter_and_add_another_keep_the_base():
    base = tiny_llama(seed=13)
    expected = logits(base)
    model = peft.get_peft_model(copy.deepcopy(base), NeuroAdaPeftConfig(k=2, target_modules=TARGETS))
    randomise(model)
    model.add_adapter("other", NeuroAdaPeftConfig(k=3, target_modules=TARGETS))
    model.set_adapter("other")
    model.delete_adapter("default")
    assert all(list(layer.neuroada_delta) == ["other"] for layer in neuroada_layers(model).values())
    assert torch.equal(logits(model), expected)  # "other" is still zero: the base exactly
