"""NeuroAda (the method): a trainable delta at the k largest input connections of every target neuron."""
from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from . import config_value


class NeuroAdaMethod:
    name = "neuroada"
    shardable = True

    def describe(self, cfg) -> str:
        n = cfg.neuroada
        placement = "" if n.scope == "neuron" else f", scope={n.scope}"
        coverage = "" if n.neuron_fraction >= 1 else f", {n.neuron_fraction:g} of neurons"
        return f"neuroada k={n.k} ({n.selection}{placement}{coverage})"

    def base_source(self, cfg, adapter_dir: Path | None) -> tuple[str, str | None]:
        return config_value(cfg, "model.name_or_path"), config_value(cfg, "model.gguf_file")

    def gradient_batch_count(self, cfg) -> int:
        return cfg.neuroada.gradient_batches if cfg.neuroada.selection == "gradient" else 0

    def attach(self, cfg, model, *, gradient_batches=None, resume_dir: Path | None = None):
        """Resume restores the checkpoint's adapter with its saved cells, so gradient selection is not re-run."""
        from .. import NeuroAdaConfig, inject, load_adapter

        if resume_dir is not None:
            return load_adapter(model, Path(resume_dir) / "adapter")
        from .targets import resolve_targets

        n = cfg.neuroada
        # A model on the meta device (trainer.strategy=fsdp, processes > 0) only needs the layout: its values come
        # from process 0, so any selection with the same shapes will do (gradient scores could not be computed).
        selection = "magnitude" if next(model.parameters()).is_meta else n.selection
        # all-linear is expanded here, on the loaded model; the adapter config records the resolved names
        config = NeuroAdaConfig(k=n.k, target_modules=resolve_targets(n.target_modules, model), selection=selection,
                                train_bias=n.train_bias, modules_to_save=list(n.modules_to_save), seed=n.seed,
                                impl=n.impl, scope=n.scope, neuron_fraction=n.neuron_fraction)
        try:
            return inject(model, config, gradient_batches=gradient_batches)
        except UserError:
            raise
        except ValueError as err:  # shape problems the method library reports as ValueError
            raise UserError(f"cannot apply NeuroAda: {err}") from None

    def load_for_eval(self, cfg, model, adapter_dir: Path):
        from .. import load_adapter

        return load_adapter(model, adapter_dir)

    def merge(self, model):
        """Deltas added to the base weights in fp32 (rounded once), NeuroAda layers replaced by nn.Linear."""
        from .. import neuroada_layers, unload

        if not neuroada_layers(model):
            return model, False
        return unload(model), True

    def count(self, model) -> dict:
        from .. import count_parameters

        # ParameterCount's names with run.json's suffixes: trainable_params, ..., trainable_percent.
        return {("trainable_percent" if key == "percent" else f"{key}_params"): value
                for key, value in count_parameters(model).as_dict().items()}

    def save(self, model, tokenizer, path: Path) -> None:
        from .. import save_adapter

        save_adapter(model, path)
