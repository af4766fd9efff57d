"""data.packing: packed rows give every example the loss it has unpacked, and the step the same gradients.

Tiny Llama (fp32) with sdpa and eager attention; examples of varied lengths with masked prompts. The packed
batch has no attention mask: transformers' masking_utils turns the restarting position ids into a
block-diagonal causal mask. Tolerance 1e-5 (the issue's bound).
"""
from __future__ import annotations

import json
import random

import pytest
import torch
import torch.nn.functional as F

from neuroada_cli.data import IGNORE_INDEX
from neuroada_cli.data.batching import BatchPlan, split_global_batch
from neuroada_cli.data.packing import (balanced_rows, collate_packed, first_fit_rows, flat_rows_for,
                                       packed_micro_batches)
from neuroada_cli.data.tokenize import collate_causal
from neuroada_cli.errors import UserError
from neuroada_cli.kinds.causal_lm import CausalLM

from helpers import tiny_llama

TOL = 1e-5


def examples(n: int = 7, seed: int = 0, vocab: int = 400, longest: int = 20) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(3, longest)
        prompt = rng.randint(1, length - 1)
        ids = [rng.randrange(2, vocab) for _ in range(length)]
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return out


def kind(packing: bool, max_length: int = 32, cross_entropy: str = "plain") -> CausalLM:
    return CausalLM(train_dataset="unused", data_dir=None, template="alpaca", max_length=max_length,
                    train_limit=None, seed=0, cross_entropy=cross_entropy, packing=packing)


def token_losses(model, batch: dict) -> torch.Tensor:
    """Per-position next-token loss [rows, width-1] (0 where the label is -100)."""
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    # use_cache=False: with a cache, transformers would not read the position ids as packing
    logits = model(**inputs, use_cache=False).logits[:, :-1].float()
    targets = batch["labels"][:, 1:]
    losses = F.cross_entropy(logits.transpose(1, 2), targets.clamp(min=0), reduction="none")
    return losses * (targets != IGNORE_INDEX)


def per_example_packed(model, items: list[dict], capacity: int, flat: bool = False) -> list[float]:
    """Each example's summed loss read out of the packed forward (positions found from position_ids)."""
    batch = collate_packed(items, 0, capacity, flat=flat)
    losses = token_losses(model, batch)
    rows = balanced_rows([len(e["input_ids"]) for e in items], capacity)
    if flat:
        rows = [[p for row in rows for p in row]]
    out = [0.0] * len(items)
    for number, row in enumerate(rows):
        start = 0
        for position in row:
            length = len(items[position]["input_ids"])
            out[position] = losses[number, start:start + length - 1].sum().item()
            start += length
    return out


def test_layout_positions_and_labels():
    items = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]},
             {"input_ids": [4, 4, 4, 4], "labels": [-100, -100, 4, 4]}]
    batch = collate_packed(items, pad_id=0, capacity=6)
    assert "attention_mask" not in batch
    # rows as wide as the widest row (not the capacity); padding restarts its own positions
    assert batch["input_ids"].tolist() == [[4, 4, 4, 4, 0], [5, 6, 7, 8, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0], [0, 1, 2, 0, 1]]
    # the first token of every example is never a target (it is not predicted unpacked either)
    assert batch["labels"].tolist() == [[-100, -100, 4, 4, -100], [-100, 6, 7, -100, 9]]
    flat = collate_packed(items, pad_id=0, capacity=6, flat=True)
    assert flat["input_ids"].tolist() == [[4, 4, 4, 4, 5, 6, 7, 8, 9]]
    assert flat["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 0, 1]]
    assert flat_rows_for("flash_attention_2") and not flat_rows_for("sdpa") and not flat_rows_for(None)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_per_example_losses_equal_unpacked(attention):
    model = tiny_llama(attn_implementation=attention)
    items = examples(9)
    unpacked = token_losses(model, collate_causal(items, 0)).sum(dim=1).tolist()
    packed = per_example_packed(model, items, capacity=32)
    assert len(balanced_rows([len(e["input_ids"]) for e in items], 32)) < len(items)  # really packed
    assert packed == pytest.approx(unpacked, rel=TOL, abs=TOL)
    if attention == "sdpa":  # the one-row layout (flash attention's) is the same computation
        assert per_example_packed(model, items, 32, flat=True) == pytest.approx(unpacked, rel=TOL, abs=TOL)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("cross_entropy", ["plain", "chunked"])
def test_step_gradients_equal_unpacked(attention, cross_entropy):
    """Same examples, same normaliser (target tokens): the loss and every gradient match the unpacked batch."""
    items = examples(10, seed=1)
    weight = sum(kind(False).weight(e) for e in items)
    results = []
    for packing in (False, True):
        model = tiny_llama(attn_implementation=attention).train()
        task = kind(packing, cross_entropy=cross_entropy)
        task.prepare_model(model)
        batch = task.collate(items, 0)
        assert ("position_ids" in batch) == packing
        loss = task.loss_sum(model, batch) / weight
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss, grads), (packed_loss, packed_grads) = results
    assert packed_loss == pytest.approx(loss, rel=TOL)
    for name, grad in grads.items():
        assert (packed_grads[name] - grad).abs().max().item() <= TOL * max(grad.abs().max().item(), 1e-8), name


def test_evaluate_packed_equals_unpacked():
    model = tiny_llama()
    items = examples(11, seed=2)
    plain = kind(False).evaluate(model, items, 0, batch_size=4)["loss"]
    assert kind(True).evaluate(model, items, 0, batch_size=4)["loss"] == pytest.approx(plain, rel=TOL)


# ------------------------------------------------------------------------------------------- the plan
@pytest.mark.parametrize("world,micro", [(1, 1), (1, 4), (2, 2), (3, 1)])
def test_packed_micro_batches_cover_the_batch(world, micro):
    rng = random.Random(world * 10 + micro)
    lengths = [rng.randint(4, 64) for _ in range(200)]
    for batch in ([*range(24)], [*range(24, 48)], [rng.randrange(200) for _ in range(12)]):
        batch = list(dict.fromkeys(batch))[: len(batch) // (world * micro) * world * micro]
        per_rank = [packed_micro_batches(batch, lengths, 64, rank, world, micro) for rank in range(world)]
        assert len({len(chunks) for chunks in per_rank}) == 1  # every process: the same number of forwards
        seen = sorted(i for chunks in per_rank for chunk in chunks for i in chunk)
        assert seen == sorted(batch)
        for chunks in per_rank:
            for chunk in chunks:
                assert chunk  # no empty micro-batch
                rows = balanced_rows([lengths[i] for i in chunk], 64)
                assert len(rows) <= micro and all(sum(lengths[chunk[p]] for p in r) <= 64 for r in rows)
        assert per_rank == [packed_micro_batches(batch, lengths, 64, r, world, micro) for r in range(world)]


def test_rows_are_few_and_even():
    rows = balanced_rows([100] * 16, 512)  # 1,600 tokens: 4 rows of 400, not 512 + 512 + 512 + 64
    assert sorted(len(row) for row in rows) == [4, 4, 4, 4]
    assert balanced_rows([500, 20, 20], 512) == [[0], [1, 2]]
    assert first_fit_rows([300, 300, 200, 200], 512) == [[0, 2], [1, 3]]
    assert sorted(p for row in balanced_rows([7, 3, 9, 1], 10) for p in row) == [0, 1, 2, 3]


def test_packing_needs_fewer_forwards_than_examples():
    lengths = [10] * 32
    chunks = packed_micro_batches(list(range(32)), lengths, 64, 0, 1, 2)
    assert len(chunks) == 3 and len(split_global_batch(list(range(32)), 0, 1, 2)) == 16  # 6 per row, 2 rows each


def test_batch_plan_keeps_the_examples_of_each_step():
    lengths = [random.Random(i).randint(4, 60) for i in range(96)]
    plain = BatchPlan(lengths, 16, seed=3)
    packed = BatchPlan(lengths, 16, seed=3, pack_length=64)
    for step in range(8):
        assert plain.global_batch(step) == packed.global_batch(step)
        assert plain.micro_batches(step, 1, 2, 4) == split_global_batch(plain.global_batch(step), 1, 2, 4)
        assert sorted(i for r in range(2) for c in packed.micro_batches(step, r, 2, 4) for i in c) \
            == sorted(packed.global_batch(step))


def test_classification_refuses_packing():
    from neuroada_cli.kinds.classification import SequenceClassification

    with pytest.raises(UserError, match="data.packing"):
        SequenceClassification.from_config({"data": {"packing": True}, "task": {"train_dataset": "sst2"}})


# ------------------------------------------------------------------------------------- end to end
def test_train_with_packing_matches_unpacked(tiny_llama_dir, tmp_path):
    """The recipe end to end (validation on): packed + chunked trains to the same deltas as unpacked + plain."""
    from helpers import deltas, tiny_overrides, train_in_process, write_train_rows

    data = write_train_rows(tmp_path / "data")
    runs = {}
    for name, extra in (("plain", ["trainer.cross_entropy=plain"]),
                        ("packed", ["data.packing=true", "trainer.cross_entropy=chunked"])):
        runs[name] = train_in_process(tiny_overrides(tiny_llama_dir, data, tmp_path / name, steps=3)
                                      + ["data.val_fraction=0.2", "trainer.eval_every=2", *extra])
    plain, packed = deltas(runs["plain"]), deltas(runs["packed"])
    assert plain.keys() == packed.keys()
    for name in plain:
        assert torch.allclose(plain[name], packed[name], atol=1e-5, rtol=1e-4), name
    validation = [json.loads(line) for line in (runs["packed"] / "train_log.jsonl").read_text().splitlines()]
    assert any("validation" in line for line in validation)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_packed_equal_one_process_unpacked(tiny_llama_dir, tmp_path, strategy):
    """accelerate launch, 2 processes (gloo), packing + chunked loss, against one process unpacked + plain (~2 min)."""
    from helpers import accelerate_launch, cli, deltas, tiny_overrides, write_train_rows

    overrides = [o for o in tiny_overrides(tiny_llama_dir, write_train_rows(tmp_path / "data"), tmp_path, steps=3)
                 if not o.startswith("trainer.output_dir")]
    cli("train", *overrides, "trainer.cross_entropy=plain", f"trainer.output_dir={tmp_path / 'one'}")
    accelerate_launch("train", *overrides, f"trainer.strategy={strategy}", "data.packing=true",
                      "trainer.cross_entropy=chunked", f"trainer.output_dir={tmp_path / 'two'}", cwd=tmp_path)
    record = json.loads((tmp_path / "two" / "run.json").read_text())
    assert record["world_size"] == 2 and record["strategy"] == strategy
    one, two = deltas(tmp_path / "one"), deltas(tmp_path / "two")
    assert one.keys() == two.keys()
    for name in one:
        assert torch.allclose(one[name], two[name], atol=1e-5, rtol=1e-4), name


@pytest.mark.slow
def test_packed_resume_after_sigkill_is_bitwise_identical(tiny_llama_dir, tmp_path):
    """The packed plan is a pure function of the step: a run killed after a checkpoint and resumed ends with the
    adapter and losses of an uninterrupted packed run (~1.5 min)."""
    from helpers import cli, deltas, kill_after_first_checkpoint, tiny_overrides, write_train_rows

    common = [o for o in tiny_overrides(tiny_llama_dir, write_train_rows(tmp_path / "data"), tmp_path, steps=30)
              if not o.startswith(("trainer.output_dir", "trainer.checkpoint_every"))]
    common += ["trainer.checkpoint_every=4", "data.packing=true", "trainer.cross_entropy=chunked"]
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    cli("train", *common, f"trainer.output_dir={reference}")
    kill_after_first_checkpoint(common, interrupted, timeout=300)
    cli("train", *common, f"trainer.output_dir={interrupted}", "trainer.resume=true")
    assert json.loads((interrupted / "run.json").read_text())["resumed_from_step"]
    a, b = deltas(reference), deltas(interrupted)
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)
    losses = [[json.loads(line)["loss"] for line in (run / "train_log.jsonl").read_text().splitlines()]
              for run in (reference, interrupted)]
    assert losses[0] == losses[1]
