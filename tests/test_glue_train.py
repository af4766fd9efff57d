"""GLUE training pieces: targets exclude the head, the head is saved/restored with the adapter, the
regression (STS-B) path, batched prediction order, and the GLUE eval task on tiny random encoders."""
from __future__ import annotations

import pytest
import torch

from glue_fixtures import glue_rows, tiny_roberta_dir, write_glue_task
from neuroada_cli import NeuroAdaConfig, count_parameters, inject, load_adapter, neuroada_layers, save_adapter
from neuroada_cli.data import glue_train
from neuroada_cli.data.glue import encode
from neuroada_cli.errors import UserError
from neuroada_cli.eval import glue as glue_eval
from neuroada_cli.eval.base import EvalOptions
from neuroada_cli.models import load_model_and_tokenizer

ENCODER_TARGETS = [r".*\.attention\.self\.(query|key|value)", r".*\.attention\.output\.dense",
                   r".*\.intermediate\.dense", r".*\.layer\.\d+\.output\.dense"]


@pytest.fixture(scope="module")
def roberta_dir(tmp_path_factory):
    return tiny_roberta_dir(tmp_path_factory.mktemp("tiny-roberta"))


def load(path, num_labels=2, problem_type=None, seed=0):
    torch.manual_seed(seed)  # the random head
    return load_model_and_tokenizer(str(path), kind="sequence_classification", num_labels=num_labels,
                                    problem_type=problem_type)


def train_steps(model, examples, pad_id, steps=3, lr=1e-2):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        batch = glue_train.collate(examples, pad_id)
        (glue_train.loss_sum(model, batch) / len(examples)).backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_regex_targets_skip_the_head_and_head_is_restored_with_the_adapter(family, bert_dir, roberta_dir, tmp_path):
    path = bert_dir if family == "bert" else roberta_dir
    model, tokenizer = load(path, seed=0)
    config = NeuroAdaConfig(k=4, target_modules=ENCODER_TARGETS, modules_to_save=["classifier"])
    model = inject(model, config)
    layers = sorted(neuroada_layers(model))
    assert len(layers) == 2 * 6  # q k v, attention output, intermediate, output per layer
    assert not any("classifier" in name or "pooler" in name for name in layers)
    counts = count_parameters(model)
    head = sum(p.numel() for p in model.classifier.parameters())
    assert counts.head == head and counts.bypass > 0 and counts.trainable == counts.bypass + counts.head

    examples = encode(glue_rows("rte", 8), tokenizer, "rte", 32)
    train_steps(model, examples, tokenizer.pad_token_id)
    expected = glue_train.predict_logits(model, examples, tokenizer.pad_token_id, batch_size=3)
    save_adapter(model, tmp_path / "adapter")

    fresh, _ = load(path, seed=123)  # another random head: the saved one must replace it
    before = glue_train.predict_logits(fresh, examples, tokenizer.pad_token_id, batch_size=8)
    assert not torch.allclose(before, expected, atol=1e-4)
    restored = load_adapter(fresh, tmp_path / "adapter")
    got = glue_train.predict_logits(restored, examples, tokenizer.pad_token_id, batch_size=8)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_regression_path_for_stsb(bert_dir):
    model, tokenizer = load(bert_dir, num_labels=None, problem_type="regression")
    assert model.config.num_labels == 1
    examples = encode(glue_rows("stsb", 10), tokenizer, "stsb", 32)
    batch = glue_train.collate(examples, tokenizer.pad_token_id)
    assert batch["labels"].dtype == torch.float32
    logits = glue_train._forward(model, batch)
    expected = ((logits.squeeze(-1) - batch["labels"]) ** 2).sum()
    torch.testing.assert_close(glue_train.loss_sum(model, batch), expected)
    model = inject(model, NeuroAdaConfig(k=4, target_modules=ENCODER_TARGETS, modules_to_save=["classifier"]))
    first = glue_train.loss_sum(model.eval(), batch).item()
    train_steps(model, examples, tokenizer.pad_token_id, steps=10, lr=3e-2)
    assert glue_train.loss_sum(model, batch).item() < first
    metrics = glue_train.evaluate_examples(model, examples, "stsb", tokenizer.pad_token_id, batch_size=4)
    assert set(metrics) == {"pearson", "spearmanr", "combined_score"}


def test_predictions_come_back_in_input_order(bert_dir):
    model, tokenizer = load(bert_dir)
    examples = encode(glue_rows("rte", 9), tokenizer, "rte", 32)
    one_by_one = torch.cat([glue_train.predict_logits(model, [e], tokenizer.pad_token_id, 1) for e in examples])
    batched = glue_train.predict_logits(model, examples, tokenizer.pad_token_id, batch_size=4)
    torch.testing.assert_close(batched, one_by_one, atol=1e-5, rtol=1e-4)
    model.train()
    glue_train.predict_logits(model, examples[:2], tokenizer.pad_token_id, 2)
    assert model.training


def test_head_dropout_is_set_on_bert_and_roberta(bert_dir, roberta_dir):
    for path, find in ((bert_dir, lambda m: m.dropout), (roberta_dir, lambda m: m.classifier.dropout)):
        model, _ = load(path)
        glue_train.set_head_dropout(model, 0.05)
        assert find(model).p == 0.05
    with pytest.raises(UserError, match="head_dropout"):
        glue_train.set_head_dropout(model, 1.5)


def test_glue_eval_task_scores_the_report_part(bert_dir, tmp_path):
    data_dir = write_glue_task(tmp_path, "rte", train=8, validation=20)
    task = next(t for t in glue_eval.TASKS if t.name == "glue/rte").configure(seed=7, max_length=32)
    data = task.load(data_dir, None)
    selection = glue_train.selection_rows("rte", data_dir, seed=7)
    assert len(data.examples) == 10 and len(selection) == 10
    assert not {e.index for e in data.examples} & {row["idx"] for row in selection}
    model, tokenizer = load(bert_dir)
    records = task.predict(model, tokenizer, data.examples, EvalOptions(batch_size=4), None)
    assert [r["index"] for r in records] == [e.index for e in data.examples]
    accuracy = sum(r["correct"] for r in records) / len(records)
    assert task.score(records) == {"accuracy": pytest.approx(accuracy)}
    with pytest.raises(UserError, match="scoring"):
        task.check(EvalOptions(scoring="loglik"))
