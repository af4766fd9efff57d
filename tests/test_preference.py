"""task.kind=preference: pairs (reading, bad rows, tokens), the DPO / IPO loss, the adapter-disabled reference,
precomputed references, validation metrics, and one fast end-to-end run of the CLI recipe on a tiny model."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import make_tokenizer, pair_rows, tiny_llama, write_jsonl

from neuroada_cli import NeuroAdaConfig, inject
from neuroada_cli.data.preference import check_rows, llm_adapters_pairs, tokenize_pairs
from neuroada_cli.errors import UserError
from neuroada_cli.kinds.preference import (
    Preference,
    adapter_disabled,
    collate_pairs,
    preference_loss,
)

TARGETS = ["q_proj", "v_proj", "down_proj"]
CHATML = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}<|endoftext|>\n{% endfor %}"
          "{% if add_generation_prompt %}<s>assistant\n{% endif %}")


def train_dpo(overrides: list[str]):
    from neuroada_cli import config
    from neuroada_cli.training.recipe import train

    return train(config.validate(config.compose("smollm2_dpo", overrides)))


def make_kind(**options) -> Preference:
    values = {"train_dataset": "unused", "data_dir": None, "template": "commonsense", "max_length": 64,
              "train_limit": None, "seed": 0}
    values.update(options)
    return Preference(**values)


def adapted(seed: int = 2, **config):
    """A tiny Llama with NeuroAda deltas set to random values (so the policy differs from the reference)."""
    model = inject(tiny_llama(), NeuroAdaConfig(k=4, target_modules=TARGETS, **config))
    generator = torch.Generator().manual_seed(seed)
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.data = torch.randn(parameter.shape, generator=generator) * 0.05
    return model


def batch_of(rows, tokenizer=None, kind=None):
    kind = kind or make_kind()
    examples = tokenize_pairs(check_rows(rows, "pairs.jsonl"), tokenizer or make_tokenizer(), kind.max_length)
    return examples, collate_pairs(examples, 0)


# --------------------------------------------------------------------------------------------- pairs
@pytest.mark.parametrize("row, message", [
    ({"prompt": "p", "chosen": "a"}, "rejected missing"),
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "row 2: chosen equals rejected"),
    ({"prompt": "p", "chosen": "  ", "rejected": "b"}, "row 2: the chosen completion is empty"),
    ({"prompt": "", "chosen": "a", "rejected": "b"}, "row 2: the prompt is empty"),
    ({"prompt": "p", "chosen": [{"role": "assistant", "content": "a"}], "rejected": "b"}, "row 2: mixes text"),
    ({"prompt": "p", "chosen": 3, "rejected": "b"}, "row 2: column 'chosen' is int"),
])
def test_bad_rows_are_one_line_errors_naming_the_row(row, message):
    good = {"prompt": "q", "chosen": "yes", "rejected": "no"}
    rows = [good, row] if "missing" not in message else [row]
    with pytest.raises(UserError, match=message) as err:
        check_rows(rows, "data.train_file=pairs.jsonl")
    assert "\n" not in str(err.value) and "pairs.jsonl" in str(err.value)


def test_a_pair_longer_than_max_length_names_its_row():
    rows = pair_rows(3)
    rows[2]["rejected"] = "the lazy dog " * 40
    with pytest.raises(UserError, match=r"pairs: row 3: prompt \+ completion is \d+ tokens, more than "
                                        r"data.max_length=64 \(1 of 3 pairs are\)"):
        tokenize_pairs(check_rows(rows, "pairs"), make_tokenizer(), 64)


def test_string_pairs_share_the_prompt_and_end_with_eos():
    tokenizer = make_tokenizer()
    (example,), batch = batch_of(pair_rows(1), tokenizer)
    prompt = pair_rows(1)[0]["prompt"]
    assert example["prompt_ids"] == tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(example["chosen_ids"]) == "the correct answer is true<|endoftext|>"
    assert tokenizer.decode(example["rejected_ids"]) == "the correct answer is false<|endoftext|>"
    # rows: chosen then rejected; the completion mask covers exactly the completion tokens
    assert batch["input_ids"].shape[0] == 2 and batch["completion_mask"].sum(1).tolist() == [
        len(example["chosen_ids"]), len(example["rejected_ids"])]


def test_chat_pairs_use_the_template_and_an_implicit_prompt():
    tokenizer = make_tokenizer()
    tokenizer.chat_template = CHATML
    user = [{"role": "user", "content": "the quick brown fox"}]
    explicit = {"prompt": user, "chosen": [{"role": "assistant", "content": "jumps"}],
                "rejected": [{"role": "assistant", "content": "sleeps"}]}
    implicit = {"chosen": user + explicit["chosen"], "rejected": user + explicit["rejected"]}
    (a,), _ = batch_of([explicit], tokenizer)
    (b,), _ = batch_of([implicit], tokenizer)
    assert a == b
    assert tokenizer.decode(a["prompt_ids"]) == "<s>user\nthe quick brown fox<|endoftext|>\n<s>assistant\n"
    assert tokenizer.decode(a["chosen_ids"]) == "jumps<|endoftext|>"  # the template's end of turn, no newline


def test_llm_adapters_rows_become_pairs_with_a_seeded_wrong_option():
    rows = [{"instruction": "Pick one.\n\nAnswer1: x Answer2: y Answer3: z\n\nAnswer format: answer1/answer2/answer3",
             "input": "", "output": "the correct answer is answer2", "answer": "answer2"},
            {"instruction": "Solve 2+2.", "input": "", "output": "4", "answer": "4"}]  # no options: skipped
    pairs = llm_adapters_pairs(rows, "commonsense", seed=0, label="set")
    assert len(pairs) == 1 and pairs[0]["chosen"] == "the correct answer is answer2"
    assert pairs[0]["rejected"] in ("the correct answer is answer1", "the correct answer is answer3")
    assert pairs[0]["prompt"] == rows[0]["instruction"] + "\n" and pairs[0]["row"] == 1
    assert pairs == llm_adapters_pairs(rows, "commonsense", seed=0, label="set")
    with pytest.raises(UserError, match="no multiple-choice rows"):
        llm_adapters_pairs(rows[1:], "commonsense", seed=0, label="task.train_dataset=math_10k")


# ---------------------------------------------------------------------------------------------- loss
def naive_logps(model, batch) -> torch.Tensor:
    """Every position's logits, log-softmax, completion tokens summed: the definition, computed plainly."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    logps = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    return (logps * batch["completion_mask"][:, 1:]).sum(1)


@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])
def test_loss_is_dpo_against_a_separate_frozen_base(loss):
    """Reference through the disabled adapter == a separate copy of the base; loss and gradient both."""
    base = tiny_llama()
    model = adapted()
    kind = make_kind(loss=loss, beta=0.5)
    kind.prepare_model(model)
    examples, batch = batch_of(pair_rows(4), kind=kind)
    got = kind.loss_sum(model, batch)
    got.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    model.zero_grad()
    with torch.no_grad():
        ref_chosen, ref_rejected = naive_logps(base, batch).chunk(2)
    policy_chosen, policy_rejected = naive_logps(model, batch).chunk(2)
    chosen, rejected = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    if loss == "sigmoid":
        expected = -F.logsigmoid(0.5 * (chosen - rejected)).sum()
    else:
        n_chosen = torch.tensor([len(e["chosen_ids"]) for e in examples], dtype=torch.float32)
        n_rejected = torch.tensor([len(e["rejected_ids"]) for e in examples], dtype=torch.float32)
        expected = ((chosen / n_chosen - rejected / n_rejected - 1.0) ** 2).sum()
    expected.backward()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            torch.testing.assert_close(grads[name], parameter.grad, rtol=1e-4, atol=1e-7)


def test_a_zero_adapter_starts_at_log_2_per_pair():
    model = inject(tiny_llama(), NeuroAdaConfig(k=4, target_modules=TARGETS))
    _, batch = batch_of(pair_rows(4))
    assert make_kind().loss_sum(model, batch).item() == pytest.approx(4 * math.log(2), rel=1e-6)
    assert preference_loss(torch.zeros(2), torch.zeros(2), 0.1, "ipo", 1, 1).tolist() == [25.0, 25.0]


@pytest.mark.parametrize("method", ["merged", "unmerged", "lora"])
def test_the_disabled_adapter_is_the_base_bitwise_and_comes_back(method):
    base = tiny_llama()
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False))
    else:
        model = adapted(mode=method)
    _, batch = batch_of(pair_rows(2))
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        adapted_out, base_out = model(**inputs).logits, base(**inputs).logits
        with adapter_disabled(model):
            disabled_out = model(**inputs).logits
        again = model(**inputs).logits
    assert torch.equal(disabled_out, base_out) and not torch.equal(adapted_out, base_out)
    assert torch.equal(again, adapted_out)
    assert all(p.requires_grad for n, p in model.named_parameters() if "neuroada_delta" in n or "lora_" in n)


def test_the_disabled_adapter_on_a_quantized_base_is_that_base(tmp_path, tiny_tokenizer):
    pytest.importorskip("bitsandbytes")
    from neuroada_cli.models import load_model_and_tokenizer

    tiny_llama(hidden_size=128, intermediate_size=256).save_pretrained(tmp_path / "m")
    tiny_tokenizer.save_pretrained(tmp_path / "m")
    model, _ = load_model_and_tokenizer(str(tmp_path / "m"), quantization="nf4")
    _, batch = batch_of(pair_rows(2))
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        base_out = model(**inputs).logits
    model = inject(model, NeuroAdaConfig(k=4, target_modules=TARGETS))  # mode auto: unmerged on 4 bits
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.data.normal_(0, 0.05)
    with torch.no_grad():
        adapted_out = model(**inputs).logits
        with adapter_disabled(model):
            assert torch.equal(model(**inputs).logits, base_out)
        assert torch.equal(model(**inputs).logits, adapted_out) and not torch.equal(adapted_out, base_out)


def test_precomputed_references_give_the_same_loss_and_metrics():
    model = adapted()
    per_batch, precomputed = make_kind(), make_kind(precompute_ref=True)
    tokenizer = make_tokenizer()
    losses = []
    for kind in (per_batch, precomputed):
        kind._pairs = (check_rows(pair_rows(6), "pairs"), None)
        examples = kind.train_examples(tokenizer)
        losses.append(kind.loss_sum(model, kind.collate(examples[2:5], 0)))
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    assert precomputed._reference_table.shape == (6, 2)
    examples = tokenize_pairs(check_rows(pair_rows(5), "pairs"), tokenizer, 64)
    first = per_batch.evaluate(model, examples, 0, 2)
    assert precomputed.evaluate(model, examples, 0, 2) == pytest.approx(first, rel=1e-5)
    assert all("reference_logps" in example for example in examples)


def test_validation_reports_reward_accuracy_and_margin():
    model, base = adapted(), tiny_llama()
    kind = make_kind(beta=0.2)
    examples, batch = batch_of(pair_rows(5), kind=kind)
    metrics = kind.evaluate(model, examples, 0, 2)
    with torch.no_grad():
        ratio = naive_logps(model, batch) - naive_logps(base, batch)
    chosen, rejected = (0.2 * ratio).chunk(2)
    assert metrics["reward_accuracy"] == pytest.approx((chosen > rejected).float().mean().item())
    assert metrics["reward_margin"] == pytest.approx((chosen - rejected).mean().item(), rel=1e-4, abs=1e-7)
    assert metrics["loss"] == pytest.approx(-F.logsigmoid(chosen - rejected).mean().item(), rel=1e-5)
    assert metrics["pairs"] == 5 and model.training is False  # tiny_llama() is built in eval mode


# ------------------------------------------------------------------------------------ the recipe, end to end
@pytest.mark.parametrize("extra", [
    [],
    pytest.param(["method=lora", "lora.dropout=0.0", "preference.precompute_ref=true", "preference.loss=ipo"],
                 marks=pytest.mark.slow),
])
def test_cli_recipe_trains_dpo_on_your_own_pairs(tmp_path, tiny_llama_dir, extra):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(40))
    output = tmp_path / "run"
    run = train_dpo([*extra, f"model.name_or_path={tiny_llama_dir}", f"data.train_file={pairs}",
                            f"trainer.output_dir={output}", "trainer.max_steps=4", "trainer.batch_size=8",
                            "trainer.micro_batch_size=4", "trainer.eval_every=null", "data.train_limit=16",
                            "data.val_fraction=0.25", "neuroada.k=4", "optimizer.lr=2e-2", "data.max_length=64"])
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    losses = [line["loss"] for line in log if "loss" in line]
    start = math.log(2) if "preference.loss=ipo" not in extra else (1 / (2 * 0.1)) ** 2
    assert losses[0] == pytest.approx(start, abs=1e-4) and losses[-1] < losses[0]
    record = json.loads((run / "run.json").read_text())["validation"]
    assert record["metric"] == "loss" and record["evaluations"] == 2  # the two epoch ends
    assert {"reward_accuracy", "reward_margin"} <= set(record["metrics"])
    assert record["value"] < start and (run / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("override, message", [
    ("method=full", "method=full has no adapter to disable"),
    ("neuroada.selection=gradient", "selection=gradient scores cells with a supervised loss"),
    ("data.packing=true", "data.packing=True does not apply to task.kind=preference"),
])
def test_choices_dpo_cannot_honour_are_refused_before_the_model_loads(tmp_path, override, message):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(4))
    with pytest.raises(UserError, match=message):
        train_dpo([f"data.train_file={pairs}", f"trainer.output_dir={tmp_path / 'r'}",
                          "model.name_or_path=/nonexistent", override])


def test_kind_table_and_import_rule():
    import subprocess
    import sys

    from neuroada_cli.kinds import KIND_NAMES, get_kind

    assert "preference" in KIND_NAMES and get_kind("preference") is Preference
    code = ("import sys, neuroada_cli.kinds.preference, neuroada_cli.kinds; "
            "print(any(m in sys.modules for m in ('torch', 'transformers', 'peft')))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"


def test_copy_of_examples_is_not_needed_for_metrics():
    """evaluate caches references in the example dicts only with precompute_ref (never changes them otherwise)."""
    examples, _ = batch_of(pair_rows(3))
    before = copy.deepcopy(examples)
    make_kind().evaluate(adapted(), examples, 0, 2)
    assert examples == before
