"""NeuroAda registered as a PEFT method: ``peft.get_peft_model(model, NeuroAdaPeftConfig(k=20))``.

A thin face over the same layer maths (peft_layer.py reuses layer.py's fused autograd function). PEFT
accepts methods from outside its tree through ``register_peft_method``; that needs a member of its
``PeftType`` enum, which is added here at import time (``register`` is idempotent).

File layout (the one adapter format, also written by ``save_adapter``), per target layer ``<name>``:
``base_model.model.<name>.neuroada_delta`` [d_out, k] fp32, ``...neuroada_indices`` [d_out, k] int16
(int32 above 32767 inputs), ``...neuroada_fingerprint`` [3] fp64 (sums of the base values at the cells,
checked on load so an adapter is never applied to another base); trained biases as
``...<name>.base_layer.bias`` and ``modules_to_save`` as ``base_model.model.<module>.<param>``.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch
from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTuner, _ExcludedModule
from peft.utils import PeftType
from torch import nn

from ..errors import UserError
from . import selection
from .config import NeuroAdaConfig
from .model import compact_input_layers, name_matches
from .peft_layer import NeuroAdaPeftLinear

PEFT_TYPE_NAME = "NEUROADA"
PREFIX = "neuroada_"
PEFT_KEY_PREFIX = "base_model.model."
FINGERPRINT_RTOL = 5e-3  # tolerates a base reloaded in another dtype (bf16 rounding), not another model


def _default_targets() -> list[str]:
    return list(NeuroAdaConfig().target_modules)


@dataclass
class NeuroAdaPeftConfig(PeftConfig):
    """PEFT config of a NeuroAda adapter; the fields mean what they mean in ``NeuroAdaConfig``.

    ``train_bias`` maps to PEFT's ``bias="neuroada_only"``; ``base_fingerprint`` is a short id of the
    base the cells were selected on (filled in when the adapter is created).
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
        return NeuroAdaConfig(k=self.k, target_modules=self.target_modules, selection=self.selection,
                              train_bias=self.train_bias, modules_to_save=self.modules_to_save or [],
                              seed=self.seed, impl=self.impl, scope=self.scope,
                              neuron_fraction=self.neuron_fraction)

    @classmethod
    def from_neuroada(cls, config: NeuroAdaConfig, **peft_fields) -> "NeuroAdaPeftConfig":
        values = config.to_dict()
        values["modules_to_save"] = values["modules_to_save"] or None
        return cls(**values, **peft_fields)


def select_cells(config: NeuroAdaPeftConfig, weight: torch.Tensor, name: str) -> torch.Tensor:
    """[d_out, k] columns for one layer; gradient selection is done by ``inject`` (it needs batches)."""
    if not config.to_neuroada().per_row:  # the PEFT layer keeps the fixed [d_out, k] layout only
        raise UserError(f"neuroada scope={config.scope} / neuron_fraction={config.neuron_fraction} is not supported "
                        "through PEFT; use neuroada_cli.inject (the CLI does) or scope=neuron, neuron_fraction=1")
    if config.selection == "reverse":
        return selection.reverse(weight, config.k)
    if config.selection == "random":
        return selection.random_columns(*weight.shape, config.k, config.seed, name, weight.device)
    if config.selection == "gradient" and not config.inference_mode:
        raise UserError("neuroada selection=gradient needs training batches, which get_peft_model cannot take; "
                        "use neuroada_cli.inject(model, config, gradient_batches) or selection=magnitude")
    return selection.magnitude(weight, config.k)  # (a load replaces these with the saved cells)


def fingerprint(orig: torch.Tensor) -> torch.Tensor:
    """Sum, |sum| and sum of squares of the original selected values, in float64."""
    values = orig.detach().double().cpu()
    return torch.stack([values.sum(), values.abs().sum(), values.square().sum()])


def fingerprint_matches(expected: torch.Tensor, got: torch.Tensor) -> bool:
    expected, got = [float(v) for v in expected], [float(v) for v in got]
    scale, square = max(expected[1], 1e-12), max(expected[2], 1e-12)
    return (abs(got[0] - expected[0]) <= FINGERPRINT_RTOL * scale
            and abs(got[1] - expected[1]) <= FINGERPRINT_RTOL * scale
            and abs(got[2] - expected[2]) <= FINGERPRINT_RTOL * square)


def index_dtype(d_in: int) -> torch.dtype:
    return torch.int16 if d_in <= torch.iinfo(torch.int16).max else torch.int32


def wrong_base_error(where: str, layer_name: str) -> UserError:
    return UserError(f"adapter {where!r} was made for another base model (weights of layer {layer_name!r} differ); "
                     "load it onto the model it was trained on")


class NeuroAdaPeftModel(BaseTuner):
    """The PEFT tuner: wraps each target nn.Linear in a NeuroAdaPeftLinear (one per layer, many adapters)."""

    prefix: str = PREFIX
    tuner_layer_cls = NeuroAdaPeftLinear
    target_module_mapping: dict = {}

    @staticmethod
    def _check_target_module_exists(config, key: str):
        """NeuroAda's own name rules (last name component, or a regex on the full name), as ``inject``."""
        parts = key.split(".")
        ancestors = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
        if config.modules_to_save and any(name_matches(a, list(config.modules_to_save)) for a in ancestors):
            return _ExcludedModule()  # layers inside a fully trained module (a head) are not bypassed
        return name_matches(key, list(config.target_modules))

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs):
        base = target.get_base_layer() if isinstance(target, NeuroAdaPeftLinear) else target
        if not isinstance(base, nn.Linear):
            raise UserError(f"neuroada target matched {current_key!r}, a {type(base).__name__}, not nn.Linear; "
                            "name linear layers only")
        if base.in_features < config.k:
            raise UserError(f"neuroada k={config.k} exceeds the {base.in_features} inputs of layer {current_key!r}; "
                            f"use k <= {base.in_features} or leave that layer out of target_modules")
        if isinstance(target, NeuroAdaPeftLinear):
            if target.merged:
                raise UserError("cannot add a NeuroAda adapter to a merged model; call unmerge_adapter() first")
            target.restore_cells()  # select on the pristine base
            target.update_layer(adapter_name, select_cells(config, base.weight, current_key), config.inference_mode)
            return
        new = NeuroAdaPeftLinear(base, adapter_name, select_cells(config, base.weight, current_key), config.impl)
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
            config.base_fingerprint = base_digest({n: l.neuroada_orig[adapter_name] for n, l in layers.items()})

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        """PEFT's entries (deltas, biases) plus each layer's indices and base fingerprint, compact."""
        result = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        for name, layer in model.named_modules():
            if isinstance(layer, NeuroAdaPeftLinear) and adapter_name in layer.neuroada_idx:
                idx = layer.neuroada_idx[adapter_name]
                result[f"{name}.neuroada_indices.{adapter_name}"] = idx.to(index_dtype(layer.in_features)).cpu()
                result[f"{name}.neuroada_fingerprint.{adapter_name}"] = fingerprint(layer.neuroada_orig[adapter_name])
        for key in [k for k in result if ".neuroada_delta." in k]:
            result[key] = result[key].detach().float().contiguous()
        return result

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """Put the saved cells in place (re-reading the base there) and check the base before the values load."""
        state_dict = dict(state_dict)
        for name, layer in model.named_modules():
            if not isinstance(layer, NeuroAdaPeftLinear) or adapter_name not in layer.neuroada_idx:
                continue
            key = name if name.startswith(PEFT_KEY_PREFIX) else PEFT_KEY_PREFIX + name
            indices = state_dict.pop(f"{key}.neuroada_indices", None)
            expected = state_dict.pop(f"{key}.neuroada_fingerprint", None)
            if indices is None:
                raise UserError(f"the NeuroAda adapter has no indices for layer {name!r}; "
                                "it was made for another model")
            layer.update_layer(adapter_name, indices.long(), inference_mode=config.inference_mode)
            got = fingerprint(layer.neuroada_orig[adapter_name])
            if expected is not None and not fingerprint_matches(expected, got):
                where = config.base_model_name_or_path or f"selected on base {config.base_fingerprint}"
                raise wrong_base_error(str(where), name.removeprefix(PEFT_KEY_PREFIX))
        _compact_inputs(model, adapter_name)
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)


def _compact_inputs(model: nn.Module, adapter_name: str) -> dict[str, NeuroAdaPeftLinear]:
    """Let layers whose selected inputs are few keep only those for backward (inject's rule); returns the layers."""
    layers = {name: m for name, m in model.named_modules()
              if isinstance(m, NeuroAdaPeftLinear) and adapter_name in m.neuroada_idx}
    chosen = {name: layer.neuroada_idx[adapter_name] for name, layer in layers.items()}
    for name in compact_input_layers(layers, chosen):
        layers[name].use_compact_input(adapter_name)
    return layers


def base_digest(origs: dict[str, torch.Tensor]) -> str:
    """A short id of the base (bf16-rounded selected values), shown in messages and run records."""
    digest = hashlib.sha256()
    for name in sorted(origs):
        digest.update(name.removeprefix(PEFT_KEY_PREFIX).encode())
        digest.update(origs[name].detach().to(torch.bfloat16).view(torch.int16).cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


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
