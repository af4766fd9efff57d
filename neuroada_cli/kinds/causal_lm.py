"""Causal LM: prompt/completion pairs or chat conversations, the loss on the target tokens only.

Records come from ``data/train_sets.load_records``: the LLM-Adapters set ``task.train_dataset`` with the
prompt template ``task.template`` (a stem under the data dir, a JSON file or a hub id), or the user's own
``data.train_file`` in ``data.format`` (alpaca, prompt/completion, chat, ...; data/formats.py); validation
records from ``data.val_file`` or a seeded ``data.val_fraction`` of the training rows. They are tokenised by
``data/tokenize.tokenize_records`` (chat through the tokenizer's chat template, loss on the assistant turns;
``data.train_on_prompt`` supervises everything). Every target token weighs the same: an example's share of the
loss normaliser is its number of target tokens, so the recipe divides the summed token loss of a global batch by
that batch's target tokens. ``evaluate`` gives the mean token loss over the target tokens of all examples.
"""
from __future__ import annotations

from ..data.tokenize import IGNORE_INDEX
from ..errors import UserError

# trainer.cross_entropy: plain = logits of every target token at once; chunked = a chunk of target positions at a
# time, each chunk's logits recomputed in backward; liger = liger-kernel's fused linear cross-entropy (CUDA);
# auto = the best available for the device.
CROSS_ENTROPY_IMPLS = ("auto", "plain", "chunked", "liger")


class CausalLM:
    name = "causal_lm"
    auto_class = "AutoModelForCausalLM"  # the transformers class models.py loads for this kind
    peft_task_type = "CAUSAL_LM"         # what PEFT (the LoRA baseline) calls it
    reads_data_files = True              # data.train_file / val_file / val_fraction apply
    primary_metric = ("loss", False)

    def __init__(self, *, train_dataset: str, data_dir: str | None, template: str, max_length: int,
                 train_limit: int | None, seed: int, train_file: str | None = None, data_format: str = "auto",
                 train_on_prompt: bool = False, val_file: str | None = None, val_fraction: float | None = None):
        self.train_dataset, self.data_dir, self.template = train_dataset, data_dir, template
        self.max_length, self.train_limit, self.seed = max_length, train_limit, seed
        self.train_file, self.data_format, self.train_on_prompt = train_file, data_format, train_on_prompt
        self.val_file, self.val_fraction = val_file, val_fraction
        self._records: tuple[list[dict], list[dict] | None] | None = None
        self._slice_logits: bool | None = None  # decided once per model in prepare_model

    @classmethod
    def from_config(cls, cfg) -> "CausalLM":
        from ..config_schema import config_value

        return cls(train_dataset=config_value(cfg, "task.train_dataset"), data_dir=config_value(cfg, "data.dir"),
                   template=config_value(cfg, "task.template"), max_length=config_value(cfg, "data.max_length"),
                   train_limit=config_value(cfg, "data.train_limit"), seed=config_value(cfg, "trainer.seed", 0),
                   train_file=config_value(cfg, "data.train_file"), data_format=config_value(cfg, "data.format", "auto"),
                   train_on_prompt=bool(config_value(cfg, "data.train_on_prompt", False)),
                   val_file=config_value(cfg, "data.val_file"), val_fraction=config_value(cfg, "data.val_fraction"))

    def model_options(self) -> dict:
        return {}

    def prepare_model(self, model) -> None:
        """Decide whether the loss may pass a ``logits_to_keep`` mask (transformers causal LMs take one)."""
        from ..models import forward_accepts

        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self._slice_logits = forward_accepts(base, "logits_to_keep")

    def check_inputs(self) -> None:
        """Read the rows now (a missing or malformed file fails before the slow model load)."""
        self._all_records()

    def _all_records(self) -> tuple[list[dict], list[dict] | None]:
        if self._records is None:
            from ..data.train_sets import load_records

            self._records = load_records(
                train_dataset=self.train_dataset, data_dir=self.data_dir, template=self.template,
                train_file=self.train_file, data_format=self.data_format, limit=self.train_limit, seed=self.seed,
                val_file=self.val_file, val_fraction=self.val_fraction)
        return self._records

    def train_examples(self, tokenizer) -> list[dict]:
        from ..data.tokenize import tokenize_records

        examples = tokenize_records(self._all_records()[0], tokenizer, self.max_length, self.train_on_prompt)
        if not examples:
            source = self.train_file or self.train_dataset
            raise UserError(f"the training data ({source}) has no usable rows: the file is empty or no row has the "
                            "fields of its format; check the file (data.format, data.train_file)")
        return examples

    def validation_examples(self, tokenizer) -> list[dict] | None:
        """Tokenised validation records (``data.val_file`` / ``data.val_fraction``), None when neither is set."""
        from ..data.tokenize import tokenize_records

        records = self._all_records()[1]
        return None if records is None else tokenize_records(records, tokenizer, self.max_length, self.train_on_prompt)

    def weight(self, example: dict) -> int:
        """Target tokens: labels that some position predicts (the first label is never predicted)."""
        return sum(label != IGNORE_INDEX for label in example["labels"][1:])

    def collate(self, examples: list[dict], pad_id: int) -> dict:
        from ..data.tokenize import collate_causal

        return collate_causal(examples, pad_id)

    def loss_sum(self, model, batch: dict):
        """Sum (not mean) of next-token cross-entropies over the supervised positions, in fp32.

        Only positions that predict a target token go through the LM head (``logits_to_keep`` mask): the
        prompt's logits are never formed, which saves the head's share of compute and the vocab-sized memory.
        """
        import torch
        import torch.nn.functional as F

        if self._slice_logits is None:
            self.prepare_model(model)
        targets = batch["labels"][:, 1:]
        keep = targets != IGNORE_INDEX
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if self._slice_logits:
            mask = torch.zeros_like(batch["labels"], dtype=torch.bool)
            mask[:, :-1] = keep
            logits = model(**inputs, logits_to_keep=mask).logits
            if logits.dim() == 2:  # [number of kept positions, vocab]
                return F.cross_entropy(logits.float(), targets[keep], reduction="sum")
            logits = logits[:, :-1]
        else:
            logits = model(**inputs).logits[:, :-1]
        return F.cross_entropy(logits[keep].float(), targets[keep], reduction="sum")

    def evaluate(self, model, examples: list[dict], pad_id: int, batch_size: int) -> dict:
        """{"loss": mean token loss} over ``examples`` (inference mode, length-sorted batches, mode restored)."""
        import torch

        from ..data.batching import length_sorted_batches

        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        total, weight = 0.0, 0
        try:
            with torch.inference_mode():
                for indices in length_sorted_batches(examples, batch_size):
                    batch = self.collate([examples[i] for i in indices], pad_id)
                    total += self.loss_sum(model, {key: value.to(device) for key, value in batch.items()}).item()
                    weight += sum(self.weight(examples[i]) for i in indices)
        finally:
            model.train(was_training)
        return {"loss": total / max(weight, 1)}
