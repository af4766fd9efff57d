"""The training recipe on a tiny random Llama: batching plan, loss normalisation, methods and options, the
method and task-kind tables, resume after SIGKILL."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from neuroada_cli.data.batching import BatchPlan, split_global_batch
from neuroada_cli.errors import UserError

from helpers import cli, deltas, kill_after_first_checkpoint, tiny_llama, tiny_overrides, train_in_process, write_train_rows


@pytest.fixture
def data_dir(tmp_path):
    return write_train_rows(tmp_path / "data")


# ------------------------------------------------------------------------------------------ batching
def test_plan_covers_each_example_once_per_epoch_and_is_deterministic():
    lengths = [random.Random(i).randint(5, 200) for i in range(103)]
    plan = BatchPlan(lengths, batch_size=8, seed=3, bucket_batches=4)
    assert plan.steps_per_epoch == 12  # 103 // 8, the incomplete batch is dropped
    epoch0 = plan.epoch_batches(0)
    flat = [i for batch in epoch0 for i in batch]
    assert len(flat) == len(set(flat)) == 96 and all(len(b) == 8 for b in epoch0)
    assert BatchPlan(lengths, 8, 3, 4).epoch_batches(0) == epoch0
    assert plan.epoch_batches(1) != epoch0  # reshuffled every epoch
    assert plan.global_batch(13) == plan.epoch_batches(1)[1] and plan.position(13) == (1, 1)
    for batch in epoch0:  # longest first inside a batch
        assert [lengths[i] for i in batch] == sorted((lengths[i] for i in batch), reverse=True)


def test_length_bucketing_cuts_padding():
    lengths = [random.Random(i).randint(5, 300) for i in range(512)]

    def padded(plan):
        return sum(8 * max(lengths[i] for i in chunk) for batch in plan.epoch_batches(0)
                   for chunk in split_global_batch(batch, 0, 1, 8))

    assert padded(BatchPlan(lengths, 16, 0, bucket_batches=16)) < 0.75 * padded(BatchPlan(lengths, 16, 0, bucket_batches=1))


def test_split_global_batch_across_processes():
    batch = list(range(16))
    ranks = [split_global_batch(batch, rank, 2, 4) for rank in range(2)]
    assert ranks[0] == [[0, 1, 2, 3], [8, 9, 10, 11]] and ranks[1] == [[4, 5, 6, 7], [12, 13, 14, 15]]
    assert split_global_batch(batch, 0, 1, 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
    with pytest.raises(ValueError):
        split_global_batch(list(range(10)), 0, 2, 4)


# ------------------------------------------------------------------------------------------ the loop
def test_loss_is_normalised_by_the_global_batch(tiny_llama_dir, data_dir, tmp_path):
    """Accumulating 4 micro-batches of 2 equals 2 micro-batches of 4: same global batch, same update."""
    base = tiny_overrides(tiny_llama_dir, data_dir, tmp_path / "a")
    small = train_in_process(base)
    large = train_in_process([o for o in base if not o.startswith(("trainer.output_dir", "trainer.micro_batch_size"))]
                             + [f"trainer.output_dir={tmp_path / 'b'}", "trainer.micro_batch_size=4"])
    a, b = deltas(small), deltas(large)
    assert a.keys() == b.keys() and any(name.endswith("delta") for name in a)
    for name in a:
        if name.endswith("delta"):
            assert a[name].abs().max() > 0
            torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6)
    log_a = [json.loads(line) for line in (small / "train_log.jsonl").read_text().splitlines()]
    log_b = [json.loads(line) for line in (large / "train_log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in log_a] == pytest.approx([r["loss"] for r in log_b], rel=1e-5)
    assert log_a[0]["lr"] == pytest.approx(1e-2) and log_a[-1]["lr"] == 0.0  # one warmup step, linear decay


def train_log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]


def test_lora_trains_only_its_matrices(tiny_llama_dir, data_dir, tmp_path):
    run = train_in_process(tiny_overrides(tiny_llama_dir, data_dir, tmp_path / "run", steps=2)
                           + ["method=lora", "lora.r=2", "lora.target_modules=[q_proj,v_proj]"])
    record = json.loads((run / "run.json").read_text())
    assert record["method"] == "lora"
    assert record["trainable_params"] == 2 * (2 * (32 + 32) + 2 * (32 + 16))  # 2 layers x r(in + out) of q, v
    saved = deltas(run)
    assert saved and all("lora_A" in name or "lora_B" in name for name in saved)
    assert any(value.abs().max() > 0 for name, value in saved.items() if "lora_B" in name)  # B starts at 0


def test_gradient_selection_picks_other_cells_than_magnitude(tiny_llama_dir, data_dir, tmp_path, monkeypatch):
    """selection=gradient chooses by |dL/dW| on training batches: not the magnitude cells on the same model.
    Gradient checkpointing is switched on through the model's own (non-reentrant) entry point."""
    import transformers

    calls = []
    original = transformers.PreTrainedModel.activation_checkpointing_enable

    def spy(model, *args, **kwargs):
        calls.append(kwargs)
        return original(model, *args, **kwargs)

    monkeypatch.setattr(transformers.PreTrainedModel, "activation_checkpointing_enable", spy)
    common = [o for o in tiny_overrides(tiny_llama_dir, data_dir, tmp_path, steps=1)
              if not o.startswith("trainer.output_dir")]
    gradient = train_in_process(common + [f"trainer.output_dir={tmp_path / 'gradient'}", "neuroada.selection=gradient",
                                          "neuroada.gradient_batches=1", "trainer.gradient_checkpointing=true"])
    magnitude = train_in_process(common + [f"trainer.output_dir={tmp_path / 'magnitude'}"])
    assert calls == [{"activation_checkpointing_kwargs": {"use_reentrant": False}}]
    picked, largest = deltas(gradient), deltas(magnitude)
    indices = [name for name in picked if name.endswith("indices")]
    assert indices and picked.keys() == largest.keys()
    assert sum(not torch.equal(picked[n], largest[n]) for n in indices) >= len(indices) // 2
    assert all(r["loss"] == r["loss"] for r in train_log(gradient))  # no NaN


def test_bf16_autocast_changes_the_loss_but_keeps_fp32_deltas(tiny_llama_dir, data_dir, tmp_path):
    """bf16 runs the forward in bf16 (another loss than fp32); the deltas and their updates stay fp32.
    max_grad_norm clips: a tiny norm leaves AdamW's first update far below the unclipped one."""
    def run(name, *extra):
        overrides = [o for o in tiny_overrides(tiny_llama_dir, data_dir, tmp_path, steps=2)
                     if not o.startswith("trainer.output_dir")]
        return train_in_process(overrides + [f"trainer.output_dir={tmp_path / name}", *extra])

    fp32 = run("fp32")
    bf16 = run("bf16", "trainer.precision=bf16")
    clipped = run("clipped", "optimizer.max_grad_norm=1e-12")
    losses_fp32, losses_bf16 = [r["loss"] for r in train_log(fp32)], [r["loss"] for r in train_log(bf16)]
    assert losses_bf16[0] != losses_fp32[0] and losses_bf16[0] == pytest.approx(losses_fp32[0], rel=0.05)
    saved = deltas(bf16)
    assert all(saved[n].dtype == torch.float32 for n in saved if n.endswith("delta"))
    size = {name: max(v.abs().max().item() for n, v in deltas(r).items() if n.endswith("delta"))
            for name, r in (("fp32", fp32), ("clipped", clipped))}
    assert size["clipped"] < 0.01 * size["fp32"]


def test_full_fine_tuning_saves_the_whole_changed_model(tiny_llama_dir, data_dir, tmp_path):
    from safetensors.torch import load_file

    run = train_in_process(tiny_overrides(tiny_llama_dir, data_dir, tmp_path / "run", steps=2)
                           + ["method=full", "optimizer.lr=1e-4"])
    record = json.loads((run / "run.json").read_text())
    assert record["trainable_params"] == record["total_params"] == sum(p.numel() for p in tiny_llama().parameters())
    trained = load_file(str(run / "adapter" / "model.safetensors"))
    base = load_file(str(tiny_llama_dir / "model.safetensors"))
    assert (run / "adapter" / "tokenizer.json").is_file() and trained.keys() == base.keys()
    assert any(not torch.equal(trained[name], base[name]) for name in base)


def test_run_record_times_the_loop_and_its_overhead(tiny_llama_dir, data_dir, tmp_path):
    run = train_in_process(tiny_overrides(tiny_llama_dir, data_dir, tmp_path / "run", steps=3))
    record = json.loads((run / "run.json").read_text())
    parts = sum(record[f"{name}_seconds"] for name in ("data", "compute", "log", "checkpoint"))
    assert record["loop_seconds"] == pytest.approx(parts) and 0 < record["compute_seconds"] < record["loop_seconds"]
    assert record["overhead_seconds"] == pytest.approx(record["loop_seconds"] - record["compute_seconds"])
    assert record["tokens_seen"] == sum(r["tokens"] for r in train_log(run)) and record["final_loss"] > 0
    assert [r["step"] for r in train_log(run)] == [1, 2, 3]


# ------------------------------------------------------------------------------- method and kind tables
def test_unknown_method_or_kind_names_the_valid_ones():
    from neuroada_cli.kinds import KIND_NAMES, get_kind
    from neuroada_cli.methods import METHOD_NAMES, get_method

    assert METHOD_NAMES == ("neuroada", "lora", "full", "head")
    assert KIND_NAMES == ("causal_lm", "sequence_classification", "preference")
    with pytest.raises(UserError, match="method='nope'.*neuroada, lora, full, head"):
        get_method("nope")
    with pytest.raises(UserError, match="task.kind='nope'.*causal_lm, sequence_classification, preference"):
        get_kind("nope")
    assert [get_method(name).name for name in METHOD_NAMES] == list(METHOD_NAMES)
    assert [get_kind(name).name for name in KIND_NAMES] == list(KIND_NAMES)


@pytest.mark.parametrize("name", ["neuroada", "lora", "full", "head"])
def test_every_method_attaches_saves_loads_and_merges(name, tiny_llama_dir, tiny_tokenizer, tmp_path):
    """Trained weights saved by the method come back through load_trained; merged logits = unmerged logits."""
    from neuroada_cli import config
    from neuroada_cli.methods import get_method, load_trained

    cfg = config.validate(config.compose(None, [f"method={name}", f"model.name_or_path={tiny_llama_dir}",
                                                "neuroada.k=3", "lora.r=2", "lora.target_modules=[q_proj,v_proj]",
                                                "head.modules_to_save=[lm_head]"]))
    method = get_method(name)
    model = method.attach(cfg, tiny_llama())
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # stand-in for training: every trainable tensor moves (LoRA's B starts at zero)
        for param in (p for p in model.parameters() if p.requires_grad):
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    method.save(model, tiny_tokenizer, tmp_path / "adapter")
    inputs = torch.tensor([[1, 5, 9, 13, 17, 21, 25]])
    with torch.no_grad():
        trained = model.eval()(input_ids=inputs).logits
        base = tiny_llama()(input_ids=inputs).logits
        unmerged, _, info = load_trained(cfg, tmp_path / "adapter", merge=False)
        merged, _, merged_info = load_trained(cfg, tmp_path / "adapter", merge=True)
        logits = unmerged.eval()(input_ids=inputs).logits, merged.eval()(input_ids=inputs).logits
    assert not torch.allclose(trained, base, atol=1e-4)
    torch.testing.assert_close(logits[0], trained, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-4, atol=1e-5)
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert not any("lora_" in key or "neuroada" in key for key in merged.state_dict())
    assert info["merged"] is False and merged_info["merged"] is (name in ("neuroada", "lora")) and info["method"] == name
    counts = method.count(model)
    assert 0 < counts["trainable_params"] <= counts["total_params"]


def test_causal_lm_kind_weights_collates_and_evaluates(tiny_tokenizer, data_dir):
    """weight = target tokens; evaluate's loss = the summed token loss / the summed weights."""
    from neuroada_cli.kinds import get_kind

    kind = get_kind("causal_lm")(train_dataset="commonsense_15k", data_dir=str(data_dir), template="commonsense",
                                 max_length=64, train_limit=6, seed=0)
    kind.check_inputs()
    examples = kind.train_examples(tiny_tokenizer)
    assert len(examples) == 6 and kind.validation_examples(tiny_tokenizer) is None
    assert [kind.weight(e) for e in examples] == [sum(x != -100 for x in e["labels"][1:]) for e in examples]
    model = tiny_llama()
    kind.prepare_model(model)
    batch = kind.collate(examples, tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        total = kind.loss_sum(model, batch).item()
    model.train()  # evaluate switches to eval mode (no dropout) and back
    metrics = kind.evaluate(model, examples, tiny_tokenizer.pad_token_id, batch_size=4)
    assert metrics["loss"] == pytest.approx(total / sum(kind.weight(e) for e in examples), rel=1e-5)
    assert kind.primary_metric == ("loss", False) and model.training


def test_output_dir_holding_a_run_needs_resume(tiny_llama_dir, data_dir, tmp_path):
    overrides = tiny_overrides(tiny_llama_dir, data_dir, tmp_path / "run", steps=1)
    train_in_process(overrides)
    with pytest.raises(UserError, match="already holds a run"):
        train_in_process(overrides)


def test_resume_after_sigkill_is_bitwise_identical(tiny_llama_dir, data_dir, tmp_path):
    """Kill a run with SIGKILL once a checkpoint exists; the resumed run ends with the same adapter."""
    common = [o for o in tiny_overrides(tiny_llama_dir, data_dir, tmp_path, steps=40)
              if not o.startswith(("trainer.output_dir", "trainer.checkpoint_every", "trainer.batch_size"))]
    common += ["trainer.checkpoint_every=4", "trainer.batch_size=4"]
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    cli("train", *common, f"trainer.output_dir={reference}")

    kill_after_first_checkpoint(common, interrupted, timeout=120)
    assert not (interrupted / "run.json").exists()

    cli("train", *common, f"trainer.output_dir={interrupted}", "trainer.resume=true")
    resumed = json.loads((interrupted / "run.json").read_text())
    assert resumed["resumed_from_step"] and resumed["resumed_from_step"] % 4 == 0
    a, b = deltas(reference), deltas(interrupted)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    log = [json.loads(line) for line in (interrupted / "train_log.jsonl").read_text().splitlines()]
    reference_log = [json.loads(line) for line in (reference / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 41))
    assert [r["loss"] for r in log] == [r["loss"] for r in reference_log]
    assert [p.name for p in (interrupted / "checkpoints").iterdir()] == ["step-40"]  # only the last one kept


def test_eval_after_train_checks_its_inputs_before_training(tiny_llama_dir, data_dir, tmp_path):
    overrides = tiny_overrides(tiny_llama_dir, data_dir, tmp_path / "run", steps=1)
    with pytest.raises(UserError, match="boolq"):
        train_in_process(overrides + ["eval.after_train=true", "eval.tasks=[boolq]"])
    assert not (tmp_path / "run").exists()


def test_a_configuration_that_trains_nothing_is_refused_before_training(tiny_llama_dir, data_dir, tmp_path):
    """neuron_fraction so small that round(f x d_out) is 0 rows in every layer: one line, nothing written."""
    overrides = tiny_overrides(tiny_llama_dir, data_dir, tmp_path / "run", steps=1) + ["neuroada.neuron_fraction=0.001"]
    with pytest.raises(UserError) as caught:
        train_in_process(overrides)
    message = str(caught.value)
    assert "trains nothing" in message and "0.001 of neurons" in message and "neuroada.neuron_fraction" in message
    assert "\n" not in message and not (tmp_path / "run").exists()


def test_fp16_on_cpu_is_refused(tiny_llama_dir, data_dir, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("fp16 autocast is available on this machine")
    with pytest.raises(UserError, match="fp16 needs a GPU"):
        train_in_process(tiny_overrides(tiny_llama_dir, data_dir, tmp_path / "run", steps=1) + ["trainer.precision=fp16"])


def test_glue_classification_keeps_the_best_epoch(tmp_path, bert_dir):
    """sequence_classification through the same loop: loss per example, validation (on by default: the LoReFT
    selection part) after every epoch; adapter/ = the best epoch, adapter_last/ = the final weights."""
    from helpers import write_glue_task

    model_dir = bert_dir
    data = write_glue_task(tmp_path / "data", "rte")
    run = train_in_process([
        "task=glue/rte", f"model.name_or_path={model_dir}", "model.family=bert", f"data.dir={data}",
        f"trainer.output_dir={tmp_path / 'run'}", "trainer.epochs=2", "trainer.batch_size=8", "trainer.micro_batch_size=4",
        "trainer.checkpoint_every=0", "neuroada.k=2", "neuroada.modules_to_save=[classifier]",
        "neuroada.target_modules=[query,value]", "optimizer.lr=1e-2",
    ])
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    evaluations = [r for r in log if "validation" in r]
    steps = [r for r in log if "loss" in r]
    assert len(evaluations) == 2 and evaluations[-1]["step"] == steps[-1]["step"]
    assert all(r["target_tokens"] == 8 for r in steps)  # one term per example of the global batch
    record = json.loads((run / "run.json").read_text())
    best = max(evaluations, key=lambda r: r["validation"]["accuracy"])  # the first of equals is kept
    assert record["validation"]["metric"] == "accuracy" and record["validation"]["step"] == best["step"]
    assert record["validation"]["evaluations"] == 2 and record["validation"]["stopped_early"] is False
    assert record["head_params"] > 0 and (run / "adapter" / "adapter_model.safetensors").is_file()
    assert (run / "adapter_last" / "adapter_model.safetensors").is_file()


def test_head_only_trains_the_head_and_nothing_else(tmp_path, bert_dir):
    """method=head (the linear-probe baseline): only head.modules_to_save changes; the encoder stays the base's;
    eval of the run loads the saved head onto a fresh base and scores what the trained model scored."""
    from safetensors.torch import load_file

    from helpers import write_glue_task
    from neuroada_cli import config
    from neuroada_cli.methods import load_trained

    data = write_glue_task(tmp_path / "data", "rte")
    run = train_in_process([
        "task=glue/rte", f"model.name_or_path={bert_dir}", "model.family=bert", f"data.dir={data}", "method=head",
        f"trainer.output_dir={tmp_path / 'run'}", "trainer.epochs=1", "trainer.batch_size=8",
        "trainer.micro_batch_size=4", "trainer.checkpoint_every=0", "head.modules_to_save=[classifier]",
        "optimizer.lr=1e-2",
    ])
    record = json.loads((run / "run.json").read_text())
    saved = load_file(str(run / "adapter" / "head_model.safetensors"))
    assert sorted(saved) == ["classifier.bias", "classifier.weight"]
    assert record["method"] == "head" and record["trainable_params"] == sum(v.numel() for v in saved.values())
    cfg = config.validate(config.load_run_config(run))
    trained, _, _ = load_trained(cfg, run / "adapter", merge=True)
    base, _, _ = load_trained(cfg, None, merge=False)
    trained_state, base_state = trained.state_dict(), base.state_dict()
    changed = sorted(name for name in base_state if not torch.equal(trained_state[name], base_state[name]))
    assert changed == ["classifier.bias", "classifier.weight"]
    torch.testing.assert_close(trained_state["classifier.weight"], saved["classifier.weight"])
    with pytest.raises(UserError, match="head.modules_to_save=.*match no module"):
        train_in_process(["task=glue/rte", f"model.name_or_path={bert_dir}", "model.family=bert", f"data.dir={data}",
                          "method=head", "head.modules_to_save=[nothing_here]", f"trainer.output_dir={tmp_path / 'bad'}"])


def test_damaged_or_foreign_head_adapter_is_a_one_line_error(tiny_llama_dir, tiny_tokenizer, tmp_path):
    from neuroada_cli import config
    from neuroada_cli.methods import get_method, load_trained

    cfg = config.validate(config.compose(None, ["method=head", f"model.name_or_path={tiny_llama_dir}",
                                                "head.modules_to_save=[lm_head]"]))
    method = get_method("head")
    method.save(method.attach(cfg, tiny_llama()), tiny_tokenizer, tmp_path / "adapter")
    weights = tmp_path / "adapter" / "head_model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[:40])
    with pytest.raises(UserError, match="head adapter .* is damaged"):
        load_trained(cfg, tmp_path / "adapter", merge=False)
    from safetensors.torch import save_file

    save_file({"lm_head.weight": torch.zeros(3, 3)}, str(weights))  # another model's head
    with pytest.raises(UserError, match="does not fit this model .*lm_head.weight"):
        load_trained(cfg, tmp_path / "adapter", merge=False)
    (tmp_path / "adapter" / "head_config.json").unlink()
    with pytest.raises(UserError, match="is not a head-only adapter"):
        load_trained(cfg, tmp_path / "adapter", merge=False)


def test_removed_trainer_keys_name_their_replacement():
    from omegaconf import OmegaConf

    from neuroada_cli.config_schema import check_unknown_keys

    with pytest.raises(UserError, match=r"report_to=\[tensorboard\]"):
        check_unknown_keys(OmegaConf.create({"trainer": {"tensorboard": True}}))
    with pytest.raises(UserError, match="trainer.validate"):
        check_unknown_keys(OmegaConf.create({"trainer": {"select_best": True}}))
