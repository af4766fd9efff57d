"""Causal LM: prompt/completion pairs or chat conversations, the loss on the target tokens only.

Records come from ``data/train_sets.load_records``: the LLM-Adapters set ``task.train_dataset`` with the
prompt template ``task.template`` (a stem under the data dir, a JSON file or a hub id), or the user's own
``data.train_file`` in ``data.format`` (alpaca, prompt/completion, chat, ...; data/formats.py); validation
records from ``data.val_file`` or a seeded ``data.val_fraction`` of the training rows. They are tokenised by
``data/tokenize.tokenize_records`` (chat through the tokenizer's chat template, loss on the assistant turns;
``data.train_on_prompt`` supervises everything). Every target token weighs the same: an example's share of the
loss normaliser is its number of target tokens, so the recipe divides the summed token loss of a global batch by
that batch's target tokens. ``evaluate`` gives the mean token loss over the target tokens of all examples.

``trainer.cross_entropy`` decides how the target logits are formed (kinds/losses.py: plain, chunked, liger);
``data.packing`` makes ``collate`` pack examples into rows of ``data.max_length`` with per-example position ids
and no attention mask (data/packing.py), with exactly the unpacked batch's supervised positions.
"""
from __future__ import annotations

from ..data.tokenize import IGNORE_INDEX
from ..errors import UserError

# trainer.cross_entropy: plain = logits of every target token at once; chunked = a chunk of target positions at a
# time, each chunk's logits recomputed in backward; liger = liger-kernel's fused linear cross-entropy (CUDA);
# auto = liger on CUDA when installed, else chunked (plain where the model post-processes its logits).
# kinds/losses.py has the why.
CROSS_ENTROPY_IMPLS = ("auto", "plain", "chunked", "liger")


class CausalLM:
    name = "causal_lm"
    auto_class = "AutoModelForCausalLM"  # the transformers class models.py loads for this kind
    peft_task_type = "CAUSAL_LM"         # what PEFT (the LoRA baseline) calls it
    reads_data_files = True              # data.train_file / val_file / val_fraction apply
    primary_metric = ("loss", False)

    def __init__(self, *, train_dataset: str, data_dir: str | None, template: str, max_length: int,
                 train_limit: int | None, seed: int, train_file: str | None = None, data_format: str = "auto",
                 train_on_prompt: bool = False, val_file: str | None = None, val_fraction: float | None = None,
                 cross_entropy: str = "auto", packing: bool = False):
        if cross_entropy not in CROSS_ENTROPY_IMPLS:
            raise UserError(f"trainer.cross_entropy={cross_entropy!r} is unknown; use one of: "
                            f"{', '.join(CROSS_ENTROPY_IMPLS)}")
        self.train_dataset, self.data_dir, self.template = train_dataset, data_dir, template
        self.max_length, self.train_limit, self.seed = max_length, train_limit, seed
        self.train_file, self.data_format, self.train_on_prompt = train_file, data_format, train_on_prompt
        self.val_file, self.val_fraction = val_file, val_fraction
        self.cross_entropy, self.packing = cross_entropy, packing
        self._records: tuple[list[dict], list[dict] | None] | None = None
        self._slice_logits: bool | None = None  # decided once per model in prepare_model
        self._no_cache = False                  # pass use_cache=False (prepare_model)
        self._flat_packing = False              # flash attention: packed rows as one row (prepare_model)
        self._impl: str | None = None           # trainer.cross_entropy resolved at the first loss (device known)

    @classmethod
    def from_config(cls, cfg) -> "CausalLM":
        from ..config_schema import config_value

        return cls(train_dataset=config_value(cfg, "task.train_dataset"), data_dir=config_value(cfg, "data.dir"),
                   template=config_value(cfg, "task.template"), max_length=config_value(cfg, "data.max_length"),
                   train_limit=config_value(cfg, "data.train_limit"), seed=config_value(cfg, "trainer.seed", 0),
                   train_file=config_value(cfg, "data.train_file"), data_format=config_value(cfg, "data.format", "auto"),
                   train_on_prompt=bool(config_value(cfg, "data.train_on_prompt", False)),
                   val_file=config_value(cfg, "data.val_file"), val_fraction=config_value(cfg, "data.val_fraction"),
                   cross_entropy=config_value(cfg, "trainer.cross_entropy", "auto"),
                   packing=bool(config_value(cfg, "data.packing", False)))

    def model_options(self) -> dict:
        return {}

    def prepare_model(self, model) -> None:
        """Decide whether the loss may pass a ``logits_to_keep`` mask (transformers causal LMs take one), and
        how packed rows are laid out for the model's attention (flash attention: one row, see data/packing.py)."""
        from ..data.packing import flat_rows_for
        from ..models import forward_accepts
        from .losses import unwrap

        inner = unwrap(model)
        base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
        self._slice_logits = forward_accepts(base, "logits_to_keep")
        # No KV cache for a loss: it would only cost memory in eval mode, and transformers reads packed position
        # ids as sequence boundaries only when there is no cache.
        self._no_cache = forward_accepts(base, "use_cache")
        self._flat_packing = flat_rows_for(getattr(getattr(base, "config", None), "_attn_implementation", None))
        self._impl = None

    def check_inputs(self) -> None:
        """Read the rows now (a missing or malformed file fails before the slow model load); liger asked for
        without its package or without a GPU fails now too."""
        if self.cross_entropy == "liger":
            from .losses import check_liger_available

            check_liger_available()
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
        """Right-padded rows, or with ``data.packing`` the examples packed into rows of ``data.max_length``
        (position ids per example, no attention mask: data/packing.py)."""
        if self.packing:
            from ..data.packing import collate_packed

            return collate_packed(examples, pad_id, self.max_length, flat=self._flat_packing)
        from ..data.tokenize import collate_causal

        return collate_causal(examples, pad_id)

    def loss_sum(self, model, batch: dict):
        """Sum (not mean) of next-token cross-entropies over the supervised positions, in fp32.

        Only positions that predict a target token go through the LM head (``logits_to_keep`` mask): the
        prompt's logits are never formed. ``trainer.cross_entropy`` decides how the target logits are formed
        (kinds/losses.py: all at once, in checkpointed chunks, or fused by liger); packed batches carry
        ``position_ids`` instead of an ``attention_mask``.
        """
        from .losses import resolve_impl, target_loss_sum

        if self._slice_logits is None:
            self.prepare_model(model)
        if self._impl is None:
            self._impl = resolve_impl(self.cross_entropy, model, batch["input_ids"].device)
        inputs = {key: batch[key] for key in ("input_ids", "attention_mask", "position_ids") if key in batch}
        if self._no_cache:
            inputs["use_cache"] = False
        return target_loss_sum(model, inputs, batch["labels"], self._impl, self._slice_logits)

    def evaluate(self, model, examples: list[dict], pad_id: int, batch_size: int) -> dict:
        """{"loss": mean token loss} over ``examples`` (inference mode, length-sorted batches, mode restored)."""
        return self.evaluation_metrics([self.evaluation_part(model, examples, pad_id, batch_size)])

    def evaluation_part(self, model, examples: list[dict], pad_id: int, batch_size: int) -> dict:
        """One process's share of a sharded evaluation (training/validation.py): summed token loss and target
        tokens as plain numbers. Batches of ``batch_size`` examples, longest first (packed when data.packing)."""
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
        return {"loss_sum": total, "weight": weight}

    @staticmethod
    def evaluation_metrics(parts: list[dict]) -> dict:
        """{"loss": summed token loss of every part over their target tokens}."""
        total = sum(part["loss_sum"] for part in parts)
        return {"loss": total / max(sum(part["weight"] for part in parts), 1)}
