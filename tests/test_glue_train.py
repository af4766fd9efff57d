"""GLUE training pieces: the sequence-classification task kind (head derived from the GLUE table, loss,
evaluate, primary metric, data parts), targets exclude the head, the head is saved/restored with the adapter,
the regression (STS-B) path, batched prediction order, and the GLUE eval task on tiny random encoders."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from helpers import glue_rows, tiny_roberta_dir, write_glue_task
from neuroada_cli import NeuroAdaConfig, count_parameters, inject, load_adapter, neuroada_layers, save_adapter
from neuroada_cli.errors import UserError
from neuroada_cli.eval.base import EvalOptions
from neuroada_cli.glue.data import encode, selection_rows
from neuroada_cli.glue.eval_tasks import TASKS
from neuroada_cli.glue.metrics import glue_metrics
from neuroada_cli.kinds.classification import SequenceClassification, loss_sum, predict_logits, set_head_dropout
from neuroada_cli.models import load_model_and_tokenizer

ENCODER_TARGETS = [r".*\.attention\.self\.(query|key|value)", r".*\.attention\.output\.dense",
                   r".*\.intermediate\.dense", r".*\.layer\.\d+\.output\.dense"]


@pytest.fixture(scope="module")
def roberta_dir(tmp_path_factory):
    return tiny_roberta_dir(tmp_path_factory.mktemp("tiny-roberta"))


def run_config(task: str, data_dir, **task_keys):
    """The keys SequenceClassification.from_config reads, as a composed config holds them."""
    task_node = {"kind": "sequence_classification", "train_dataset": f"glue/{task}", "num_labels": None,
                 "problem_type": None, "head_dropout": None, **task_keys}
    return OmegaConf.create({"task": task_node, "data": {"dir": str(data_dir), "max_length": 32, "train_limit": None},
                             "trainer": {"seed": 7}})


def kind_for(task: str, data_dir, **task_keys) -> SequenceClassification:
    return SequenceClassification.from_config(run_config(task, data_dir, **task_keys))


def load(path, kind: SequenceClassification, seed=0):
    torch.manual_seed(seed)  # the random head
    return load_model_and_tokenizer(str(path), kind=kind.name, **kind.model_options())


def train_steps(model, kind, examples, pad_id, steps=3, lr=1e-2):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        batch = kind.collate(examples, pad_id)
        (kind.loss_sum(model, batch) / len(examples)).backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


# ------------------------------------------------------------------------ the head from the GLUE table

@pytest.mark.parametrize("task,num_labels,problem_type", [
    ("rte", 2, "single_label_classification"), ("mnli", 3, "single_label_classification"),
    ("stsb", 1, "regression"), ("cola", 2, "single_label_classification"),
])
def test_head_is_derived_from_the_glue_table_when_the_config_leaves_it_null(tmp_path, task, num_labels, problem_type):
    kind = kind_for(task, tmp_path)
    assert kind.model_options() == {"num_labels": num_labels, "problem_type": problem_type}
    assert kind.name == "sequence_classification"
    # the same values written explicitly are honoured
    explicit = kind_for(task, tmp_path, num_labels=num_labels, problem_type=problem_type)
    assert explicit.model_options() == kind.model_options()


@pytest.mark.parametrize("keys,needle", [
    ({"num_labels": 3}, "task.num_labels=3 contradicts GLUE rte"),
    ({"problem_type": "regression"}, "task.problem_type=regression contradicts GLUE rte"),
    ({"problem_type": "multi_label_classification"}, "task.problem_type='multi_label_classification' is not valid"),
])
def test_a_head_that_contradicts_the_table_is_refused_in_one_line(tmp_path, keys, needle):
    with pytest.raises(UserError) as err:
        kind_for("rte", tmp_path, **keys)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_bad_run_values_are_refused_before_any_data_is_read(tmp_path):
    with pytest.raises(UserError, match="unknown GLUE task 'glue/squad'"):
        SequenceClassification.from_config(run_config("squad", tmp_path))
    with pytest.raises(UserError, match="task.head_dropout=1.5"):
        kind_for("rte", tmp_path, head_dropout=1.5)
    config = run_config("rte", tmp_path)
    config.data.max_length = 4
    with pytest.raises(UserError, match="data.max_length=4"):
        SequenceClassification.from_config(config)


def test_check_inputs_reads_the_training_split(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="GLUE rte/train not found"):
        kind_for("rte", tmp_path).check_inputs()
    write_glue_task(tmp_path, "rte", train=8, validation=10)
    kind_for("rte", tmp_path).check_inputs()


# --------------------------------------------------------------------- the kind on a tiny BERT

def test_kind_examples_loss_evaluate_and_primary_metric_on_rte(bert_dir, tmp_path):
    data_dir = write_glue_task(tmp_path, "rte", train=12, validation=20)
    kind = kind_for("rte", data_dir)
    model, tokenizer = load(bert_dir, kind)
    assert model.config.num_labels == 2 and kind.primary_metric == ("accuracy", True)
    train = kind.train_examples(tokenizer)
    assert len(train) == 12 and all(kind.weight(example) == 1 for example in train)
    validation = kind.validation_examples(tokenizer)
    assert validation == encode(selection_rows("rte", data_dir, seed=7), tokenizer, "rte", 32)

    batch = kind.collate(train, tokenizer.pad_token_id)
    assert batch["labels"].dtype == torch.long
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
    expected = F.cross_entropy(logits, batch["labels"], reduction="sum")
    torch.testing.assert_close(kind.loss_sum(model, batch), expected)
    assert kind.loss_sum(model, batch).dtype == torch.float32

    metrics = kind.evaluate(model, validation, tokenizer.pad_token_id, batch_size=4)
    eval_logits = predict_logits(model, validation, tokenizer.pad_token_id, 4)
    labels = [example["labels"] for example in validation]
    assert set(metrics) == {"accuracy", "loss"}
    assert metrics["accuracy"] == pytest.approx(glue_metrics("rte", eval_logits.numpy(), labels)["accuracy"])
    mean_loss = F.cross_entropy(eval_logits, torch.tensor(labels), reduction="mean").item()
    assert metrics["loss"] == pytest.approx(mean_loss, rel=1e-5)


def test_kind_prepare_model_sets_the_head_dropout(bert_dir, tmp_path):
    kind = kind_for("rte", tmp_path, head_dropout=0.05)
    model, _ = load(bert_dir, kind)
    assert model.dropout.p != 0.05
    kind.prepare_model(model)
    assert model.dropout.p == 0.05 and model.config.classifier_dropout == 0.05


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_regex_targets_skip_the_head_and_head_is_restored_with_the_adapter(family, bert_dir, roberta_dir, tmp_path):
    path = bert_dir if family == "bert" else roberta_dir
    kind = kind_for("rte", tmp_path)
    model, tokenizer = load(path, kind, seed=0)
    config = NeuroAdaConfig(k=4, target_modules=ENCODER_TARGETS, modules_to_save=["classifier"])
    model = inject(model, config)
    layers = sorted(neuroada_layers(model))
    assert len(layers) == 2 * 6  # q k v, attention output, intermediate, output per layer
    assert not any("classifier" in name or "pooler" in name for name in layers)
    counts = count_parameters(model)
    head = sum(p.numel() for p in model.classifier.parameters())
    assert counts.head == head and counts.bypass > 0 and counts.trainable == counts.bypass + counts.head

    examples = encode(glue_rows("rte", 8), tokenizer, "rte", 32)
    train_steps(model, kind, examples, tokenizer.pad_token_id)
    expected = predict_logits(model, examples, tokenizer.pad_token_id, batch_size=3)
    save_adapter(model, tmp_path / "adapter")

    fresh, _ = load(path, kind, seed=123)  # another random head: the saved one must replace it
    before = predict_logits(fresh, examples, tokenizer.pad_token_id, batch_size=8)
    assert not torch.allclose(before, expected, atol=1e-4)
    restored = load_adapter(fresh, tmp_path / "adapter")
    got = predict_logits(restored, examples, tokenizer.pad_token_id, batch_size=8)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_regression_path_for_stsb(bert_dir, tmp_path):
    kind = kind_for("stsb", tmp_path)
    model, tokenizer = load(bert_dir, kind)
    assert model.config.num_labels == 1 and model.config.problem_type == "regression"
    assert kind.primary_metric == ("pearson", True)
    examples = encode(glue_rows("stsb", 10), tokenizer, "stsb", 32)
    batch = kind.collate(examples, tokenizer.pad_token_id)
    assert batch["labels"].dtype == torch.float32
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
    expected = ((logits.squeeze(-1) - batch["labels"]) ** 2).sum()
    torch.testing.assert_close(loss_sum(model, batch), expected)
    model = inject(model, NeuroAdaConfig(k=4, target_modules=ENCODER_TARGETS, modules_to_save=["classifier"]))
    first = kind.loss_sum(model.eval(), batch).item()
    train_steps(model, kind, examples, tokenizer.pad_token_id, steps=10, lr=3e-2)
    after = kind.loss_sum(model, batch).item()
    assert after < 0.8 * first
    metrics = kind.evaluate(model, examples, tokenizer.pad_token_id, batch_size=4)
    assert set(metrics) == {"pearson", "spearmanr", "combined_score", "loss"}
    assert metrics["loss"] == pytest.approx(after / len(examples), rel=1e-4)


def test_predictions_come_back_in_input_order(bert_dir, tmp_path):
    model, tokenizer = load(bert_dir, kind_for("rte", tmp_path))
    examples = encode(glue_rows("rte", 9), tokenizer, "rte", 32)
    one_by_one = torch.cat([predict_logits(model, [e], tokenizer.pad_token_id, 1) for e in examples])
    batched = predict_logits(model, examples, tokenizer.pad_token_id, batch_size=4)
    torch.testing.assert_close(batched, one_by_one, atol=1e-5, rtol=1e-4)
    model.train()
    predict_logits(model, examples[:2], tokenizer.pad_token_id, 2)
    assert model.training


def test_head_dropout_is_set_on_bert_and_roberta(bert_dir, roberta_dir, tmp_path):
    kind = kind_for("rte", tmp_path)
    for path, find in ((bert_dir, lambda m: m.dropout), (roberta_dir, lambda m: m.classifier.dropout)):
        model, _ = load(path, kind)
        set_head_dropout(model, 0.05)
        assert find(model).p == 0.05
    with pytest.raises(UserError, match="head_dropout"):
        set_head_dropout(model, 1.5)


def test_glue_eval_task_scores_the_report_part(bert_dir, tmp_path):
    data_dir = write_glue_task(tmp_path, "rte", train=8, validation=20)
    task = next(t for t in TASKS if t.name == "glue/rte").configure(seed=7, max_length=32)
    data = task.load(data_dir, None)
    selection = selection_rows("rte", data_dir, seed=7)
    assert len(data.examples) == 10 and len(selection) == 10
    assert not {e.index for e in data.examples} & {row["idx"] for row in selection}
    model, tokenizer = load(bert_dir, kind_for("rte", data_dir))
    records = task.predict(model, tokenizer, data.examples, EvalOptions(batch_size=4), None)
    assert [r["index"] for r in records] == [e.index for e in data.examples]
    accuracy = sum(r["correct"] for r in records) / len(records)
    assert task.score(records) == {"accuracy": pytest.approx(accuracy)}
    with pytest.raises(UserError, match="scoring"):
        task.check(EvalOptions(scoring="loglik"))
