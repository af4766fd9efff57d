"""The trainable methods behind one interface: NeuroAda (the method), LoRA (PEFT baseline), full fine-tuning.

``attach`` makes a loaded base model trainable (or restores a checkpoint's state on it), ``count_trainable``
gives run.json's parameter counts and ``save_trained`` writes adapter/ (NeuroAda: save_adapter; LoRA: the PEFT
adapter; full: the whole model and its tokenizer). Config objects stop here: the method library gets plain values.
"""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from .errors import UserError


def attach(cfg: DictConfig, model, gradient_batches, resume_from):
    """``cfg.method`` on ``model``; ``resume_from`` = (step, checkpoint dir) restores that checkpoint's weights
    (NeuroAda with the saved cells, so gradient selection is not re-run); ``gradient_batches`` feed
    selection=gradient."""
    if cfg.method == "neuroada":
        from . import NeuroAdaConfig, inject, load_adapter

        if resume_from is not None:
            return load_adapter(model, resume_from[1] / "adapter")
        n = cfg.neuroada
        config = NeuroAdaConfig(k=n.k, target_modules=list(n.target_modules), selection=n.selection,
                                train_bias=n.train_bias, modules_to_save=list(n.modules_to_save), seed=n.seed,
                                impl=n.impl)
        try:
            return inject(model, config, gradient_batches=gradient_batches)
        except UserError:
            raise
        except ValueError as err:  # shape problems the method reports as ValueError
            raise UserError(f"cannot apply NeuroAda: {err}") from None
    if cfg.method == "lora":
        peft = import_peft()
        lo = cfg.lora
        task_type = "CAUSAL_LM" if cfg.task.kind == "causal_lm" else "SEQ_CLS"
        saved = list(lo.modules_to_save) if lo.modules_to_save is not None else None
        lora_config = peft.LoraConfig(r=lo.r, lora_alpha=lo.alpha, lora_dropout=lo.dropout,
                                      target_modules=list(lo.target_modules), task_type=task_type,
                                      modules_to_save=saved)
        try:
            model = peft.get_peft_model(model, lora_config)
        except ValueError as err:
            raise UserError(f"cannot apply LoRA: {str(err).splitlines()[0]}") from None
        if resume_from is not None:
            from safetensors.torch import load_file

            weights = load_file(str(resume_from[1] / "adapter" / "adapter_model.safetensors"))
            peft.set_peft_model_state_dict(model, weights)
        return model
    for param in model.parameters():  # full fine-tuning
        param.requires_grad_(True)
    return model


def import_peft():
    try:
        import peft
    except ImportError:
        raise UserError("method=lora needs the peft package: pip install 'neuroada[dev]' (or pip install peft)") from None
    return peft


def count_trainable(cfg: DictConfig, model) -> dict:
    if cfg.method == "neuroada":
        from . import count_parameters

        c = count_parameters(model)
        return {"trainable_params": c.trainable, "total_params": c.total, "trainable_percent": c.percent,
                "bypass_params": c.bypass, "bias_params": c.bias, "head_params": c.head}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    every = sum(p.numel() for p in model.parameters())
    base = every - trainable if cfg.method == "lora" else every  # LoRA adds its matrices to the base
    return {"trainable_params": trainable, "total_params": base, "trainable_percent": 100.0 * trainable / base}


def save_trained(cfg: DictConfig, model, tokenizer, path: Path) -> None:
    if cfg.method == "neuroada":
        from . import save_adapter

        save_adapter(model, path)
    else:  # PEFT saves the LoRA adapter; a full fine-tune saves the whole model (+ tokenizer)
        model.save_pretrained(path)
        if cfg.method == "full":
            tokenizer.save_pretrained(path)
