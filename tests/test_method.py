"""The NeuroAda method matrix: every check runs on tiny Llama, BERT, RoBERTa and GPT-NeoX models."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from neuroada_cli import (
    NeuroAdaConfig, count_parameters, inject, load_adapter, merge, neuroada_layers, save_adapter, unload, unmerge,
)
from neuroada_cli.errors import UserError


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg), ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _bert():
    from transformers import BertConfig, BertForSequenceClassification
    cfg = BertConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=64, num_labels=3)
    return BertForSequenceClassification(cfg), ["query", "key", "value", r".*attention\.output\.dense",
                                                r".*intermediate\.dense", r".*layer\.\d+\.output\.dense"]


def _roberta():
    from transformers import RobertaConfig, RobertaForSequenceClassification
    cfg = RobertaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=70, num_labels=2)
    return RobertaForSequenceClassification(cfg), ["query", "key", "value", "dense"]


def _neox():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    cfg = GPTNeoXConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=64)
    return GPTNeoXForCausalLM(cfg), ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]


ARCHS = {"llama": _llama, "bert": _bert, "roberta": _roberta, "gpt_neox": _neox}
HEADS = {"bert": ["classifier"], "roberta": ["classifier"]}


def build(arch: str, seed: int = 0, dtype=torch.float32):
    torch.manual_seed(seed)
    model, targets = ARCHS[arch]()
    for module in model.modules():  # random biases, so bias handling is exercised
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.normal_(module.bias, std=0.1)
    return model.to(dtype).eval(), targets


def batch(arch: str, seed: int = 1, length: int = 9):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 96, (2, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    if arch in ("bert", "roberta"):
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1])}
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def randomise_deltas(model, seed: int = 2, scale: float = 0.05):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in neuroada_layers(model).values():
            layer.neuroada_delta.copy_(torch.randn(layer.neuroada_delta.shape, generator=generator) * scale)


def adapted(arch: str, k: int = 3, impl: str = "fused", dtype=torch.float32, **kwargs):
    model, targets = build(arch, dtype=dtype)
    kwargs.setdefault("modules_to_save", HEADS.get(arch, []))
    inject(model, NeuroAdaConfig(k=k, target_modules=targets, impl=impl, **kwargs))
    randomise_deltas(model)
    return model


def naive_forward(model, arch, inputs):
    """Reference by hand: copy the model, write W + scatter(delta) into plain linears, run it."""
    plain, _ = build(arch, dtype=next(model.parameters()).dtype)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if "neuroada" not in k}, strict=False)
    modules = dict(plain.named_modules())
    with torch.no_grad():
        for name, layer in neuroada_layers(model).items():
            target = modules[name]
            dense = layer.neuroada_orig.float() + layer.neuroada_delta.float()
            weight = layer.base_layer.weight.detach().float().clone()
            weight.scatter_(1, layer.neuroada_idx, dense)
            target.weight.copy_(weight.to(target.weight.dtype))
    return plain(**inputs)


@pytest.mark.parametrize("k", [3, 8])  # the column path (small k) and sampled_addmm (larger k)
@pytest.mark.parametrize("arch", ARCHS)
def test_fused_equals_naive_reference_and_reference_impl(arch, k):
    inputs = batch(arch)
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
        assert a.neuroada_delta.grad is not None, name
        torch.testing.assert_close(a.neuroada_delta.grad, b.neuroada_delta.grad, rtol=1e-4, atol=1e-7)
    for name, param in fused.named_parameters():
        if param.requires_grad is False:
            assert param.grad is None, f"frozen {name} got a gradient"


@pytest.mark.parametrize("arch", ["llama", "roberta"])
def test_bf16_base_fused_matches_reference_and_keeps_fp32_deltas(arch):
    inputs = batch(arch)
    fused = adapted(arch, dtype=torch.bfloat16)
    reference = adapted(arch, impl="reference", dtype=torch.bfloat16)
    for layer in neuroada_layers(fused).values():
        assert layer.neuroada_delta.dtype == torch.float32
    out_fused, out_ref = fused(**inputs), reference(**inputs)
    torch.testing.assert_close(out_fused.logits, out_ref.logits, rtol=0, atol=0)
    out_fused.loss.backward()
    out_ref.loss.backward()
    for a, b in zip(neuroada_layers(fused).values(), neuroada_layers(reference).values()):
        assert a.neuroada_delta.grad.dtype == torch.float32
        scale = b.neuroada_delta.grad.abs().max().clamp_min(1e-6)
        assert ((a.neuroada_delta.grad - b.neuroada_delta.grad).abs().max() / scale) < 0.05


def test_autocast_bf16_grads_match_reference():
    inputs = batch("llama")
    fused, reference = adapted("llama"), adapted("llama", impl="reference")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_fused, out_ref = fused(**inputs), reference(**inputs)
    torch.testing.assert_close(out_fused.logits, out_ref.logits)
    out_fused.loss.backward()
    out_ref.loss.backward()
    for a, b in zip(neuroada_layers(fused).values(), neuroada_layers(reference).values()):
        scale = b.neuroada_delta.grad.abs().max().clamp_min(1e-6)
        assert ((a.neuroada_delta.grad - b.neuroada_delta.grad).abs().max() / scale) < 0.05


def test_layers_whose_selection_is_few_columns_save_only_those_columns():
    """k=1 on weights with a dominant input feature: backward keeps [T, few], not [T, d_in]; siblings agree."""
    def model_with_outlier_feature(impl, layers=("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "gate_proj")):
        model, targets = build("llama")
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
    inputs = batch("llama")
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
        torch.testing.assert_close(a.neuroada_delta.grad, b.neuroada_delta.grad, rtol=1e-4, atol=1e-7)


def test_gated_mlp_input_is_recomputed_from_its_factors_not_kept_twice():
    from neuroada_cli.method.layer import NeuroAdaLinear, product_factors

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
            layer.neuroada_delta.copy_(torch.randn(5, 3, generator=torch.Generator().manual_seed(3)))

    def run(layer, a, b):
        return layer(a * b)

    # input gradients by gradcheck; the delta gradient against the materialising reference below
    assert torch.autograd.gradcheck(lambda a, b: run(fused, a, b), (a, b), atol=1e-8)
    run(fused, a, b).pow(2).sum().backward()
    run(reference, a, b).pow(2).sum().backward()
    torch.testing.assert_close(fused.neuroada_delta.grad, reference.neuroada_delta.grad)
    # in a Llama, down_proj is fed act(gate) * up: the factor path is the one taken there
    model = adapted("llama")
    seen = []
    model.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda m, args: seen.append(product_factors(args[0])))
    model(**batch("llama")).loss.backward()
    assert seen and seen[0] is not None


def test_gradcheck_float64():
    """The fused autograd function against finite differences of W + scatter(delta)."""
    from neuroada_cli.method.layer import _FusedLinear

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
            return _FusedLinear.apply(x, merged, bias, delta, idx, input_cols, local_idx, None)
        return _FusedLinear.apply(x, merged, bias, delta, idx, None, None, None)

    for compact in (False, True):
        assert torch.autograd.gradcheck(lambda *a: fused(*a, compact), (x, delta, bias), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sddmm_strategies_agree_with_dense_product(dtype):
    from neuroada_cli.method.layer import _sddmm_columns, _sddmm_gather, _sddmm_sparse, sampled_delta_grad

    torch.manual_seed(0)
    grad_out, inputs = torch.randn(37, 11, dtype=dtype), torch.randn(37, 23, dtype=dtype)
    idx = torch.sort(torch.stack([torch.randperm(23)[:4] for _ in range(11)]), dim=1).values
    dense = (grad_out.t() @ inputs).gather(1, idx)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    for strategy in (_sddmm_columns, _sddmm_gather, _sddmm_sparse, sampled_delta_grad):
        torch.testing.assert_close(strategy(grad_out, inputs, idx), dense, **tol)
        torch.testing.assert_close(strategy(grad_out, inputs, idx[:, :1]), dense[:, :1], **tol)
    assert sampled_delta_grad(grad_out.bfloat16(), inputs.bfloat16(), idx).dtype == torch.float32


@pytest.mark.parametrize("arch", ARCHS)
def test_merge_equals_unmerged_and_unmerge_restores_bitwise(arch):
    inputs = batch(arch)
    model = adapted(arch)
    pristine, _ = build(arch)
    with torch.no_grad():
        before = model(**inputs).logits
        merge(model)
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
    inputs = batch(arch)
    model = adapted(arch, train_bias=True)
    with torch.no_grad():
        for layer in neuroada_layers(model).values():
            if layer.base_layer.bias is not None:
                layer.base_layer.bias.add_(0.3)
        for name in HEADS.get(arch, []):
            for p in model.get_submodule(name).parameters():
                p.add_(0.2)
        expected = model(**inputs).logits
    save_adapter(model, tmp_path / "adapter")
    fresh, _ = build(arch)
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
        assert tensors[f"{name}.delta"].dtype == torch.float32
        assert tensors[f"{name}.delta"].shape == (layer.out_features, 2)
        assert tensors[f"{name}.indices"].dtype == torch.int16
    assert not any("weight" in key for key in tensors)  # no base weights in the adapter


def test_mismatched_base_is_rejected(tmp_path):
    model = adapted("llama")
    save_adapter(model, tmp_path / "adapter")
    other, _ = build("llama", seed=123)
    with pytest.raises(UserError, match="another base model"):
        load_adapter(other, tmp_path / "adapter")
    bert, _ = build("bert")
    with pytest.raises(UserError, match="expects layer"):
        load_adapter(bert, tmp_path / "adapter")


def test_bf16_reload_of_same_base_is_accepted(tmp_path):
    model = adapted("llama")
    save_adapter(model, tmp_path / "adapter")
    same_bf16, _ = build("llama", dtype=torch.bfloat16)
    load_adapter(same_bf16, tmp_path / "adapter")


def test_training_updates_reach_the_forward_and_small_updates_survive_bf16():
    model = adapted("llama", dtype=torch.bfloat16)
    reference = adapted("llama", impl="reference", dtype=torch.bfloat16)
    inputs = batch("llama")
    params = [p for p in model.parameters() if p.requires_grad]
    ref_params = [p for p in reference.parameters() if p.requires_grad]
    opt, ref_opt = torch.optim.SGD(params, lr=1e-3), torch.optim.SGD(ref_params, lr=1e-3)
    for _ in range(3):
        for m, o in ((model, opt), (reference, ref_opt)):
            o.zero_grad()
            m(**inputs).loss.backward()
            o.step()
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, reference(**inputs).logits, rtol=0.02, atol=0.02)
    # An update far below bf16 resolution of the weight accumulates in the fp32 delta.
    layer = next(iter(neuroada_layers(model).values()))
    before = layer.neuroada_delta.detach().clone()
    with torch.no_grad():
        for _ in range(1000):
            layer.neuroada_delta.add_(1e-6)
    assert torch.allclose(layer.neuroada_delta - before, torch.full_like(before, 1e-3), atol=1e-5)


def test_gradient_checkpointing_gives_same_delta_grads():
    inputs = batch("llama")
    plain, checkpointed = adapted("llama"), adapted("llama")
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointed.train()
    plain.train()
    plain(**inputs).loss.backward()
    checkpointed(**inputs).loss.backward()
    for a, b in zip(neuroada_layers(plain).values(), neuroada_layers(checkpointed).values()):
        torch.testing.assert_close(a.neuroada_delta.grad, b.neuroada_delta.grad, rtol=1e-5, atol=1e-8)


def test_only_deltas_bias_and_head_are_trainable_and_counted():
    model = adapted("bert", k=2, train_bias=True)
    count = count_parameters(model)
    layers = neuroada_layers(model)
    assert count.bypass == sum(layer.out_features * 2 for layer in layers.values())
    assert count.bias == sum(layer.out_features for layer in layers.values())
    assert count.head == sum(p.numel() for p in model.classifier.parameters())
    assert count.trainable == count.bypass + count.bias + count.head
    assert count.total == sum(p.numel() for p in build("bert")[0].parameters())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all("neuroada_delta" in n or n.endswith(".bias") or n.startswith("classifier") for n in trainable)


def test_bad_targets_and_k_are_clear_errors():
    model, _ = build("llama")
    with pytest.raises(UserError, match="match no layer"):
        inject(model, NeuroAdaConfig(k=1, target_modules=["nonexistent_proj"]))
    with pytest.raises(UserError, match="exceeds the 32 inputs"):
        inject(build("llama")[0], NeuroAdaConfig(k=33, target_modules=["q_proj"]))
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
        torch.testing.assert_close(clone(**batch("llama")).logits, model(**batch("llama")).logits)
