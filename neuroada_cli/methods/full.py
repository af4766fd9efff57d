"""Full fine-tuning: every parameter trains; adapter/ holds the whole model and its tokenizer."""
from __future__ import annotations

from pathlib import Path

from . import config_value


class FullMethod:
    name = "full"

    def describe(self, cfg) -> str:
        return "full fine-tuning"

    def base_source(self, cfg, adapter_dir: Path | None) -> tuple[str, str | None]:
        """The saved model folder once there is one (eval, export, resume), else the configured base."""
        if adapter_dir is not None:
            return str(adapter_dir), None
        return config_value(cfg, "model.name_or_path"), config_value(cfg, "model.gguf_file")

    def gradient_batch_count(self, cfg) -> int:
        return 0

    def attach(self, cfg, model, *, gradient_batches=None, resume_dir: Path | None = None):
        """On resume the model was already loaded from the checkpoint's saved model (see base_source)."""
        for param in model.parameters():
            param.requires_grad_(True)
        return model

    def load_for_eval(self, cfg, model, adapter_dir: Path):
        return model  # base_source already loaded the saved model

    def merge(self, model):
        return model, False

    def count(self, model) -> dict:
        every = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return {"trainable_params": trainable, "total_params": every, "trainable_percent": 100.0 * trainable / every}

    def save(self, model, tokenizer, path: Path) -> None:
        from ..atomic import atomic_directory

        with atomic_directory(path) as staging:  # complete or not at all (a failed write keeps the old one)
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
