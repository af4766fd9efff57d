"""Placement ablations: scope=layer|global and neuron_fraction, on the general (CSR) cell layout."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from neuroada_cli import NeuroAdaConfig, count_parameters, inject, merge, neuroada_layers, unmerge
from neuroada_cli.errors import UserError
from neuroada_cli.core import selection


class TwoLayers(nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.q_proj = nn.Linear(12, 10)
        self.up_proj = nn.Linear(10, 16)
        with torch.no_grad():  # outliers in a few cells of q_proj: global magnitude should concentrate there
            self.q_proj.weight[3, :] *= 20

    def forward(self, x):
        return self.up_proj(torch.tanh(self.q_proj(x)))


def adapted(impl="fused", **overrides):
    values = dict(k=2, target_modules=["q_proj", "up_proj"], impl=impl)
    model = TwoLayers()
    return inject(model, NeuroAdaConfig(**{**values, **overrides})), TwoLayers()


def chosen_positions(layer) -> set[int]:
    return set(layer.flat_indices().tolist())


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_layer_and_global_place_exactly_the_per_neuron_budget(scope):
    model, _ = adapted(scope=scope)
    layers = neuroada_layers(model)
    total = sum(layer.delta.numel() for layer in layers.values())
    assert total == (10 + 16) * 2
    if scope == "layer":
        assert [layer.delta.numel() for layer in layers.values()] == [20, 32]
    for layer in layers.values():
        assert layer.general_layout and int(layer.neuroada_row_counts.sum()) == layer.neuroada_idx.numel()
        assert len(chosen_positions(layer)) == layer.neuroada_idx.numel()  # distinct cells
    assert count_parameters(model).bypass == total


def test_layer_scope_takes_the_top_scoring_cells_of_each_layer():
    model, pristine = adapted(scope="layer")
    for name, layer in neuroada_layers(model).items():
        scores = getattr(pristine, name).weight.abs().reshape(-1)
        budget = layer.out_features * 2
        expected = set(torch.sort(scores, descending=True, stable=True).indices[:budget].tolist())
        assert chosen_positions(layer) == expected
    reverse, _ = adapted(scope="layer", selection="reverse")
    q = neuroada_layers(reverse)["q_proj"]
    worst = set(torch.sort(pristine.q_proj.weight.abs().reshape(-1), stable=True).indices[:20].tolist())
    assert chosen_positions(q) == worst


def test_global_scope_takes_the_top_cells_across_layers_by_raw_magnitude():
    model, pristine = adapted(scope="global")
    layers = neuroada_layers(model)
    values = torch.cat([pristine.q_proj.weight.abs().reshape(-1), pristine.up_proj.weight.abs().reshape(-1)])
    threshold = torch.sort(values, descending=True).values[52 - 1]
    for name, layer in layers.items():
        weight = getattr(pristine, name).weight.abs().reshape(-1)
        picked = torch.tensor(sorted(chosen_positions(layer)), dtype=torch.long)
        assert bool((weight[picked] >= threshold).all())
        assert int((weight > threshold).sum()) <= picked.numel()  # nothing strictly better left out
    assert int(layers["q_proj"].neuroada_row_counts[3]) == 12  # the outlier row takes every cell it has


def test_global_streaming_matches_a_single_sort_and_random_is_seeded():
    torch.manual_seed(1)
    scores = {"a": torch.rand(5, 7), "b": torch.rand(4, 3)}
    cells = selection.top_cells_global(scores, 9, largest=True)
    flat = torch.cat([scores["a"].reshape(-1), scores["b"].reshape(-1)])
    best = set(torch.topk(flat, 9).indices.tolist())
    got = {int(p) for p in (torch.repeat_interleave(torch.arange(5), cells["a"][0]) * 7 + cells["a"][1])}
    got |= {35 + int(p) for p in (torch.repeat_interleave(torch.arange(4), cells["b"][0]) * 3 + cells["b"][1])}
    assert got == best
    one, _ = adapted(scope="global", selection="random", seed=3)
    two, _ = adapted(scope="global", selection="random", seed=3)
    other, _ = adapted(scope="global", selection="random", seed=4)
    key = lambda m: [chosen_positions(layer) for layer in neuroada_layers(m).values()]  # noqa: E731
    assert key(one) == key(two) != key(other)


@pytest.mark.parametrize("selection_name", ["magnitude", "random"])
def test_neuron_fraction_covers_a_seeded_share_of_rows_with_k_each(selection_name):
    model, pristine = adapted(neuron_fraction=0.5, selection=selection_name)
    full, _ = adapted(selection=selection_name)
    for name, layer in neuroada_layers(model).items():
        counts = layer.neuroada_row_counts
        assert int((counts == 2).sum()) == round(0.5 * layer.out_features) and int((counts == 0).sum()) == \
            layer.out_features - round(0.5 * layer.out_features)
        per_row = neuroada_layers(full)[name].neuroada_idx  # covered rows keep exactly the per-neuron choice
        rows = torch.repeat_interleave(torch.arange(layer.out_features), counts)
        assert torch.equal(layer.neuroada_idx.view(-1, 2), per_row[rows[::2]])
    assert count_parameters(model).bypass == 5 * 2 + 8 * 2


def train_steps(model, steps=3, weight_decay=0.1):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=0.05, weight_decay=weight_decay)
    torch.manual_seed(5)
    for _ in range(steps):
        loss = model(torch.randn(6, 12)).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("overrides", [dict(scope="global"), dict(scope="layer"), dict(neuron_fraction=0.5)])
def test_only_the_chosen_cells_of_w_ever_change(overrides):
    model, pristine = adapted(**overrides)
    train_steps(model)
    for name, layer in neuroada_layers(model).items():
        assert bool(layer.delta.abs().gt(0).any())
        before, after = getattr(pristine, name).weight.reshape(-1), layer.base_layer.weight.reshape(-1)
        changed = set(torch.nonzero(before != after).view(-1).tolist())
        assert changed <= chosen_positions(layer)  # rows without cells, and unchosen cells, stay bitwise


@pytest.mark.parametrize("overrides", [dict(scope="global"), dict(neuron_fraction=0.5)])
def test_fused_matches_reference_in_outputs_and_delta_grads(overrides):
    fused, _ = adapted("fused", **overrides)
    reference, _ = adapted("reference", **overrides)
    torch.manual_seed(2)
    for model in (fused, reference):
        for layer in neuroada_layers(model).values():
            with torch.no_grad():
                layer.delta.copy_(torch.linspace(-0.5, 0.5, layer.delta.numel()))
    x = torch.randn(7, 12)
    outputs = []
    for model in (fused, reference):
        out = model(x)
        out.pow(2).sum().backward()
        outputs.append(out)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)
    for (name, a), b in zip(neuroada_layers(fused).items(), neuroada_layers(reference).values()):
        torch.testing.assert_close(a.delta.grad, b.delta.grad, rtol=1e-4, atol=1e-5)


def test_cell_grad_fallback_matches_sampled_addmm(monkeypatch):
    from neuroada_cli.core import sddmm as layer_module

    grad_out, inputs = torch.randn(9, 4), torch.randn(9, 6)
    counts = torch.tensor([0, 3, 1, 2])
    cols = torch.tensor([0, 2, 5, 1, 3, 4])
    crow = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    rows = torch.repeat_interleave(torch.arange(4), counts)
    fast = layer_module.sampled_cell_grad(grad_out, inputs, crow, rows, cols)
    dense = (grad_out.t() @ inputs)[rows, cols]
    torch.testing.assert_close(fast, dense)
    monkeypatch.setattr(torch.sparse, "sampled_addmm", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no")))
    torch.testing.assert_close(layer_module.sampled_cell_grad(grad_out, inputs, crow, rows, cols), dense)


def test_merge_unmerge_is_bitwise_under_unequal_rows():
    model, pristine = adapted(scope="global")
    train_steps(model)
    layers = neuroada_layers(model)
    merge(model)
    x = torch.randn(3, 12)
    merged_out = model(x)
    unmerge(model)
    for name, layer in layers.items():
        layer.restore_cells()
        assert torch.equal(layer.base_layer.weight, getattr(pristine, name).weight)
    torch.testing.assert_close(model(x), merged_out, rtol=1e-5, atol=1e-6)


def test_state_dict_round_trip_and_deepcopy_keep_the_layout():
    model, _ = adapted(neuron_fraction=0.5)
    train_steps(model)
    clone = copy.deepcopy(model)
    x = torch.randn(4, 12)
    torch.testing.assert_close(clone(x), model(x))
    for a, b in zip(neuroada_layers(model).values(), neuroada_layers(clone).values()):
        assert torch.equal(a.neuroada_row_counts, b.neuroada_row_counts) and torch.equal(a.neuroada_idx, b.neuroada_idx)


def test_injecting_saved_cells_reproduces_the_model():
    """What load_adapter does: inject(indices=...) with the saved (row_counts, cols), then copy the deltas."""
    model, _ = adapted(scope="layer")
    train_steps(model)
    saved = {name: (layer.neuroada_row_counts.clone(), layer.neuroada_idx.clone())
             for name, layer in neuroada_layers(model).items()}
    fresh = inject(TwoLayers(), model.neuroada_config, indices=saved)
    with torch.no_grad():
        for name, layer in neuroada_layers(fresh).items():
            layer.delta.copy_(neuroada_layers(model)[name].delta)
    x = torch.randn(4, 12)
    torch.testing.assert_close(fresh(x), model(x))


@pytest.mark.parametrize("overrides, message", [
    (dict(scope="row"), "scope='row' is unknown"),
    (dict(neuron_fraction=0), "neuron_fraction=0 is invalid"),
    (dict(neuron_fraction=1.5), "neuron_fraction=1.5 is invalid"),
    (dict(neuron_fraction="half"), "neuron_fraction='half' is invalid"),
    (dict(scope="layer", selection="gradient"), "gradient selection is per neuron only"),
    (dict(scope="global", neuron_fraction=0.5), "applies to scope=neuron only"),
])
def test_config_validation_of_the_new_keys(overrides, message):
    with pytest.raises(UserError, match=message) as caught:
        NeuroAdaConfig(target_modules=["q_proj"], **overrides)
    assert "\n" not in str(caught.value)


def test_peft_path_takes_general_placement_like_inject():
    """(was: refused) The PEFT face now builds the same layer, general layout included; more in test_peft_contract."""
    peft = pytest.importorskip("peft")
    from neuroada_cli.core.peft_tuner import NeuroAdaPeftConfig

    model = peft.get_peft_model(TwoLayers(), NeuroAdaPeftConfig(k=2, target_modules=["q_proj"], scope="layer"))
    layers = neuroada_layers(model)
    assert layers and all(layer.general_layout for layer in layers.values())


@pytest.mark.parametrize("compact", [False, True])
def test_general_layer_grads_match_the_dense_gradient_also_with_compact_inputs(compact):
    from neuroada_cli.core.layer import NeuroAdaLinear

    torch.manual_seed(0)
    base = nn.Linear(9, 5)
    counts = torch.tensor([3, 0, 1, 0, 2])
    cols = torch.tensor([1, 4, 8, 4, 0, 8])
    layer = NeuroAdaLinear(copy.deepcopy(base), (counts, cols), compact_input=compact)
    assert (layer.neuroada_input_cols is not None) == compact
    x = torch.randn(2, 3, 9)
    grad_out = torch.randn(2, 3, 5)
    layer(x).backward(grad_out)
    dense = grad_out.reshape(-1, 5).t() @ x.reshape(-1, 9)
    rows = torch.repeat_interleave(torch.arange(5), counts)
    torch.testing.assert_close(layer.delta.grad, dense[rows, cols])


def test_a_layer_left_without_cells_by_global_scope_still_trains_and_reloads():
    class Outlier(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.q_proj, self.up_proj = nn.Linear(8, 4), nn.Linear(4, 8)
            with torch.no_grad():
                self.q_proj.weight.mul_(100)

        def forward(self, x):
            return self.up_proj(self.q_proj(x))

    model = inject(Outlier(), NeuroAdaConfig(k=2, target_modules=["q_proj", "up_proj"], scope="global"))
    layers = neuroada_layers(model)
    assert layers["up_proj"].delta.numel() == 0 and layers["q_proj"].delta.numel() == 24
    pristine = Outlier().up_proj.weight
    train_steps_on = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(torch.randn(2, 8)).sum().backward()
    train_steps_on.step()
    model(torch.randn(2, 8))
    assert torch.equal(layers["up_proj"].base_layer.weight, pristine)
    assert count_parameters(model).bypass == 24


@pytest.mark.parametrize("config", [dict(scope="layer"), dict(scope="global", selection="random"),
                                    dict(neuron_fraction=0.5)])
def test_general_layouts_round_trip_through_the_adapter_file(tmp_path, config):
    """save_adapter / load_adapter keep the cells (row counts, columns) and the deltas of an unequal-rows layout."""
    from helpers import adapted as adapted_arch
    from helpers import arch_batch, build_arch

    from neuroada_cli import load_adapter, save_adapter

    model = adapted_arch("llama", **config)
    save_adapter(model, tmp_path / "adapter")
    fresh, _ = build_arch("llama")
    loaded = load_adapter(fresh, tmp_path / "adapter")
    inputs = arch_batch("llama")
    torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits)
    saved_layers, loaded_layers = neuroada_layers(model), neuroada_layers(loaded)
    assert saved_layers.keys() == loaded_layers.keys()
    for name, layer in saved_layers.items():
        other = loaded_layers[name]
        assert torch.equal(layer.neuroada_row_counts, other.neuroada_row_counts)
        assert torch.equal(layer.neuroada_idx, other.neuroada_idx)
        assert torch.equal(layer.delta, other.delta)
