"""NeuroAda as a PEFT method: get_peft_model / save / from_pretrained / merge / switch, Trainer and TRL."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import tiny_llama
from safetensors.torch import load_file

import neuroada_cli
from neuroada_cli import NeuroAdaConfig, NeuroAdaPeftConfig, inject, load_adapter, neuroada_layers, save_adapter
from neuroada_cli.errors import UserError
from neuroada_cli.core.layer import NeuroAdaLinear as NeuroAdaPeftLinear

peft = pytest.importorskip("peft")
from peft import PeftModel, get_peft_model  # noqa: E402

DATA = Path(__file__).parent / "data"
TARGETS = ["q_proj", "v_proj", "down_proj"]


def ids(seed: int = 0, batch: int = 2, length: int = 16) -> torch.Tensor:
    return torch.randint(2, 400, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits(model, input_ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits.clone()


def peft_model(base_seed: int = 3, **config):
    config = {"k": 2, "target_modules": TARGETS, **config}
    return get_peft_model(tiny_llama(seed=base_seed), NeuroAdaPeftConfig(**config))


def randomize(model, adapter: str = "default", seed: int = 1, scale: float = 0.05) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, NeuroAdaPeftLinear) and adapter in layer.neuroada_delta:
                delta = layer.neuroada_delta[adapter]
                delta.copy_(torch.randn(delta.shape, generator=generator) * scale)


def train(model, input_ids, steps: int = 6, lr: float = 1e-2) -> list[float]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_importing_the_package_registers_the_peft_type():
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    from peft.utils import PeftType

    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.NEUROADA] is neuroada_cli.NeuroAdaPeftConfig
    assert NeuroAdaPeftConfig(k=3).peft_type == "NEUROADA"
    with pytest.raises(UserError, match="k=0"):
        NeuroAdaPeftConfig(k=0)


def test_get_peft_model_trains_on_the_fused_path_and_counts_like_inject():
    model = peft_model()
    layers = [m for m in model.modules() if isinstance(m, NeuroAdaPeftLinear)]
    assert len(layers) == 2 * len(TARGETS)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".neuroada_delta.default" in n for n in trainable)
    plain = inject(tiny_llama(seed=3), NeuroAdaConfig(k=2, target_modules=TARGETS))
    assert model.get_nb_trainable_parameters()[0] == neuroada_cli.count_parameters(plain).trainable

    input_ids = ids()
    loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    plain(input_ids=input_ids, labels=input_ids).loss.backward()
    plain_layers = neuroada_layers(plain)
    for name, layer in model.base_model.model.named_modules():
        if isinstance(layer, NeuroAdaPeftLinear):
            assert layer.base_layer.weight.grad is None  # no dense dW anywhere
            torch.testing.assert_close(layer.neuroada_delta["default"].grad, plain_layers[name].delta.grad)
    losses = train(model, input_ids)
    assert losses[-1] < losses[0] - 1e-3


def test_save_reload_is_bitwise_and_compact(tmp_path):
    model = peft_model()
    input_ids = ids()
    train(model, input_ids, steps=3)
    expected = logits(model, input_ids)
    model.save_pretrained(tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["peft_type"] == "NEUROADA" and config["k"] == 2 and config["base_fingerprint"]
    tensors = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    deltas = [k for k in tensors if k.endswith(".neuroada_delta")]
    assert len(deltas) == 6 and all(k.startswith("base_model.model.model.layers.") for k in deltas)
    assert all(tensors[k].dtype == torch.float32 and tensors[k].shape[1] == 2 for k in deltas)
    assert all(tensors[k.replace("delta", "indices")].dtype == torch.int16 for k in deltas)
    assert not any(k.endswith("weight") for k in tensors)  # no base weights in the adapter

    reloaded = PeftModel.from_pretrained(tiny_llama(seed=3), tmp_path / "a")
    assert torch.equal(logits(reloaded, input_ids), expected)
    plain = load_adapter(tiny_llama(seed=3), tmp_path / "a")  # the plain API reads PEFT's files
    assert torch.equal(logits(plain, input_ids), expected)
    with pytest.raises(UserError, match="another base model"):
        PeftModel.from_pretrained(tiny_llama(seed=4), tmp_path / "a")


def test_save_adapter_writes_the_peft_layout(tmp_path):
    model = inject(tiny_llama(seed=3), NeuroAdaConfig(k=2, target_modules=TARGETS, train_bias=True))
    for layer in neuroada_layers(model).values():
        torch.nn.init.normal_(layer.delta, std=0.05)
    input_ids = ids()
    expected = logits(model, input_ids)
    save_adapter(model, tmp_path / "a")
    reloaded = PeftModel.from_pretrained(tiny_llama(seed=3), tmp_path / "a")
    assert torch.equal(logits(reloaded, input_ids), expected)
    reloaded.print_trainable_parameters()


def test_merge_and_unload_unload_and_disable_adapter():
    base_state = {k: v.clone() for k, v in tiny_llama(seed=3).state_dict().items()}
    model = peft_model()
    randomize(model)
    input_ids = ids()
    adapted, base = logits(model, input_ids), logits(tiny_llama(seed=3), input_ids)
    assert not torch.equal(adapted, base)
    with model.disable_adapter():
        assert torch.equal(logits(model, input_ids), base)
        assert all(torch.equal(v, base_state[k]) for k, v in model.get_base_model().state_dict().items()
                   if k in base_state)
    assert torch.equal(logits(model, input_ids), adapted)

    merged = model.merge_and_unload()
    assert not any(isinstance(m, NeuroAdaPeftLinear) for m in merged.modules())
    assert type(merged.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert torch.equal(logits(merged, input_ids), adapted)

    other = peft_model()
    randomize(other)
    logits(other, input_ids)
    unloaded = other.unload()
    assert all(torch.equal(v, base_state[k]) for k, v in unloaded.state_dict().items())


def test_stored_adapter_of_the_first_release_still_loads():
    """tests/data/adapter_v0 was written by neuroada 0.1.0 (own layout); BASE.json says how its base was built."""
    info = json.loads((DATA / "adapter_v0" / "BASE.json").read_text())
    stored = load_file(str(DATA / "adapter_v0" / "adapter_model.safetensors"))
    model = load_adapter(tiny_llama(seed=info["tiny_llama_seed"]), DATA / "adapter_v0")
    layers = neuroada_layers(model)
    assert set(layers) == {k.removesuffix(".delta") for k in stored if k.endswith(".delta")}
    for name, layer in layers.items():
        assert torch.equal(layer.delta.detach(), stored[f"{name}.delta"])
        assert torch.equal(layer.neuroada_idx, stored[f"{name}.indices"].long())
    out = logits(model, torch.tensor([info["probe_input_ids"]])).double()
    assert out.sum().item() == pytest.approx(info["probe_logits_sum"], abs=1e-3)
    assert out.abs().sum().item() == pytest.approx(info["probe_logits_abs_sum"], rel=1e-5)
    with pytest.raises(UserError, match="another base model"):
        load_adapter(tiny_llama(seed=info["tiny_llama_seed"] + 1), DATA / "adapter_v0")


def _adapter_dirs(tmp_path, configs: dict[str, dict]) -> dict[str, Path]:
    dirs = {}
    for i, (name, config) in enumerate(configs.items()):
        model = peft_model(**config)
        randomize(model, seed=10 + i)
        dirs[name] = tmp_path / name
        model.save_pretrained(dirs[name])
    return dirs


def _load_all(dirs: dict[str, Path]) -> PeftModel:
    names = list(dirs)
    model = PeftModel.from_pretrained(tiny_llama(seed=3), dirs[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(dirs[name], adapter_name=name)
    return model


@pytest.mark.parametrize("selections", [("magnitude", "magnitude", "magnitude"), ("magnitude", "random", "reverse")])
def test_several_adapters_switch_instantly_and_disable_gives_the_base(tmp_path, selections):
    configs = {f"task{i}": {"selection": s, "seed": i} for i, s in enumerate(selections)}
    dirs = _adapter_dirs(tmp_path, configs)
    input_ids = ids()
    expected = {name: logits(PeftModel.from_pretrained(tiny_llama(seed=3), d), input_ids) for name, d in dirs.items()}
    base_state = {k: v.clone() for k, v in tiny_llama(seed=3).state_dict().items()}
    model = _load_all(dirs)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    shared = layer.cell("task0", "neuroada_idx") is layer.cell("task1", "neuroada_idx")
    assert shared == (selections[1] == "magnitude")  # same selection on the same base: one index, one orig
    for name in ["task2", "task0", "task1", "task0", "task2"]:
        model.set_adapter(name)
        weight = layer.base_layer.weight
        before = weight.clone()
        assert torch.equal(logits(model, input_ids), expected[name])
        assert torch.equal(weight, before)  # set_adapter already wrote the cells; the forward wrote nothing
    with model.disable_adapter():
        state = model.get_base_model().state_dict()
        assert all(torch.equal(state[k], v) for k, v in base_state.items() if k in state)
    model.set_adapter("task1")
    changed = (layer.base_layer.weight != base_state["model.layers.0.self_attn.q_proj.weight"]).sum().item()
    assert 0 < changed <= layer.out_features * 2  # only the d_out x k selected cells differ from the base
    model.delete_adapter("task1")  # PEFT then activates another adapter: W must follow
    active = model.active_adapter
    assert active != "task1" and torch.equal(logits(model, input_ids), expected[active])


def test_transformers_trainer_trains_saves_and_reloads_bitwise(tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    rows = [{"input_ids": row.tolist(), "labels": row.tolist()} for row in ids(seed=5, batch=8)]
    model = peft_model()
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=8, per_device_train_batch_size=4,
                             learning_rate=2e-2, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                             seed=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_list(rows))
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[-1] < losses[0]
    layers = [layer for layer in model.modules() if isinstance(layer, NeuroAdaPeftLinear)]
    assert layers and all(layer.base_layer.weight.grad is None for layer in layers)
    trainer.save_model(str(tmp_path / "adapter"))
    input_ids = ids()
    model.eval()
    expected = logits(model, input_ids)
    reloaded = PeftModel.from_pretrained(tiny_llama(seed=3), tmp_path / "adapter")
    assert torch.equal(logits(reloaded, input_ids), expected)
    assert torch.equal(logits(reloaded.merge_and_unload(), input_ids), expected)


def test_trl_sft_trainer_with_peft_config(tmp_path, tiny_tokenizer):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    texts = ["the quick brown fox jumps over the lazy dog", "The answer is 12. 3 + 4 = 7 and 0.5 * 10 = 5"] * 4
    args = trl.SFTConfig(output_dir=str(tmp_path / "out"), max_steps=8, per_device_train_batch_size=4,
                         learning_rate=2e-2, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                         max_length=32, disable_tqdm=True)
    trainer = trl.SFTTrainer(model=tiny_llama(seed=3), args=args, train_dataset=Dataset.from_dict({"text": texts}),
                             processing_class=tiny_tokenizer,
                             peft_config=NeuroAdaPeftConfig(k=2, target_modules=TARGETS))
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[-1] < losses[0]
    trainer.save_model(str(tmp_path / "adapter"))
    # SFTConfig trains under bf16 autocast on CPU and accelerate keeps that wrapper on the trained model's
    # forward, so compare the adapter values, then the reloaded model with its merged twin.
    reloaded = PeftModel.from_pretrained(tiny_llama(seed=3), tmp_path / "adapter")
    trained = dict(trainer.model.named_parameters())
    deltas = {n: p for n, p in reloaded.named_parameters() if "neuroada_delta" in n}
    assert deltas and all(torch.equal(p, trained[n]) for n, p in deltas.items())
    input_ids = ids()
    expected = logits(reloaded, input_ids)
    assert torch.equal(logits(reloaded.merge_and_unload(), input_ids), expected)


def test_user_mistakes_are_one_line_errors():
    with pytest.raises(UserError, match="selection=gradient needs training batches"):
        peft_model(selection="gradient")
    with pytest.raises(UserError, match=r"\['nope_proj'\] match no layer"):
        peft_model(target_modules=["q_proj", "nope_proj"])
    with pytest.raises(UserError, match="k=40 exceeds the 32 inputs"):
        peft_model(k=40)
    with pytest.raises(UserError, match="already has an adapter"):
        load_adapter(peft_model(), DATA / "adapter_v0")


def test_a_fused_optimizer_step_reaches_the_forward():
    """torch's fused AdamW (Trainer's default) does not bump the delta's version; the layer must still see it."""
    model = peft_model()
    input_ids = ids()
    before = logits(model, input_ids)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, fused=True)
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    optimizer.step()
    after = logits(model, input_ids)
    assert not torch.equal(before, after)
    merged = model.merge_and_unload()
    assert torch.equal(logits(merged, input_ids), after)


def test_bf16_base_keeps_fp32_deltas_and_small_updates_survive():
    model = get_peft_model(tiny_llama(seed=3).to(torch.bfloat16), NeuroAdaPeftConfig(k=2, target_modules=TARGETS))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.neuroada_delta["default"].dtype == torch.float32
    input_ids = ids()
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    assert layer.neuroada_delta["default"].grad.dtype == torch.float32
    with torch.no_grad():  # many updates each below bf16's resolution of W still add up in the fp32 delta
        for _ in range(64):
            layer.neuroada_delta["default"].add_(1e-5)
    logits(model, input_ids)
    cells = layer.base_layer.weight.gather(1, layer.cell("default", "neuroada_idx"))
    orig = layer.cell("default", "neuroada_orig")
    assert torch.equal(cells, (orig.float() + layer.neuroada_delta["default"].detach()).to(torch.bfloat16))
    assert (cells != orig).any()  # a bf16 delta would have rounded every 1e-5 step away
