"""LoRA through PEFT: the baseline, trained by the same loop as NeuroAda.

On a quantized base (model.quantization) this is QLoRA, prepared the way PEFT documents it
(``prepare_model_for_kbit_training``: frozen base, norms and embeddings in fp32, input gradients on); the
training loop enables gradient checkpointing itself (trainer.gradient_checkpointing).
Importing peft imports bitsandbytes whenever that is installed (peft.import_utils probes it), so method=lora
always pays that import; import_peft silences bitsandbytes' CPU-kernel warnings while it happens.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import UserError, one_line
from ..kinds import get_kind
from . import config_value

# PEFT's task type for each task kind: it decides which head LoRA leaves trainable and how it wraps the model.
def damaged_adapter(folder: Path, err: Exception) -> UserError:
    reason = one_line(err, 150)
    return UserError(f"LoRA adapter {str(folder)!r} is damaged or incomplete ({reason}); restore it from its run "
                     "or retrain it")


def import_peft():
    """The peft package, or a UserError saying how to install it."""
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is not None:  # peft imports it anyway: do it quietly first
        from ..models import import_bitsandbytes

        try:
            import_bitsandbytes()
        except UserError:
            pass  # a broken bitsandbytes only matters to quantized runs, which report it when they load
    try:
        import peft
    except ImportError:
        raise UserError("method=lora needs the peft package: pip install 'neuroada[dev]' (or pip install peft)") \
            from None
    return peft


class LoraMethod:
    name = "lora"

    def describe(self, cfg) -> str:
        quantized = config_value(cfg, "model.quantization")
        return f"lora r={cfg.lora.r} alpha={cfg.lora.alpha}" + (f" (QLoRA, {quantized} base)" if quantized else "")

    def base_source(self, cfg, adapter_dir: Path | None) -> tuple[str, str | None]:
        return config_value(cfg, "model.name_or_path"), config_value(cfg, "model.gguf_file")

    def gradient_batch_count(self, cfg) -> int:
        return 0

    def attach(self, cfg, model, *, gradient_batches=None, resume_dir: Path | None = None):
        peft = import_peft()
        lo = cfg.lora
        saved = list(lo.modules_to_save) if lo.modules_to_save is not None else None
        from .targets import ALL_LINEAR, is_all_linear

        # PEFT expands "all-linear" itself (every Linear but the output head)
        targets = ALL_LINEAR if is_all_linear(lo.target_modules) else list(lo.target_modules)
        lora_config = peft.LoraConfig(r=lo.r, lora_alpha=lo.alpha, lora_dropout=lo.dropout,
                                      target_modules=targets,
                                      task_type=get_kind(cfg.task.kind).peft_task_type, modules_to_save=saved)
        from ..models import is_quantized

        if is_quantized(model):  # QLoRA: PEFT's preparation of a k-bit base
            model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        try:
            model = peft.get_peft_model(model, lora_config)
        except ValueError as err:
            raise UserError(f"cannot apply LoRA: {one_line(err)}") from None
        if resume_dir is not None:
            from safetensors.torch import load_file

            adapter = Path(resume_dir) / "adapter"
            try:
                peft.set_peft_model_state_dict(model, load_file(str(adapter / "adapter_model.safetensors")))
            except Exception as err:
                raise damaged_adapter(adapter, err) from None
        return model

    def load_for_eval(self, cfg, model, adapter_dir: Path):
        try:
            return import_peft().PeftModel.from_pretrained(model, str(adapter_dir))
        except UserError:
            raise
        except Exception as err:  # a truncated file or a garbled config: PEFT, json and safetensors errors
            raise damaged_adapter(adapter_dir, err) from None

    def merge(self, model):
        if not hasattr(model, "merge_and_unload"):  # no adapter on it
            return model, False
        return model.merge_and_unload(), True

    def count(self, model) -> dict:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        from ..models.quantized import packed_parameter_excess

        # LoRA adds its matrices to the base; 4-bit weights count what they hold, not their packed storage
        base = sum(p.numel() for p in model.parameters()) - trainable + packed_parameter_excess(model)
        return {"trainable_params": trainable, "total_params": base, "trainable_percent": 100.0 * trainable / base}

    def save(self, model, tokenizer, path: Path) -> None:
        from ..atomic import atomic_directory

        with atomic_directory(path) as staging:  # complete or not at all (a failed write keeps the old one)
            model.save_pretrained(staging)
