"""Head only (a linear probe): the base stays frozen and only ``head.modules_to_save`` trains.

The floor every adapter has to beat: if a method cannot do better than training the classifier on frozen
features, its bypasses are not worth their parameters. adapter/ holds the head's weights (safetensors) and a
small JSON naming the modules; eval loads them onto a fresh base, so nothing needs merging.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError, one_line
from . import config_value

CONFIG_NAME = "head_config.json"
WEIGHTS_NAME = "head_model.safetensors"


def head_modules(model, patterns: list[str]) -> dict:
    """{name: module} of the modules ``patterns`` pick (same matching as neuroada.modules_to_save)."""
    from ..core.model import saved_module_names

    modules = dict(model.named_modules())
    names = saved_module_names(model, list(patterns))
    if not names:
        raise UserError(f"head.modules_to_save={list(patterns)} match no module of this model; name its head, "
                        "e.g. [classifier] (BERT: [classifier, pooler]; causal LMs: [lm_head])")
    return {name: modules[name] for name in names}


class HeadMethod:
    name = "head"

    def describe(self, cfg) -> str:
        return f"head only ({', '.join(cfg.head.modules_to_save)})"

    def base_source(self, cfg, adapter_dir: Path | None) -> tuple[str, str | None]:
        return config_value(cfg, "model.name_or_path"), config_value(cfg, "model.gguf_file")

    def gradient_batch_count(self, cfg) -> int:
        return 0

    def attach(self, cfg, model, *, gradient_batches=None, resume_dir: Path | None = None):
        heads = head_modules(model, cfg.head.modules_to_save)
        for param in model.parameters():
            param.requires_grad_(False)
        for module in heads.values():
            for param in module.parameters():
                param.requires_grad_(True)
        if resume_dir is not None:
            self.load_for_eval(cfg, model, Path(resume_dir) / "adapter")
        return model

    def load_for_eval(self, cfg, model, adapter_dir: Path):
        import torch
        from safetensors.torch import load_file

        config_file, weights_file = adapter_dir / CONFIG_NAME, adapter_dir / WEIGHTS_NAME
        if not config_file.is_file() or not weights_file.is_file():
            raise UserError(f"{str(adapter_dir)!r} is not a head-only adapter (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
        try:
            json.loads(config_file.read_text())["modules_to_save"]
            tensors = load_file(str(weights_file))
        except Exception as err:  # bad JSON, missing key, truncated safetensors header
            reason = one_line(err, 120)
            raise UserError(f"head adapter {str(adapter_dir)!r} is damaged ({reason}); restore it from its run or "
                            "retrain it") from None
        params = dict(model.named_parameters())
        odd = [n for n, t in tensors.items() if n not in params or params[n].shape != t.shape]
        if odd or not tensors:
            raise UserError(f"head adapter {str(adapter_dir)!r} does not fit this model (parameter "
                            f"{(odd or ['none'])[0]!r}); load it onto the base it was trained from")
        with torch.no_grad():
            for name, value in tensors.items():
                params[name].copy_(value)
        return model

    def merge(self, model):
        return model, False  # the trained head is already part of the plain model

    def count(self, model) -> dict:
        every = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return {"trainable_params": trainable, "total_params": every, "trainable_percent": 100.0 * trainable / every,
                "head_params": trainable}

    def save(self, model, tokenizer, path: Path) -> None:
        from safetensors.torch import save_file

        from ..atomic import atomic_directory

        # by parameter name: named_parameters() lists a tied weight (lm_head = embeddings) once
        tensors = {name: p.detach().to("cpu").contiguous() for name, p in model.named_parameters() if p.requires_grad}
        patterns = sorted({name.rsplit(".", 1)[0] for name in tensors})
        with atomic_directory(path) as staging:  # complete or not at all (a failed write keeps the old one)
            save_file(tensors, str(staging / WEIGHTS_NAME))
            (staging / CONFIG_NAME).write_text(json.dumps({"method": "head", "modules_to_save": patterns}, indent=2))
