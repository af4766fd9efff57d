"""NeuroAda registered as a PEFT method: ``peft.get_peft_model(model, NeuroAdaPeftConfig(k=20))``.

A thin face: the layers are layer.py's NeuroAdaLinear (the class ``inject`` builds, registered here as a
virtual subclass of PEFT's BaseTunerLayer, so PEFT finds and drives them), selection is core.model.select. PEFT
accepts methods from outside its tree through ``register_peft_method``; that needs a member of its
``PeftType`` enum, which is added here at import time (``register`` is idempotent).

File layout (the one adapter format, also written by ``save_adapter``), per target layer ``<name>``:
``base_model.model.<name>.neuroada_delta`` [d_out, k] fp32, ``...neuroada_indices`` [d_out, k] int16
(int32 above 32767 inputs), ``...neuroada_fingerprint`` [3] fp64 (sums of the base values at the cells,
checked on load so an adapter is never applied to another base); trained biases as
``...<name>.base_layer.bias`` and ``modules_to_save`` as ``base_model.model.<module>.<param>``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, _ExcludedModule
from peft.utils import PeftType
from torch import nn

from ..errors import UserError
from .adapter_format import (  # noqa: F401  (re-exported: the names PEFT users and older code import)
    FINGERPRINT_RTOL,
    PEFT_KEY_PREFIX,
    PEFT_TYPE_NAME,
    base_digest,
    fingerprint,
    fingerprint_matches,
    index_dtype,
    wrong_base_error,
)
from .config import NeuroAdaConfig
from .layer import NeuroAdaLinear
from .model import cell_values, compact_input_layers, name_matches, select, selection_weights
from .quantized import QUANTIZED_FINGERPRINT_RTOL, is_quantized

BaseTunerLayer.register(NeuroAdaLinear)  # PEFT finds tuner layers by isinstance(module, BaseTunerLayer)
NeuroAdaPeftLinear = NeuroAdaLinear  # the name PEFT users met first; the same class
FSDP_INFIX = "_fsdp_wrapped_module."  # FSDP(1) wrappers put this into every module name below them

PREFIX = "neuroada_"


def _default_targets() -> list[str]:
    return list(NeuroAdaConfig().target_modules)


@dataclass
class NeuroAdaPeftConfig(PeftConfig):
    """PEFT config of a NeuroAda adapter; the fields mean what they mean in ``NeuroAdaConfig``.

    ``train_bias`` maps to PEFT's ``bias="neuroada_only"``; ``base_fingerprint`` is a short id of the
    base the cells were selected on (filled in when the adapter is created). NeuroAdaConfig is the one
    declaration: these fields are its fields (tests/test_peft_contract.py checks names and defaults) and every
    value is validated by it.
    """

    k: int = 20
    target_modules: list[str] = field(default_factory=_default_targets)
    selection: str = "magnitude"
    train_bias: bool = False
    modules_to_save: list[str] | None = None
    seed: int = 0
    impl: str = "fused"
    scope: str = "neuron"
    neuron_fraction: float = 1.0
    mode: str = "auto"
    base_fingerprint: str | None = None

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType[PEFT_TYPE_NAME]
        # Validation and normalisation are NeuroAdaConfig's (one home for the rules and messages).
        plain = self.to_neuroada()
        self.target_modules = plain.target_modules
        self.modules_to_save = plain.modules_to_save or None

    @property
    def bias(self) -> str:  # read by PEFT: marks and saves the target layers' biases
        return "neuroada_only" if self.train_bias else "none"

    def to_neuroada(self) -> NeuroAdaConfig:
        values = {name: getattr(self, name) for name in NeuroAdaConfig.__dataclass_fields__}
        return NeuroAdaConfig(**{**values, "modules_to_save": self.modules_to_save or []})

    @classmethod
    def from_neuroada(cls, config: NeuroAdaConfig, **peft_fields) -> "NeuroAdaPeftConfig":
        values = config.to_dict()
        values["modules_to_save"] = values["modules_to_save"] or None
        return cls(**values, **peft_fields)


def set_selection_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> nn.Module:
    """Before ``get_peft_model`` on a quantized model: select on these full-precision weights (layer name -> W)."""
    model.neuroada_selection_weights = dict(weights)
    return model


def layer_cells(config: "NeuroAdaPeftConfig", model: nn.Module, base: nn.Module, name: str, chosen=None):
    """(cells, orig or None) of one layer, chosen exactly as ``inject`` chooses them (core.model.select).

    ``chosen``: the layer's cells when they were picked over all layers at once (scope=global).
    """
    plain = config.to_neuroada()
    if plain.selection == "gradient":
        if not config.inference_mode:
            raise UserError("neuroada selection=gradient needs training batches, which get_peft_model cannot take; "
                            "use neuroada_cli.inject(model, config, gradient_batches) or selection=magnitude")
        plain.selection = "magnitude"  # a load replaces these with the saved cells
    given = getattr(model, "neuroada_selection_weights", None) or {}
    source = selection_weights({name: base}, {name: given[name]} if name in given else None)[name]
    idx = chosen if chosen is not None else select({name: source}, plain)[name]
    unmerged = plain.layer_mode(is_quantized(base)) == "unmerged"
    return idx, (cell_values(source, idx) if unmerged else None)


class NeuroAdaPeftModel(BaseTuner):
    """The PEFT tuner: wraps each target nn.Linear in a NeuroAdaLinear (one per layer, many adapters)."""

    prefix: str = PREFIX
    tuner_layer_cls = NeuroAdaLinear
    target_module_mapping: dict = {}

    @staticmethod
    def _check_target_module_exists(config, key: str):
        """NeuroAda's own name rules (last name component, or a regex on the full name), as ``inject``."""
        key = key.replace(FSDP_INFIX, "")
        parts = key.split(".")
        ancestors = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
        if config.modules_to_save and any(name_matches(a, list(config.modules_to_save)) for a in ancestors):
            if name_matches(key, list(config.target_modules)) and name_matches(key, list(config.modules_to_save)):
                raise UserError(f"module {key!r} is both a NeuroAda target (target_modules={config.target_modules}) "
                                f"and fully trained (modules_to_save={config.modules_to_save}); "
                                "remove it from one of the two")
            return _ExcludedModule()  # layers inside a fully trained module (a head) are not bypassed
        return name_matches(key, list(config.target_modules))

    def _prepare_model(self, peft_config, model: nn.Module) -> None:
        """scope=global places one budget over all target layers: select them together, before injection."""
        self._global_cells = {}
        plain = peft_config.to_neuroada()
        if plain.scope != "global" or (plain.selection == "gradient" and peft_config.inference_mode):
            return
        targets = {name.replace(FSDP_INFIX, ""): module for name, module in model.named_modules()
                   if isinstance(module, nn.Linear) and self._check_target_module_exists(peft_config, name) is True}
        given = getattr(model, "neuroada_selection_weights", None) or {}
        self._global_cells = select(selection_weights(targets, {n: w for n, w in given.items() if n in targets}),
                                    plain)

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs):
        base = target.get_base_layer() if isinstance(target, NeuroAdaLinear) else target
        if not isinstance(base, nn.Linear):
            raise UserError(f"neuroada target matched {current_key!r}, a {type(base).__name__}, not nn.Linear; "
                            "name linear layers only")
        if base.in_features < config.k:
            raise UserError(f"neuroada k={config.k} exceeds the {base.in_features} inputs of layer {current_key!r}; "
                            f"use k <= {base.in_features} or leave that layer out of target_modules")
        if isinstance(target, NeuroAdaLinear):
            if target.merged:
                raise UserError("cannot add a NeuroAda adapter to a merged model; call unmerge_adapter() first")
            target.restore_cells()  # select on the pristine base
            key = current_key.replace(FSDP_INFIX, "")
            idx, orig = layer_cells(config, self.model, base, key, getattr(self, "_global_cells", {}).get(key))
            target.update_layer(adapter_name, idx, orig=orig, inference_mode=config.inference_mode)
            return
        key = current_key.replace(FSDP_INFIX, "")
        idx, orig = layer_cells(config, self.model, base, key, getattr(self, "_global_cells", {}).get(key))
        mode = config.to_neuroada().layer_mode(is_quantized(base))
        new = NeuroAdaLinear(base, idx, impl=config.impl, mode=mode, orig=orig, adapter_name=adapter_name)
        if adapter_name not in self.active_adapters:
            new.requires_grad_(False)  # an added, inactive adapter is not trained
        self._replace_module(parent, target_name, new, target)

    def _post_injection_hook(self, model: nn.Module, config, adapter_name: str) -> None:
        """As ``inject``: every target pattern must match a layer; sibling layers may keep compact inputs."""
        targeted = self.targeted_module_names
        missing = [p for p in config.target_modules if not any(name_matches(n, [p]) for n in targeted)]
        if missing:
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
            raise UserError(f"target_modules {missing} match no layer of this model; "
                            f"its linear layers are named {linear}")
        layers = _compact_inputs(model, adapter_name)
        if config.base_fingerprint is None:
            config.base_fingerprint = base_digest({n.replace(FSDP_INFIX, ""): l.cell(adapter_name, "neuroada_orig")
                                                   for n, l in layers.items()})

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        """PEFT's entries (deltas, biases) plus each layer's indices and base fingerprint, compact."""
        result = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        for name, layer in model.named_modules():
            if isinstance(layer, NeuroAdaLinear) and adapter_name in layer.neuroada_delta:
                idx = layer.cell(adapter_name, "neuroada_idx")
                result[f"{name}.neuroada_indices.{adapter_name}"] = idx.to(index_dtype(layer.in_features)).cpu()
                orig = layer.cell(adapter_name, "neuroada_orig")
                result[f"{name}.neuroada_fingerprint.{adapter_name}"] = fingerprint(orig)
                counts = layer.cell(adapter_name, "neuroada_row_counts")
                if counts is not None:  # the general layout (scope=layer|global, neuron_fraction < 1)
                    result[f"{name}.neuroada_row_counts.{adapter_name}"] = counts.to(index_dtype(layer.in_features)).cpu()
        # an FSDP-wrapped model names its modules with the wrapper's infix; the file holds the model's own names
        result = {key.replace(FSDP_INFIX, ""): value for key, value in result.items()}
        for key in [k for k in result if ".neuroada_delta." in k]:
            result[key] = result[key].detach().float().contiguous()
        return result

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """Put the saved cells in place (re-reading the base there) and check the base before the values load."""
        state_dict = dict(state_dict)
        given = getattr(model, "neuroada_selection_weights", None) or {}
        for name, layer in model.named_modules():
            if not isinstance(layer, NeuroAdaLinear) or adapter_name not in layer.neuroada_delta:
                continue
            name = name.replace(FSDP_INFIX, "")
            key = name if name.startswith(PEFT_KEY_PREFIX) else PEFT_KEY_PREFIX + name
            indices = state_dict.pop(f"{key}.neuroada_indices", None)
            expected = state_dict.pop(f"{key}.neuroada_fingerprint", None)
            counts = state_dict.pop(f"{key}.neuroada_row_counts", None)
            if indices is None:
                raise UserError(f"the NeuroAda adapter has no indices for layer {name!r}; "
                                "it was made for another model")
            plain_name = name.removeprefix(PEFT_KEY_PREFIX)
            cells = indices.long() if counts is None else (counts.long(), indices.long())
            orig = None
            if layer.mode == "unmerged":
                source = selection_weights({plain_name: layer.base_layer},
                                           {plain_name: given[plain_name]} if plain_name in given else None)
                orig = cell_values(source[plain_name], cells)
            layer.update_layer(adapter_name, cells, orig=orig, inference_mode=config.inference_mode)
            got = fingerprint(layer.cell(adapter_name, "neuroada_orig"))
            loose = layer.quantized and plain_name not in given
            if expected is not None and not fingerprint_matches(expected, got,
                                                                QUANTIZED_FINGERPRINT_RTOL if loose else None):
                where = config.base_model_name_or_path or f"selected on base {config.base_fingerprint}"
                raise wrong_base_error(str(where), name.removeprefix(PEFT_KEY_PREFIX))
        _compact_inputs(model, adapter_name)
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)


def _compact_inputs(model: nn.Module, adapter_name: str) -> dict[str, NeuroAdaLinear]:
    """Let layers whose selected inputs are few keep only those for backward (inject's rule); returns the layers."""
    layers = {name: m for name, m in model.named_modules()
              if isinstance(m, NeuroAdaLinear) and adapter_name in m.neuroada_delta}
    chosen = {name: layer.cell(adapter_name, "neuroada_idx") for name, layer in layers.items()}
    for name in compact_input_layers(layers, chosen):
        layers[name].use_compact_input(adapter_name)
    return layers


def _add_peft_type() -> None:
    """Add NEUROADA to PEFT's closed PeftType enum (a str enum: the member is also the plain string)."""
    if PEFT_TYPE_NAME in PeftType.__members__:
        return
    member = str.__new__(PeftType, PEFT_TYPE_NAME)
    member._name_ = member._value_ = PEFT_TYPE_NAME
    if hasattr(member, "_sort_order_"):
        member._sort_order_ = len(PeftType._member_names_)
    PeftType._member_map_[PEFT_TYPE_NAME] = member
    PeftType._value2member_map_[PEFT_TYPE_NAME] = member
    PeftType._member_names_.append(PEFT_TYPE_NAME)
    type.__setattr__(PeftType, PEFT_TYPE_NAME, member)


def register() -> None:
    """Make ``get_peft_model`` / ``PeftModel.from_pretrained`` know NeuroAda (safe to call twice)."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import register_peft_method

    _add_peft_type()
    if PeftType[PEFT_TYPE_NAME] not in PEFT_TYPE_TO_TUNER_MAPPING:
        register_peft_method(name=PEFT_TYPE_NAME.lower(), config_cls=NeuroAdaPeftConfig,
                             model_cls=NeuroAdaPeftModel, prefix=PREFIX)


register()
