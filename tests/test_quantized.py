"""NeuroAda (and QLoRA) on a bitsandbytes base, on CPU (issue 21 items 2-4): cells chosen on the full-precision
weights, training, the adapter round trip, the merges, and the CLI end to end. Loading: test_quantized_loading.py.

Quantization error stated here (tiny 2-layer Llama, fp32 compute): the logits of the nf4 base differ from the
full-precision base's by up to ~5 % of their range, int8 by ~0.5 %. An adapter adds nothing to that: merged into
the full-precision base it gives the unmerged quantized forward within the base's own quantization error, and
merged into a dequantized copy (eval.merge) within 5 % of that error for nf4 (the same weights, other kernels),
and within 1x of it for int8, whose kernels also round the activations to int8 (a dense copy cannot).
"""
from __future__ import annotations

import json

import pytest
import torch
from helpers import cli, tiny_overrides, train_in_process, write_train_rows
from safetensors.torch import load_file

from neuroada_cli import config as config_module
from neuroada_cli.core import neuroada_layers
from neuroada_cli.methods import get_method, load_trained

pytest.importorskip("bitsandbytes")

TARGETS = "[q_proj,v_proj,gate_proj,down_proj]"


def make_cfg(model_dir, quantization, *extra):
    overrides = [f"model.name_or_path={model_dir}", f"model.quantization={quantization or 'null'}", "neuroada.k=4",
                 f"neuroada.target_modules={TARGETS}", *extra]
    return config_module.validate(config_module.compose(None, overrides))


def attached(model_dir, quantization, *extra):
    from neuroada_cli.methods import load_base

    cfg = make_cfg(model_dir, quantization, *extra)
    model, tokenizer = load_base(cfg, None)
    return cfg, get_method("neuroada").attach(cfg, model), tokenizer


def batch():
    ids = torch.randint(3, 400, (4, 16), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "labels": ids}


def train_steps(model, steps: int = 5) -> list[float]:
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = model(**batch()).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def logits(model):
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch()["input_ids"]).logits.float()


@pytest.mark.parametrize("dtype", ["float32", pytest.param("bfloat16", marks=pytest.mark.slow)])
def test_cells_and_fingerprint_are_the_full_precision_runs(tiny_llama_dir, dtype, tmp_path):
    """Selected on the checkpoint's weights read before quantizing: the adapter a bf16/fp32 run selects."""
    _, quantized, _ = attached(tiny_llama_dir, "nf4", f"model.dtype={dtype}")
    _, plain, _ = attached(tiny_llama_dir, None, f"model.dtype={dtype}")
    q_layers, p_layers = neuroada_layers(quantized), neuroada_layers(plain)
    assert sorted(q_layers) == sorted(p_layers) and len(q_layers) == 8
    assert {layer.mode for layer in q_layers.values()} == {"unmerged"}
    for name, layer in q_layers.items():
        assert type(layer.base_layer).__name__ == "Linear4bit"
        assert torch.equal(layer.neuroada_idx, p_layers[name].neuroada_idx), name
        assert torch.equal(layer.neuroada_orig.float(), p_layers[name].neuroada_orig.float()), name
    get_method("neuroada").save(quantized, None, tmp_path / "q")
    get_method("neuroada").save(plain, None, tmp_path / "p")
    fingerprint = [json.loads((tmp_path / side / "adapter_config.json").read_text())["base_fingerprint"]
                   for side in ("q", "p")]
    assert fingerprint[0] == fingerprint[1] is not None
    # so an adapter trained on the bf16 base loads onto the quantized one (its fingerprint check passes)
    cfg = make_cfg(tiny_llama_dir, "nf4", f"model.dtype={dtype}")
    from neuroada_cli.methods import load_base

    reloaded = get_method("neuroada").load_for_eval(cfg, load_base(cfg, None)[0], tmp_path / "p")
    assert {layer.mode for layer in neuroada_layers(reloaded).values()} == {"unmerged"}


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_a_few_steps_lower_the_loss_and_leave_the_base_frozen(tiny_llama_dir, quantization):
    _, model, _ = attached(tiny_llama_dir, quantization)
    packed = {name: layer.base_layer.weight.detach().clone() for name, layer in neuroada_layers(model).items()}
    losses = train_steps(model)
    assert losses[-1] < losses[0] - 0.02, losses
    assert all(p.requires_grad == ("neuroada_delta" in n) for n, p in model.named_parameters())
    _, plain, _ = attached(tiny_llama_dir, None)  # counted as the full-precision base (4-bit storage is packed)
    assert get_method("neuroada").count(model) == get_method("neuroada").count(plain)
    for name, layer in neuroada_layers(model).items():  # the quantized storage is never written
        assert torch.equal(layer.base_layer.weight, packed[name])


@pytest.mark.parametrize("quantization, dequantized_tolerance",
                         [("nf4", 0.05), pytest.param("int8", 1.0, marks=pytest.mark.slow)])
def test_save_reload_and_merges_match_the_unmerged_quantized_forward(tiny_llama_dir, tmp_path, quantization,
                                                                    dequantized_tolerance):
    cfg, model, tokenizer = attached(tiny_llama_dir, quantization)
    train_steps(model, 3)
    trained = logits(model)
    get_method("neuroada").save(model, tokenizer, tmp_path / "adapter")

    reloaded, _, info = load_trained(cfg, tmp_path / "adapter", merge=False)  # fresh quantized base, unmerged
    assert info["quantization"] == quantization and not info["merged"]
    assert torch.allclose(logits(reloaded), trained, atol=1e-5)

    base_error = (logits(load_trained(cfg, None, merge=False)[0]) - logits(load_trained(cfg, None, merge=False,
                                                                                     full_precision=True)[0])).abs().max()
    exported, _, info = load_trained(cfg, tmp_path / "adapter", merge=True, full_precision=True)
    assert info["merged"] and info["quantization"] is None
    assert not any("bitsandbytes" in type(m).__module__ for m in exported.modules())
    # into the full-precision base: the unmerged quantized forward within the base's own quantization error
    assert (logits(exported) - trained).abs().max() <= 1.5 * base_error + 1e-4
    # and exactly orig + delta at the cells, the checkpoint's weights elsewhere
    stored = load_file(str(tiny_llama_dir / "model.safetensors"))
    deltas = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    name = "model.layers.1.mlp.down_proj"
    expected = stored[f"{name}.weight"].clone()
    idx = deltas[f"base_model.model.{name}.neuroada_indices"].long()
    expected.scatter_add_(1, idx, deltas[f"base_model.model.{name}.neuroada_delta"])
    assert torch.equal(exported.get_submodule(name).weight.detach(), expected)

    dequantized, _, info = load_trained(cfg, tmp_path / "adapter", merge=True)  # eval.merge: a dequantized copy
    assert info["merged"] and not any("bitsandbytes" in type(m).__module__ for m in dequantized.modules())
    assert (logits(dequantized) - trained).abs().max() <= dequantized_tolerance * max(base_error.item(), 1e-3)


def test_qlora_trains_on_the_quantized_base(tiny_llama_dir):
    cfg = make_cfg(tiny_llama_dir, "nf4", "method=lora", "lora.r=4", f"lora.target_modules={TARGETS}")
    from neuroada_cli.methods import load_base

    model, _ = load_base(cfg, None)
    model = get_method("lora").attach(cfg, model)
    assert type(model.base_model.model.model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    losses = train_steps(model)
    assert losses[-1] < losses[0] - 0.02, losses


def test_cli_train_eval_export_on_a_4bit_base(tiny_llama_dir, tmp_path):
    """The fast end to end in CI: nf4 base, gradient checkpointing, validation, eval unmerged, export merged."""
    data = write_train_rows(tmp_path / "data", n=24)
    rows = [{"instruction": f"Please answer the question: the quick fox {i}", "input": "",
             "output": "the correct answer is true", "answer": "true"} for i in range(2)]
    (data / "llm_adapters" / "boolq").mkdir(parents=True)
    (data / "llm_adapters" / "boolq" / "test.json").write_text(json.dumps(rows))
    run = tmp_path / "run"
    overrides = tiny_overrides(tiny_llama_dir, data, run, steps=2) + [
        "model.quantization=nf4", "trainer.gradient_checkpointing=true", "eval.after_train=true",
        "eval.tasks=[boolq]", "eval.limit=2", "eval.max_new_tokens=4"]
    result = cli("train", *overrides)
    assert "trainable" in result.stdout
    results = json.loads((run / "eval" / "results.json").read_text())
    assert "boolq" in results["tasks"]  # evaluated unmerged on the quantized base (eval.merge auto)
    assert results["model"]["quantization"] == "nf4" and results["model"]["merged"] is False
    assert "quantization: nf4" in (run / "config.yaml").read_text()
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["mode"] in ("auto", "unmerged")
    cli("export", f"run={run}", f"output={tmp_path / 'merged'}")
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("bitsandbytes" in type(m).__module__ for m in merged.modules())


@pytest.mark.slow
@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_cli_end_to_end_on_smollm2(tmp_path, quantization):
    data = write_train_rows(tmp_path / "data", n=24)
    run = tmp_path / "run"
    cli("train", "model.name_or_path=embedded:smollm2-135m-instruct", f"model.quantization={quantization}",
        "model.dtype=bfloat16", f"data.dir={data}", f"trainer.output_dir={run}", "trainer.max_steps=2",
        "trainer.batch_size=4", "trainer.micro_batch_size=2", "data.max_length=64", "neuroada.k=1",
        "trainer.checkpoint_every=0", "eval.after_train=false", timeout=900)
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    cli("export", f"run={run}", f"output={tmp_path / 'merged'}", timeout=900)
    assert (tmp_path / "merged" / "config.json").is_file()


@pytest.mark.slow
def test_train_in_process_with_lora_and_nf4(tiny_llama_dir, tmp_path):
    """QLoRA in the same training loop as NeuroAda (the baseline on the same base)."""
    data = write_train_rows(tmp_path / "data", n=24)
    overrides = tiny_overrides(tiny_llama_dir, data, tmp_path / "run", steps=2) + [
        "model.quantization=nf4", "method=lora", "lora.r=4", "eval.after_train=false"]
    run = train_in_process(overrides)
    assert (run / "adapter" / "adapter_model.safetensors").is_file()


def test_peft_face_on_a_bitsandbytes_model(tiny_llama_dir):
    """get_peft_model on a 4-bit model (core's tuner), selecting on the full-precision weights: the same cells as
    the inject face, and it trains."""
    from peft import get_peft_model

    from neuroada_cli import NeuroAdaPeftConfig
    from neuroada_cli.core.peft_tuner import set_selection_weights
    from neuroada_cli.models import full_precision_weights, load_model_and_tokenizer

    targets = TARGETS.strip("[]").split(",")
    model, _ = load_model_and_tokenizer(str(tiny_llama_dir), quantization="nf4")
    names = {name: (m.out_features, m.in_features) for name, m in model.named_modules()
             if name.rsplit(".", 1)[-1] in targets}
    weights = full_precision_weights(tiny_llama_dir, names, torch.float32)
    set_selection_weights(model, {name: weights[name] for name in weights})
    peft_model = get_peft_model(model, NeuroAdaPeftConfig(k=4, target_modules=targets))
    _, injected, _ = attached(tiny_llama_dir, "nf4")
    expected = {name: layer.neuroada_idx for name, layer in neuroada_layers(injected).items()}
    got = {name.removeprefix("base_model.model."): layer.neuroada_idx
           for name, layer in neuroada_layers(peft_model).items()}
    assert got.keys() == expected.keys() and all(torch.equal(got[n], expected[n]) for n in got)
    losses = train_steps(peft_model)
    assert losses[-1] < losses[0] - 0.02, losses


@pytest.mark.slow
def test_two_processes_on_a_4bit_base_equal_one_process(tiny_llama_dir, tmp_path):
    """DDP (accelerate launch, gloo on CPU) on an nf4 base: each process holds its own quantized copy."""
    from helpers import accelerate_launch, assert_same_adapter

    data = write_train_rows(tmp_path / "data")
    overrides = [o for o in tiny_overrides(tiny_llama_dir, data, tmp_path / "unused", steps=2)
                 if not o.startswith("trainer.output_dir")] + ["model.quantization=nf4", "eval.after_train=false"]
    one, two = tmp_path / "one", tmp_path / "two"
    cli("train", *overrides, f"trainer.output_dir={one}")
    accelerate_launch("train", *overrides, f"trainer.output_dir={two}", cwd=tmp_path)
    assert json.loads((two / "run.json").read_text())["world_size"] == 2
    assert_same_adapter(one, two)
