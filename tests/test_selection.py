"""Selection semantics and paper fidelity of the trainable-parameter counts."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from neuroada_cli import NeuroAdaConfig, count_parameters, inject, neuroada_layers
from neuroada_cli.errors import UserError
from neuroada_cli.core import selection

from helpers import tiny_llama


def test_magnitude_keeps_largest_abs_per_row_sorted_by_column():
    weight = torch.tensor([[0.1, -5.0, 3.0, 0.2], [7.0, 0.0, -0.5, -8.0]])
    assert selection.magnitude(weight, 2).tolist() == [[1, 2], [0, 3]]
    assert selection.reverse(weight, 2).tolist() == [[0, 3], [1, 2]]


def test_ties_go_to_the_lower_column_deterministically():
    weight = torch.tensor([[1.0, -1.0, 1.0, 1.0, 0.5]])
    for _ in range(3):
        assert selection.magnitude(weight, 2).tolist() == [[0, 1]]
    assert selection.reverse(torch.ones(1, 6), 3).tolist() == [[0, 1, 2]]


def test_random_is_reproducible_distinct_and_layer_specific():
    a = selection.random_columns(64, 50, 7, seed=3, name="layers.0.q_proj")
    b = selection.random_columns(64, 50, 7, seed=3, name="layers.0.q_proj")
    c = selection.random_columns(64, 50, 7, seed=3, name="layers.1.q_proj")
    d = selection.random_columns(64, 50, 7, seed=4, name="layers.0.q_proj")
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, d)
    assert all(len(set(row)) == 7 for row in a.tolist())
    assert int(a.min()) >= 0 and int(a.max()) < 50


def test_magnitude_is_chunk_independent(monkeypatch):
    weight = torch.randn(300, 40)
    full = selection.magnitude(weight, 5)
    monkeypatch.setattr(selection, "ROW_CHUNK", 7)
    assert torch.equal(selection.magnitude(weight, 5), full)


def test_inject_uses_the_selection_per_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 6), nn.ReLU(), nn.Linear(6, 4))
    weights = [model[0].weight.detach().clone(), model[2].weight.detach().clone()]
    inject(model, NeuroAdaConfig(k=2, target_modules=["0", "2"], selection="reverse"))
    layers = neuroada_layers(model)
    assert torch.equal(layers["0"].neuroada_idx, selection.reverse(weights[0], 2))
    assert torch.equal(layers["2"].neuroada_idx, selection.reverse(weights[1], 2))
    assert not torch.equal(layers["0"].neuroada_idx, selection.magnitude(weights[0], 2))  # not the default


def _dense_grad_abs(model_factory, batches, name):
    model = model_factory()
    module = model.get_submodule(name)
    for p in model.parameters():
        p.requires_grad_(False)
    module.weight.requires_grad_(True)
    for batch in batches:
        model(**batch).loss.backward()
    return module.weight.grad.abs()


@pytest.mark.parametrize("n_batches", [1, 3])
def test_gradient_selection_equals_top_k_of_dense_gradient(n_batches):
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(n_batches):
        ids = torch.randint(0, 400, (2, 8), generator=generator)
        batches.append({"input_ids": ids, "labels": ids})
    model = tiny_llama()
    inject(model, NeuroAdaConfig(k=4, target_modules=["q_proj", "down_proj"], selection="gradient"),
           gradient_batches=batches)
    magnitude_model = tiny_llama()
    for name, layer in neuroada_layers(model).items():
        expected = selection.from_scores(_dense_grad_abs(tiny_llama, batches, name), 4)
        assert torch.equal(layer.neuroada_idx, expected), name
        # the option took effect: the paper's magnitude choice for this layer is a different one
        magnitude = selection.magnitude(magnitude_model.get_submodule(name).weight, 4)
        assert not torch.equal(layer.neuroada_idx, magnitude), name
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_gradient_selection_without_batches_is_a_clear_error():

    with pytest.raises(UserError, match="gradient_batches"):
        inject(tiny_llama(), NeuroAdaConfig(k=1, selection="gradient"))


PAPER = {  # model: (config kwargs, k=20 percent, k=1 percent) as reported in the paper
    "llama_7b": (dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      vocab_size=32000), 0.404, 0.020),
    "llama_13b": (dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                       vocab_size=32000), 0.327, 0.016),
    "llama3_8b": (dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256), 0.343, 0.017),
}


@pytest.mark.parametrize("name", PAPER)
def test_paper_trainable_percentages_on_meta_models(name):
    from transformers import LlamaConfig, LlamaForCausalLM

    kwargs, pct20, pct1 = PAPER[name]
    for k, expected in ((20, pct20), (1, pct1)):
        with torch.device("meta"):
            model = LlamaForCausalLM(LlamaConfig(**kwargs))
        inject(model, NeuroAdaConfig(k=k))
        count = count_parameters(model)
        assert round(count.percent, 3) == expected, (name, k, count.percent)
        assert count.trainable == count.bypass


def test_one_selection_table_names_exactly_the_configs_rules():
    from neuroada_cli.core.config import SELECTIONS

    assert tuple(selection.PER_ROW_RULES) == SELECTIONS
    weight = torch.randn(6, 9)
    for rule in ("magnitude", "reverse", "random"):
        idx = selection.columns(rule, weight, 3, 0, "layer")
        assert idx.shape == (6, 3) and torch.equal(idx, torch.sort(idx, dim=1).values), rule
    with pytest.raises(UserError, match="needs training batches"):
        selection.columns("gradient", weight, 3, 0, "layer")
    with pytest.raises(UserError, match="unknown"):
        selection.columns("largest", weight, 3, 0, "layer")


def test_the_config_constants_import_without_torch():
    import subprocess
    import sys

    code = ("import sys, neuroada_cli.core.config as c, neuroada_cli.core as core; "
            "assert c.MODES and c.SELECTIONS; "
            "bad = [m for m in ('torch', 'peft', 'transformers', 'bitsandbytes') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
