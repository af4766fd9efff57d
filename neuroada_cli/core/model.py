"""Model-level operations: inject NeuroAda layers, merge / unmerge / unload, count parameters."""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from . import selection
from .config import NeuroAdaConfig
from .layer import COMPACT_INPUT_FRACTION, NeuroAdaLinear
from .quantized import check_weight_shape, dequantized_weight, is_quantized

_REGEX_CHARS = set(".*+?[](){}|^$\\")


def name_matches(name: str, patterns: list[str]) -> bool:
    """A pattern matches a module's last name component, or (if it has regex characters) its full name."""
    last = name.rsplit(".", 1)[-1]
    for pattern in patterns:
        if _REGEX_CHARS & set(pattern):
            if re.fullmatch(pattern, name):
                return True
        elif last == pattern:
            return True
    return False


def neuroada_layers(model: nn.Module) -> dict[str, NeuroAdaLinear]:
    """Every NeuroAda layer by module name (the inject and PEFT faces build the same class)."""
    return {name: module for name, module in model.named_modules() if isinstance(module, NeuroAdaLinear)}


def saved_module_names(model: nn.Module, patterns: list[str]) -> list[str]:
    names = [name for name, _ in model.named_modules() if name and name_matches(name, patterns)]
    # keep outermost matches only (a head and its inner layers are one saved module)
    return [n for n in names if not any(n.startswith(other + ".") for other in names if other != n)]


def find_targets(model: nn.Module, config: NeuroAdaConfig) -> dict[str, nn.Linear]:
    """Target nn.Linear modules by name; every pattern must match something, every match must fit k."""
    saved = saved_module_names(model, config.modules_to_save)
    targets, used = {}, set()
    for name, module in model.named_modules():
        if not name or any(name == s or name.startswith(s + ".") for s in saved):
            continue  # layers inside a fully trained module (e.g. a head's dense) are not bypassed
        for pattern in config.target_modules:
            if name_matches(name, [pattern]):
                used.add(pattern)
                if isinstance(module, NeuroAdaLinear):
                    raise UserError(f"module {name!r} already has a NeuroAda adapter; inject once per model")
                if not isinstance(module, nn.Linear):
                    raise UserError(
                        f"target {pattern!r} matched {name!r}, a {type(module).__name__}, not nn.Linear; "
                        "name linear layers only"
                    )
                if module.in_features < config.k:
                    raise UserError(
                        f"neuroada k={config.k} exceeds the {module.in_features} inputs of layer {name!r}; "
                        f"use k <= {module.in_features} or leave that layer out of target_modules"
                    )
                targets[name] = module
    missing = [p for p in config.target_modules if p not in used]
    if missing:
        linear_names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise UserError(
            f"target_modules {missing} match no layer of this model; its linear layers are named {linear_names}"
        )
    return targets


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _gradient_scores(model: nn.Module, targets: dict[str, nn.Linear], batches, k: int) -> dict[str, torch.Tensor]:
    """Top-k columns by |dL/dW| summed over batches, without parameter gradients.

    Each target's dense gradient dY^T X is formed inside its own backward and folded at once: with one
    batch straight into the top-k, so at most one layer's gradient exists at a time; with several
    batches into a per-layer running sum (memory: one fp32 copy of the target weights).
    """
    batches = list(batches)
    if not batches:
        raise UserError("selection=gradient needs gradient_batches (a few training batches); none were given")
    single = len(batches) == 1
    result: dict[str, torch.Tensor] = {}
    sums: dict[str, torch.Tensor] = {}

    def fold(name: str, grad_w: torch.Tensor) -> None:
        if single:
            result[name] = selection.from_scores(grad_w, k)
        elif name in sums:
            sums[name] += grad_w
        else:
            sums[name] = grad_w.float()

    class Score(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, bias, anchor, name):
            ctx.save_for_backward(x, weight)
            ctx.name = name
            return F.linear(x, weight, bias)

        @staticmethod
        def backward(ctx, grad_out):
            x, weight = ctx.saved_tensors
            flat_grad = grad_out.reshape(-1, grad_out.shape[-1])
            fold(ctx.name, flat_grad.t().float() @ x.reshape(-1, x.shape[-1]).float())
            grad_x = (flat_grad @ weight.to(flat_grad.dtype)).view(*grad_out.shape[:-1], -1).to(x.dtype)
            return grad_x, None, None, None, None

    # The anchor makes every target's output require grad, so backward reaches the first layer even
    # though all parameters are frozen.
    anchor = torch.zeros((), requires_grad=True)
    originals = {}
    for name, module in targets.items():
        originals[name] = module.forward
        module.forward = (lambda m, n: (lambda x: Score.apply(x, m.weight, m.bias, anchor, n)))(module, name)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()  # no dropout: the score should not depend on a random mask
    try:
        for batch in batches:
            batch = {key: v.to(device) if torch.is_tensor(v) else v for key, v in batch.items()}
            output = model(**batch)
            loss = getattr(output, "loss", None)
            if loss is None:
                raise UserError("selection=gradient needs batches with labels so that the model returns a loss")
            loss.backward()
    finally:
        for name, module in targets.items():
            module.forward = originals[name]
        model.train(was_training)
    for name, total in sums.items():
        result[name] = selection.from_scores(total, k)
    return result


def _covered(idx: torch.Tensor, config: NeuroAdaConfig, name: str, d_in: int):
    """neuron_fraction < 1: keep the per-row cells of a seeded fraction of rows (general layout)."""
    rows = selection.covered_rows(idx.shape[0], config.neuron_fraction, config.seed, name)
    return selection.keep_rows(idx, rows, d_in)


def select(weights: dict[str, torch.Tensor], config: NeuroAdaConfig) -> dict:
    """Cells of every layer from its weight [d_out, d_in] (every rule but gradient, which needs batches).

    The one selection path (inject, the PEFT tuner, the quantized base). scope=neuron gives [d_out, k] columns
    (or, with neuron_fraction < 1, the covered rows' cells); layer and global scopes give (row_counts, cols)
    placed by raw score (see selection.cell_scores).
    """
    if config.scope == "neuron":
        chosen = {}
        for name, weight in weights.items():
            idx = selection.columns(config.selection, weight, config.k, config.seed, name)
            chosen[name] = idx if config.neuron_fraction >= 1 else _covered(idx, config, name, weight.shape[1])
        return chosen
    scored = {name: selection.cell_scores(config.selection, weight, config.seed, name)
              for name, weight in weights.items()}
    largest = config.selection != "reverse"
    if config.scope == "layer":
        return {name: selection.top_cells(scores, weights[name].shape[0] * config.k, largest)
                for name, (scores, _) in scored.items()}
    budget = sum(weight.shape[0] * config.k for weight in weights.values())
    return selection.top_cells_global({name: scores for name, (scores, _) in scored.items()}, budget, largest)


def selection_weights(targets: dict[str, nn.Module], weights: dict[str, torch.Tensor] | None) -> dict:
    """The weight each layer is selected on: the given full-precision one, else its own (dequantized) weight."""
    weights = weights or {}
    return {name: check_weight_shape(weights[name], module, name).detach() if name in weights
            else (dequantized_weight(module) if is_quantized(module) else module.weight.detach())
            for name, module in targets.items()}


def cell_values(weight: torch.Tensor, cells) -> torch.Tensor:
    """The values of ``weight`` at the cells (either layout): the original values an adapter carries."""
    if isinstance(cells, (tuple, list)):
        counts, cols = (torch.as_tensor(t).long().to(weight.device) for t in cells)
        rows = torch.repeat_interleave(torch.arange(weight.shape[0], device=weight.device), counts)
        return weight[rows, cols]
    return weight.gather(1, cells.long().to(weight.device))


def compact_input_layers(targets: dict[str, nn.Linear], chosen: dict[str, torch.Tensor]) -> set[str]:
    """Layers that should keep only their selected input columns for backward (see NeuroAdaLinear).

    Layers of one parent with the same input width usually read the same tensor (q/k/v, gate/up), which
    a full save shares among them; separate column copies pay off only if, together, they are small. So
    a group compacts when its layers' selected columns add up to at most COMPACT_INPUT_FRACTION of d_in.
    """
    groups: dict[tuple[str, int], list[str]] = {}
    for name, module in targets.items():
        groups.setdefault((name.rpartition(".")[0], module.in_features), []).append(name)
    compact = set()
    for (_, d_in), names in groups.items():
        columns = [chosen[n][1] if isinstance(chosen[n], tuple) else chosen[n] for n in names]
        if any(c.is_meta for c in columns):
            continue  # meta models (parameter counting) have no values to compact
        width = sum(torch.unique(c).numel() for c in columns)
        if width <= COMPACT_INPUT_FRACTION * d_in:
            compact.update(names)
    return compact


def inject(
    model: nn.Module,
    config: NeuroAdaConfig,
    gradient_batches=None,
    *,
    indices: dict[str, torch.Tensor] | None = None,
    weights: dict[str, torch.Tensor] | None = None,
) -> nn.Module:
    """Freeze ``model`` and wrap every target linear layer in a NeuroAdaLinear; returns the same model.

    ``indices`` (layer name -> [d_out, k] columns, or (row_counts, cols) cells) skips selection; load_adapter
    uses it. ``weights`` (layer name -> full-precision W, e.g. read before quantizing): selection runs on them
    and, in the unmerged mode, the original cell values (fingerprint, merge target) come from them. A
    quantized layer without one is selected on its dequantized weight (ties -> lower column).
    """
    targets = find_targets(model, config)
    for param in model.parameters():
        param.requires_grad_(False)
    unknown = sorted(set(weights or {}) - set(targets))
    if unknown:
        raise UserError(f"weights were given for {unknown[0]!r}, which is not a target layer of this model; "
                        "pass weights keyed by the target layers' module names")
    modes = {name: config.layer_mode(is_quantized(module)) for name, module in targets.items()}
    if indices is None and config.selection == "gradient":
        if any(is_quantized(module) for module in targets.values()):
            raise UserError("neuroada selection=gradient is not available on a quantized base; "
                            "use selection=magnitude (chosen on the full-precision weights)")
        indices = _gradient_scores(model, targets, gradient_batches or [], config.k)
        if config.neuron_fraction < 1:
            indices = {name: _covered(idx, config, name, targets[name].in_features) for name, idx in indices.items()}
    given = dict(indices) if indices is not None else {}
    if config.scope == "global" and indices is None:  # one budget over all layers: every weight at once
        given = select(selection_weights(targets, weights), config)
    missing = [name for name in targets if indices is not None and name not in given]
    if missing:
        raise UserError(f"the adapter has no indices for layer {missing[0]!r}; it was made for another model")
    chosen, origs = {}, {}
    for name, module in targets.items():  # layer by layer: one dequantized copy at a time on a quantized base
        source = None
        if name not in given or (modes[name] == "unmerged" and (weights or is_quantized(module))):
            source = selection_weights({name: module}, {name: weights[name]} if name in (weights or {}) else None)
            source = source[name]
        chosen[name] = given[name] if name in given else select({name: source}, config)[name]
        if modes[name] == "unmerged" and source is not None:
            origs[name] = cell_values(source, chosen[name])
    compact = compact_input_layers(targets, chosen)
    for name, module in targets.items():
        _replace(model, name, NeuroAdaLinear(module, chosen[name], impl=config.impl, mode=modes[name],
                                             train_bias=config.train_bias, compact_input=name in compact,
                                             orig=origs.get(name)))
    for saved in saved_module_names(model, config.modules_to_save):
        for param in model.get_submodule(saved).parameters():
            param.requires_grad_(True)
    if config.modules_to_save and not saved_module_names(model, config.modules_to_save):
        raise UserError(f"modules_to_save {config.modules_to_save} match no module of this model")
    model.neuroada_config = config
    return model


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Inside: every NeuroAda layer (either face, either mode, any adapter) computes its base's forward bitwise
    and writes no cells; on exit everything is as before (merged-in-place cells come back at the next forward,
    merged layers at exit). One cell write per layer each way: cheap enough per micro-batch (preference tuning's
    reference pass). A model without NeuroAda layers: a no-op."""
    layers = list(neuroada_layers(model).values())
    before = [layer._disable_adapters for layer in layers]
    for layer in layers:
        layer._disable_adapters = True
        if not layer.quantized:
            layer.restore_cells()
    try:
        yield model
    finally:
        for layer, was_disabled in zip(layers, before):
            layer._disable_adapters = was_disabled
            if layer.merged and not was_disabled:
                layer._show(layer.merged_adapters[0])


def merge(model: nn.Module) -> nn.Module:
    """Bake every delta into its base weight (orig + delta in fp32, rounded once); forward = plain linear."""
    for layer in neuroada_layers(model).values():
        layer.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Restore the base weights bitwise at the selected cells; the deltas are applied again (no-op if unmerged)."""
    for layer in neuroada_layers(model).values():
        layer.unmerge()
    return model


def unload(model: nn.Module) -> nn.Module:
    """Merge and replace every NeuroAda layer by its plain nn.Linear: a standard model, zero overhead."""
    for name, layer in neuroada_layers(model).items():
        layer.merge()
        _replace(model, name, layer.base_layer)
    if hasattr(model, "neuroada_config"):
        del model.neuroada_config
    return model


def set_impl(model: nn.Module, impl: str) -> nn.Module:
    NeuroAdaConfig(impl=impl)  # validates the name
    for layer in neuroada_layers(model).values():
        layer.set_impl(impl)
    return model


@dataclass
class ParameterCount:
    """Counted the way the paper does: percent = 100 * trainable / the base model's own parameters."""

    trainable: int
    total: int
    bypass: int
    bias: int
    head: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def as_dict(self) -> dict:
        return {"trainable": self.trainable, "total": self.total, "percent": self.percent,
                "bypass": self.bypass, "bias": self.bias, "head": self.head}


def count_parameters(model: nn.Module) -> ParameterCount:
    layers = neuroada_layers(model)
    delta_ids = {id(delta) for layer in layers.values() for delta in layer.neuroada_delta.values()}
    bias_ids = {id(layer.base_layer.bias) for layer in layers.values() if layer.base_layer.bias is not None}
    config = getattr(model, "neuroada_config", None)
    head_ids = set()
    if config is not None:
        for saved in saved_module_names(model, config.modules_to_save):
            head_ids |= {id(p) for p in model.get_submodule(saved).parameters()}
    # Sharded layers hold their selected columns and original cells as frozen parameters (see
    # NeuroAdaLinear.cells_as_parameters): bookkeeping, not model parameters.
    cell_ids = {id(t) for layer in layers.values() for t in (layer.neuroada_idx, layer.neuroada_orig)}
    total = trainable = bypass = bias = head = 0
    for param in model.parameters():  # parameters() yields each shared tensor once
        if id(param) in cell_ids:
            continue
        n = param.numel()
        if id(param) not in delta_ids:
            total += n
        if not param.requires_grad:
            continue
        trainable += n
        if id(param) in delta_ids:
            bypass += n
        elif id(param) in head_ids:
            head += n
        elif id(param) in bias_ids:
            bias += n
    return ParameterCount(trainable=trainable, total=total, bypass=bypass, bias=bias, head=head)
