"""task.kind=preference against TRL: the same loss and gradients as trl.DPOTrainer on one batch (NeuroAda through
its PEFT face and through ``inject``), DPOTrainer(peft_config=NeuroAdaPeftConfig) trains and saves, and the PEFT
face's disable_adapter is the base bitwise also after a merge (what DPOTrainer's reference pass relies on)."""
from __future__ import annotations

import math

import pytest
import torch
from helpers import pair_rows, tiny_llama
TARGETS = ["q_proj", "v_proj", "down_proj"]  # the layers test_preference.py adapts too

from neuroada_cli import NeuroAdaConfig, NeuroAdaPeftConfig, inject
from neuroada_cli.data.preference import check_rows, tokenize_pairs
from neuroada_cli.kinds.preference import Preference, collate_pairs

trl = pytest.importorskip("trl")
PEFT_PREFIX = "base_model.model."


def dpo_trainer(tmp_path, tokenizer, rows, loss: str = "sigmoid", steps: int = 1, lr: float = 1e-2):
    from datasets import Dataset

    args = trl.DPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=steps,
                         learning_rate=lr, beta=0.3, loss_type=[loss], max_length=64, bf16=False,
                         gradient_checkpointing=False, report_to=[], use_cpu=True, save_strategy="no",
                         logging_steps=1, disable_tqdm=True, seed=0)
    return trl.DPOTrainer(model=tiny_llama(seed=3), args=args, train_dataset=Dataset.from_list(rows),
                          processing_class=tokenizer, peft_config=NeuroAdaPeftConfig(k=4, target_modules=TARGETS))


def randomise(model, seed: int = 5) -> None:
    generator = torch.Generator().manual_seed(seed)
    for name, parameter in model.named_parameters():
        if "neuroada_delta" in name:
            parameter.data = torch.randn(parameter.shape, generator=generator) * 0.05


def gradients(model) -> dict[str, torch.Tensor]:
    grads = {name.removeprefix(PEFT_PREFIX): p.grad.clone() for name, p in model.named_parameters()
             if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])
def test_one_batch_equals_trl_dpo_trainer(tmp_path, tiny_tokenizer, loss):
    rows = pair_rows(4)
    trainer = dpo_trainer(tmp_path, tiny_tokenizer, rows, loss)
    model = trainer.model
    randomise(model)
    model.train()
    trl_batch = next(iter(trainer.get_train_dataloader()))  # all 4 pairs (order: TRL's sampler)
    trl_loss = trainer.compute_loss(model, trl_batch)
    trl_loss.backward()
    expected = gradients(model)
    assert abs(trl_loss.item() - (math.log(2) if loss == "sigmoid" else (1 / 0.6) ** 2)) > 1e-3  # policy != base

    kind = Preference(train_dataset="unused", data_dir=None, template="commonsense", max_length=64,
                      train_limit=None, seed=0, beta=0.3, loss=loss)
    examples = tokenize_pairs(check_rows(rows, "pairs"), tiny_tokenizer, 64)
    prepared = sorted(trainer.train_dataset, key=lambda row: row["prompt_ids"])
    ours = sorted(examples, key=lambda example: example["prompt_ids"])
    for theirs, mine in zip(prepared, ours):  # the same tokens: prompt, chosen + eos, rejected + eos
        assert [theirs[key] for key in ("prompt_ids", "chosen_ids", "rejected_ids")] == \
               [mine[key] for key in ("prompt_ids", "chosen_ids", "rejected_ids")]
    batch = collate_pairs(examples, tiny_tokenizer.pad_token_id)

    # the same PEFT model: reference through PEFT's disable_adapter
    kind.prepare_model(model)
    peft_loss = kind.loss_sum(model, batch) / len(examples)  # the recipe divides by the pairs of the batch
    peft_loss.backward()
    torch.testing.assert_close(peft_loss, trl_loss, rtol=1e-5, atol=1e-6)
    for name, grad in gradients(model).items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-4, atol=1e-7)

    # the inject face on a fresh copy of the base, same cells and delta values
    injected = inject(tiny_llama(seed=3), NeuroAdaConfig(k=4, target_modules=TARGETS))
    trained = {name.removeprefix(PEFT_PREFIX): p for name, p in model.named_parameters()}
    with torch.no_grad():
        for name, parameter in injected.named_parameters():
            if parameter.requires_grad:
                parameter.copy_(trained[name])
    kind.prepare_model(injected)
    inject_loss = kind.loss_sum(injected.train(), batch) / len(examples)
    inject_loss.backward()
    torch.testing.assert_close(inject_loss, trl_loss, rtol=1e-5, atol=1e-6)
    for name, grad in gradients(injected).items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-4, atol=1e-7)


def test_dpo_trainer_with_neuroada_peft_config_trains_and_saves(tmp_path, tiny_tokenizer):
    from peft import PeftModel

    trainer = dpo_trainer(tmp_path, tiny_tokenizer, pair_rows(8), steps=6, lr=3e-2)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-4) and losses[-1] < losses[0]
    trainer.save_model(str(tmp_path / "adapter"))
    reloaded = PeftModel.from_pretrained(tiny_llama(seed=3), tmp_path / "adapter")
    trained = dict(trainer.model.named_parameters())
    deltas = {n: p for n, p in reloaded.named_parameters() if "neuroada_delta" in n}
    assert deltas and all(torch.equal(p, trained[n]) for n, p in deltas.items())
    assert any(p.abs().sum() > 0 for p in deltas.values())


def test_peft_disable_adapter_is_the_base_bitwise_also_when_merged():
    from peft import get_peft_model

    base = tiny_llama(seed=3)
    model = get_peft_model(tiny_llama(seed=3), NeuroAdaPeftConfig(k=4, target_modules=TARGETS))
    randomise(model)
    input_ids = torch.tensor([[5, 17, 42, 9, 100, 3, 77]])
    with torch.no_grad():
        expected_base, adapted = base(input_ids).logits, model(input_ids).logits
        model.merge_adapter()
        assert torch.equal(model(input_ids).logits, adapted)
        with model.disable_adapter():
            assert torch.equal(model(input_ids).logits, expected_base)
        assert torch.equal(model(input_ids).logits, adapted)
        model.unmerge_adapter()
        with model.disable_adapter():
            assert torch.equal(model(input_ids).logits, expected_base)
