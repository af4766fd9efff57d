"""Preference tuning (task.kind=preference): DPO on pairs of a chosen and a rejected completion.

Data (data/preference.py): ``data.train_file`` rows with prompt / chosen / rejected (strings, or chat messages
rendered with the model's chat template, as TRL's DPOTrainer takes them), or pairs built from the
LLM-Adapters set ``task.train_dataset`` (the correct option as chosen, a seeded wrong one as rejected); held-out
pairs from ``data.val_file`` / ``data.val_fraction``. A batch of B pairs is 2B right-padded rows, the B chosen
sequences first, then the B rejected ones (TRL's order).

Loss, per pair, from sequence log-probabilities summed over the completion tokens only (the prompt is context):
``r = log pi(y|x) - log pi_ref(y|x)`` for y = chosen, rejected;

* ``preference.loss=sigmoid`` (DPO): ``-log sigmoid(beta * (r_chosen - r_rejected))``;
* ``preference.loss=ipo``: ``(r_chosen / n_chosen - r_rejected / n_rejected - 1 / (2 beta))^2`` with n the
  completion tokens (the length-normalised form TRL uses, which the IPO authors confirmed to TRL).

``loss_sum`` returns the SUM over the micro-batch's pairs and every pair weighs 1, so the recipe's division by
the global batch's weight gives the mean over pairs, as TRL.

The reference pi_ref is the model with its adapter disabled: the frozen base, bitwise (``adapter_disabled``:
PEFT's ``disable_adapter`` for LoRA and NeuroAda's PEFT face; for ``inject`` models each NeuroAda layer's
``enable_adapters(False)``: merged mode writes the original cells back, unmerged mode (a 4-bit base) skips the
delta product). It is computed once per micro-batch under ``torch.no_grad``
BEFORE the policy pass (NeuroAda's fused layers keep W for backward, so the cells must hold orig + delta again
when the policy pass runs), or, with ``preference.precompute_ref=true``, once per example at the first loss call
(before the first optimizer step) and looked up by the example's ``pair_index``; validation pairs cache theirs at
their first evaluation. Dropout is switched off (as TRL's ``disable_dropout`` default): policy and reference must
be computed the same way. method=full and method=head have no adapter to disable and are refused. DDP is tested
(tests/test_preference_distributed.py); trainer.strategy=fsdp is not (every process runs the same reference
batches, so its collective forwards line up, but no test covers it).

Validation: ``evaluate`` reports the DPO loss, reward accuracy (share of pairs with beta * r_chosen > beta *
r_rejected, strictly, as TRL) and the mean reward margin (plus the mean chosen / rejected rewards). adapter/ keeps
the lowest validation DPO loss (primary metric): it is continuous, while reward accuracy moves in steps of
1 / pairs and ties at 0 before training (every reward is 0 then).
"""
from __future__ import annotations

import contextlib
import logging

from ..errors import UserError

PREFERENCE_LOSSES = ("sigmoid", "ipo")  # preference.loss: DPO's sigmoid loss, or IPO's squared loss
METRIC_SUMS = ("loss", "correct", "margin", "chosen_reward", "rejected_reward")

logger = logging.getLogger(__name__)


class Preference:
    name = "preference"
    auto_class = "AutoModelForCausalLM"
    peft_task_type = "CAUSAL_LM"
    reads_data_files = True
    primary_metric = ("loss", False)

    def __init__(self, *, train_dataset: str, data_dir, template: str, max_length: int, train_limit: int | None,
                 seed: int, beta: float = 0.1, loss: str = "sigmoid", precompute_ref: bool = False,
                 train_file: str | None = None, val_file: str | None = None, val_fraction: float | None = None,
                 batch_size: int = 16, refusals: tuple[str, ...] = ()):
        if loss not in PREFERENCE_LOSSES:
            raise UserError(f"preference.loss={loss!r} is not valid; use one of {', '.join(PREFERENCE_LOSSES)}")
        if not beta > 0:
            raise UserError(f"preference.beta={beta} must be > 0 (DPO uses 0.1 by default)")
        self.train_dataset, self.data_dir, self.template = train_dataset, data_dir, template
        self.max_length, self.train_limit, self.seed = max_length, train_limit, seed
        self.beta, self.loss, self.precompute_ref = float(beta), loss, bool(precompute_ref)
        self.train_file, self.val_file, self.val_fraction = train_file, val_file, val_fraction
        self.batch_size = batch_size      # reference precompute batches (eval.batch_size)
        self.refusals = refusals          # config choices this kind cannot honour (found by from_config)
        self._pairs = None
        self._train_examples: list[dict] | None = None
        self._reference_table = None      # [pairs, 2] reference log-probs (precompute_ref), by pair_index
        self._slice_logits: bool | None = None
        self._dropout_off = False

    @classmethod
    def from_config(cls, cfg) -> Preference:
        from ..config_schema import config_value

        method = config_value(cfg, "method", "neuroada")
        refusals = []
        if method in ("full", "head"):
            refusals.append(f"method={method} has no adapter to disable, so there is no frozen reference for DPO; "
                            "use method=neuroada or method=lora")
        if method == "neuroada" and config_value(cfg, "neuroada.selection") == "gradient":
            refusals.append("neuroada.selection=gradient scores cells with a supervised loss; use magnitude (or "
                            "select on a supervised run and start DPO from its export)")
        for key, default in (("data.format", "auto"), ("data.train_on_prompt", False), ("data.packing", False)):
            value = config_value(cfg, key, default)
            if value != default:
                refusals.append(f"{key}={value} does not apply to task.kind=preference (rows are prompt / chosen / "
                                f"rejected, the loss covers the completions); set {key}={str(default).lower()}")
        return cls(train_dataset=config_value(cfg, "task.train_dataset"), data_dir=config_value(cfg, "data.dir"),
                   template=config_value(cfg, "task.template"), max_length=config_value(cfg, "data.max_length"),
                   train_limit=config_value(cfg, "data.train_limit"), seed=config_value(cfg, "trainer.seed", 0),
                   beta=config_value(cfg, "preference.beta", 0.1), loss=config_value(cfg, "preference.loss", "sigmoid"),
                   precompute_ref=bool(config_value(cfg, "preference.precompute_ref", False)),
                   train_file=config_value(cfg, "data.train_file"), val_file=config_value(cfg, "data.val_file"),
                   val_fraction=config_value(cfg, "data.val_fraction"),
                   batch_size=config_value(cfg, "eval.batch_size", 16), refusals=tuple(refusals))

    # ---------------------------------------------------------------------------------- model, data
    def model_options(self) -> dict:
        return {}

    def prepare_model(self, model) -> None:
        """Whether the forward takes a ``logits_to_keep`` mask (only completion positions reach the LM head)."""
        from ..models import forward_accepts

        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self._slice_logits = forward_accepts(base, "logits_to_keep")

    def check_inputs(self) -> None:
        """Refused config choices and every pair's row checks, before the slow model load."""
        if self.refusals:
            raise UserError(self.refusals[0])
        self._all_pairs()

    def _all_pairs(self):
        if self._pairs is None:
            from ..data.preference import load_pairs

            self._pairs = load_pairs(train_dataset=self.train_dataset, data_dir=self.data_dir, template=self.template,
                                     train_file=self.train_file, limit=self.train_limit, seed=self.seed,
                                     val_file=self.val_file, val_fraction=self.val_fraction)
        return self._pairs

    def train_examples(self, tokenizer) -> list[dict]:
        from ..data.preference import tokenize_pairs

        examples = tokenize_pairs(self._all_pairs()[0], tokenizer, self.max_length)
        for index, example in enumerate(examples):
            example["pair_index"] = index  # the row of the precomputed reference table
        self._train_examples, self._reference_table = examples, None
        return examples

    def validation_examples(self, tokenizer) -> list[dict] | None:
        from ..data.preference import tokenize_pairs

        pairs = self._all_pairs()[1]
        return None if pairs is None else tokenize_pairs(pairs, tokenizer, self.max_length)

    def weight(self, example: dict) -> int:
        return 1  # the loss is a mean over pairs

    def collate(self, examples: list[dict], pad_id: int) -> dict:
        return collate_pairs(examples, pad_id)

    # ------------------------------------------------------------------------------------- loss
    def sequence_logps(self, model, batch: dict):
        """Summed log-probabilities of every row's completion tokens, fp32 [rows] (rows = chosen then rejected)."""
        if self._slice_logits is None:
            self.prepare_model(_unwrap(model))
        return sequence_logps(model, batch, self._slice_logits)

    def reference_logps(self, model, batch: dict):
        """(chosen, rejected) reference log-probs [B] each: precomputed, or the adapter-disabled model now."""
        import torch

        if self.precompute_ref and self._train_examples is not None and "pair_index" in batch \
                and bool((batch["pair_index"] >= 0).all()):
            table = self._precomputed(model)
            rows = table[batch["pair_index"].to(table.device)]
            return rows[:, 0], rows[:, 1]
        with torch.no_grad(), adapter_disabled(model):
            return self.sequence_logps(model, batch).chunk(2)

    def _precomputed(self, model):
        """The reference table of the training pairs, computed at the first call (before any optimizer step)."""
        import torch

        if self._reference_table is None:
            logger.info("precomputing reference log-probabilities of %d pairs", len(self._train_examples))
            values = self._reference_values(model, self._train_examples)
            self._reference_table = torch.tensor(values, dtype=torch.float32, device=_device(model))
        return self._reference_table

    def _reference_values(self, model, examples: list[dict]) -> list[tuple[float, float]]:
        import torch

        from ..data.batching import length_sorted_batches

        values: list = [None] * len(examples)
        with torch.no_grad(), adapter_disabled(model):
            for indices in length_sorted_batches(examples, self.batch_size):
                batch = _to(self.collate([examples[i] for i in indices], 0), _device(model))
                chosen, rejected = self.sequence_logps(model, batch).chunk(2)
                for row, i in enumerate(indices):
                    values[i] = (float(chosen[row]), float(rejected[row]))
        return values

    def pair_losses(self, policy, reference, batch: dict):
        """Per-pair losses [B] and the rewards (beta * log-ratio) of chosen and rejected."""
        policy_chosen, policy_rejected = policy.chunk(2)
        reference_chosen, reference_rejected = reference
        chosen_ratio, rejected_ratio = policy_chosen - reference_chosen, policy_rejected - reference_rejected
        lengths = batch["completion_mask"].sum(1).clamp(min=1).to(policy.dtype).chunk(2)
        losses = preference_loss(chosen_ratio, rejected_ratio, self.beta, self.loss, *lengths)
        return losses, self.beta * chosen_ratio.detach(), self.beta * rejected_ratio.detach()

    def loss_sum(self, model, batch: dict):
        """Sum of the pairs' DPO (or IPO) losses in fp32: the reference pass first (no grad), then the policy."""
        if not self._dropout_off:
            switch_off_dropout(_unwrap(model))
            self._dropout_off = True
        reference = self.reference_logps(model, batch)
        losses, _, _ = self.pair_losses(self.sequence_logps(model, batch), reference, batch)
        return losses.sum()

    # ------------------------------------------------------------------------------- validation
    def evaluation_part(self, model, examples: list[dict], pad_id: int, batch_size: int) -> dict:
        """Plain sums over ``examples`` (one shard's): loss, correct pairs, margins, rewards, pairs."""
        import torch

        from ..data.batching import length_sorted_batches

        device = _device(model)
        sums = dict.fromkeys(METRIC_SUMS, 0.0)
        was_training = model.training
        model.eval()
        try:
            if self.precompute_ref:  # cached per example at its first evaluation
                todo = [e for e in examples if "reference_logps" not in e]
                for example, value in zip(todo, self._reference_values(model, todo) if todo else []):
                    example["reference_logps"] = value
            with torch.inference_mode():
                for indices in length_sorted_batches(examples, batch_size):
                    chunk = [examples[i] for i in indices]
                    batch = _to(self.collate(chunk, pad_id), device)
                    if self.precompute_ref:
                        cached = torch.tensor([e["reference_logps"] for e in chunk], device=device)
                        reference = cached[:, 0], cached[:, 1]
                    else:
                        with adapter_disabled(model):
                            reference = self.sequence_logps(model, batch).chunk(2)
                    losses, chosen, rejected = self.pair_losses(self.sequence_logps(model, batch), reference, batch)
                    sums["loss"] += losses.sum().item()
                    sums["correct"] += (chosen > rejected).sum().item()
                    sums["margin"] += (chosen - rejected).sum().item()
                    sums["chosen_reward"] += chosen.sum().item()
                    sums["rejected_reward"] += rejected.sum().item()
        finally:
            model.train(was_training)
        return {**sums, "pairs": len(examples)}

    def evaluation_metrics(self, parts: list[dict]) -> dict:
        pairs = max(sum(part["pairs"] for part in parts), 1)
        total = {key: sum(part[key] for part in parts) for key in METRIC_SUMS}
        return {"loss": total["loss"] / pairs, "reward_accuracy": total["correct"] / pairs,
                "reward_margin": total["margin"] / pairs, "chosen_reward": total["chosen_reward"] / pairs,
                "rejected_reward": total["rejected_reward"] / pairs, "pairs": sum(part["pairs"] for part in parts)}

    def evaluate(self, model, examples: list[dict], pad_id: int, batch_size: int) -> dict:
        """{"loss" (mean DPO loss), "reward_accuracy", "reward_margin", ...} over ``examples``."""
        return self.evaluation_metrics([self.evaluation_part(model, examples, pad_id, batch_size)])


# ----------------------------------------------------------------------------------------- pieces
def preference_loss(chosen_ratio, rejected_ratio, beta: float, loss: str, chosen_tokens=None, rejected_tokens=None):
    """Per-pair loss from the log-ratios log pi - log pi_ref of chosen and rejected (see the module docstring)."""
    import torch.nn.functional as F

    if loss == "sigmoid":
        return -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    if loss == "ipo":
        return (chosen_ratio / chosen_tokens - rejected_ratio / rejected_tokens - 1.0 / (2.0 * beta)) ** 2
    raise UserError(f"preference.loss={loss!r} is not valid; use one of {', '.join(PREFERENCE_LOSSES)}")


def collate_pairs(examples: list[dict], pad_id: int) -> dict:
    """2B right-padded rows (B chosen, then B rejected): input_ids, attention_mask, completion_mask, pair_index."""
    import torch

    if not examples:
        raise ValueError("collate_pairs needs at least one example")
    rows = [(e["prompt_ids"], e["chosen_ids"]) for e in examples] + [(e["prompt_ids"], e["rejected_ids"])
                                                                     for e in examples]
    width = max(len(prompt) + len(completion) for prompt, completion in rows)
    input_ids = torch.full((len(rows), width), int(pad_id), dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    completion_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, (prompt, completion) in enumerate(rows):
        length = len(prompt) + len(completion)
        input_ids[row, :length] = torch.tensor(list(prompt) + list(completion), dtype=torch.long)
        attention_mask[row, :length] = 1
        completion_mask[row, len(prompt):length] = 1
    pair_index = torch.tensor([e.get("pair_index", -1) for e in examples], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask,
            "pair_index": pair_index}


def sequence_logps(model, batch: dict, slice_logits: bool = True):
    """Sum over each row's completion tokens of log p(token | what precedes it), fp32 [rows].

    With ``slice_logits`` only the positions that predict a completion token go through the LM head (a boolean
    ``logits_to_keep`` mask), so the prompt's vocab-sized logits are never formed.
    """
    import torch
    import torch.nn.functional as F

    input_ids, mask = batch["input_ids"], batch["completion_mask"]
    targets, keep = input_ids[:, 1:], mask[:, 1:].bool()
    inputs = {"input_ids": input_ids, "attention_mask": batch["attention_mask"], "use_cache": False}
    logits = None
    if slice_logits:
        positions = torch.zeros_like(input_ids, dtype=torch.bool)
        positions[:, :-1] = keep  # position t predicts token t + 1
        logits = model(**inputs, logits_to_keep=positions).logits
        if logits.dim() != 2:  # a forward that ignored the mask: all positions came back
            logits = logits[:, :-1][keep]
    else:
        logits = model(**inputs).logits[:, :-1][keep]
    token_logps = -F.cross_entropy(logits.float(), targets[keep], reduction="none")
    rows = torch.arange(keep.shape[0], device=keep.device).unsqueeze(1).expand_as(keep)[keep]
    return torch.zeros(keep.shape[0], dtype=torch.float32, device=token_logps.device).index_add(0, rows, token_logps)


@contextlib.contextmanager
def adapter_disabled(model):
    """The model with its adapter switched off (the frozen base, bitwise) inside the block; as before afterwards.

    PEFT models (LoRA, QLoRA, NeuroAda's PEFT face): ``disable_adapter``. ``inject`` models: the core's
    ``disabled`` when present; else every adapter layer's own ``enable_adapters(False)`` (the PEFT tuner-layer
    interface NeuroAda's one layer class keeps: merged mode writes the original cells back, unmerged mode skips
    the delta product), undone at exit with each delta's ``requires_grad`` as it was.
    """
    inner = _unwrap(model)
    if hasattr(inner, "disable_adapter"):
        with inner.disable_adapter():
            yield
        return
    from .. import core

    if hasattr(core, "disabled"):
        with core.disabled(inner):
            yield
        return
    layers = [module for module in inner.modules()
              if hasattr(module, "enable_adapters") and not getattr(module, "disable_adapters", True)]
    trainable = [(p, p.requires_grad) for layer in layers for p in layer.parameters()]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for parameter, requires_grad in trainable:
            parameter.requires_grad_(requires_grad)


def switch_off_dropout(model) -> None:
    """Dropout probability 0 everywhere (nn.Dropout modules and attention dropout rates)."""
    from torch import nn

    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def _unwrap(model):
    """The model inside DDP / torch.compile wrappers (the one that owns the adapter)."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if inner is None and type(model).__name__ in ("DistributedDataParallel", "DataParallel"):
            inner = model.module
        if inner is None:
            return model
        model = inner


def _device(model):
    return next(model.parameters()).device


def _to(batch: dict, device) -> dict:
    return {key: value.to(device) for key, value in batch.items()}
