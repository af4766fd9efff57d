"""``trainer.strategy=fsdp``: FSDP2 (``torch.distributed.fsdp.fully_shard``, on whatever backend the launcher set
up: gloo on CPU, NCCL on GPU) shards every decoder block and then the root along dim 0, so each process keeps 1/N of every parameter between uses and gathers one block at a time for its forward and backward.

NeuroAda under FSDP2. W [d_out, d_in], its delta [d_out, k], its selected columns and its original cells
[d_out, k] are all parameters of the layer (the last two frozen, see ``NeuroAdaLinear.cells_as_parameters``),
so FSDP2 splits them along rows together: process r holds the same rows of all four. The columns are gathered
with W (the backward forms the delta gradient of all rows from this process's tokens; FSDP2 reduce-scatters
it to the owners); the merged-in-place write after an optimizer step touches only the local rows of the
sharded W (``sync_cells``, from a hook that runs before FSDP2's own pre-forward gathers anything).
Mixed precision: FSDP2 requires one dtype among the TRAINABLE parameters of a group, which the fp32 deltas
are; a bf16 base (``model.dtype=bfloat16``) needs no casting at all (each parameter is gathered in its own
dtype), and gradients are reduced in fp32.

Lean loading (``lean_load``): every process builds the (attached) model on the meta device, shards it, and
allocates only its shards; process 0, the only one that read the checkpoint, broadcasts it, each process
keeping its rows (``set_model_state_dict(..., full_state_dict=True, broadcast_from_rank0=True)``).
Saving: ``full_trainable_view`` gathers the trainable tensors (and NeuroAda's columns and cells) so that the
method's ordinary save runs on process 0; ``optimizer_state`` / ``load_optimizer_state`` gather the optimizer
state to process 0 (it covers the trainable parameters only: small) and scatter it back on resume.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import nn

from ..errors import UserError

# What fsdp can shard: methods whose trainable tensors split by rows with their layer (full fine-tuning would
# gather whole models to save; the head alone buys nothing from sharding).
SHARDABLE_METHODS = ("neuroada", "lora")


class FsdpStrategy:
    """FSDP2: every process holds 1/N of each parameter; forwards, gathers and saves involve every process."""

    name = "fsdp"
    collective = True

    def check(self, cfg, world_size: int) -> None:
        if world_size < 2:
            raise UserError("trainer.strategy=fsdp needs at least 2 processes (accelerate launch --num_processes N "
                            "-m neuroada_cli train ...); with one process use trainer.strategy=ddp")
        if cfg.method not in SHARDABLE_METHODS:
            raise UserError(f"trainer.strategy=fsdp does not support method={cfg.method} (saving would gather the "
                            "whole model on every process); use trainer.strategy=ddp or method=neuroada / lora")
        n = cfg.neuroada
        if cfg.method == "neuroada" and (n.scope != "neuron" or n.neuron_fraction < 1):
            ablation = f"neuroada.scope={n.scope}" if n.scope != "neuron" else f"neuroada.neuron_fraction={n.neuron_fraction:g}"
            raise UserError(f"trainer.strategy=fsdp shards NeuroAda's k cells per row only, not the uneven cells of "
                            f"{ablation} (an ablation); use trainer.strategy=ddp, or neuroada.scope=neuron "
                            "neuroada.neuron_fraction=1")
        if cfg.model.quantization is not None:  # the quant engineer's wording (methods.QUANTIZED_FSDP_REFUSAL)
            from ..methods import QUANTIZED_FSDP_REFUSAL

            raise UserError(QUANTIZED_FSDP_REFUSAL.format(quantization=cfg.model.quantization))

    def load(self, accelerator, load: Callable[..., tuple]) -> tuple:
        """Only process 0 reads the weights (first: it may convert a GGUF once); the others build on meta."""
        if not accelerator.is_main_process:
            accelerator.wait_for_everyone()  # process 0 loads (and caches) first
            return load(empty=True)
        loaded = load(empty=False)
        accelerator.wait_for_everyone()
        return loaded

    def shard(self, model: nn.Module, build_structure: Callable[[], nn.Module], accelerator) -> nn.Module:
        """Every process shards a meta-device copy of the attached model; process 0's real one fills it (lean)."""
        if accelerator.is_main_process:
            structure, full = build_structure(), model
        else:
            structure, full = model, None
        return lean_load(structure, full, accelerator.device)

    def prepare(self, accelerator, model: nn.Module, optimizer):
        """accelerate adds autocast only (it must not wrap the shards in DDP); the optimizer state that
        checkpoints save is gathered to process 0 and scattered back."""
        model = accelerator.prepare_model(model, device_placement=False, evaluation_mode=True)
        optimizer = accelerator.prepare_optimizer(optimizer)
        return model, optimizer, ShardedOptimizerState(model, optimizer)

    def accumulating(self, accelerator, model: nn.Module, last: bool):
        """FSDP2's requires_gradient_sync: reduce-scatter only on the ``last`` micro-batch."""
        return gradient_sync(model, last)

    def gathered(self, model: nn.Module):
        """Trainable tensors whole on every process (collective), so that the method's save runs unchanged."""
        return full_trainable_view(model)


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks to shard one by one: transformers' ``_no_split_modules`` classes, outermost first."""
    names = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:  # no hint: the children of the longest ModuleList (the layer stack)
        stacks = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
        blocks = list(max(stacks, key=len)) if stacks else []
    inside = {id(sub) for block in blocks for sub in block.modules() if sub is not block}
    return [block for block in blocks if id(block) not in inside]


def _untied_embeddings(model: nn.Module) -> list[nn.Module]:
    """Input and output embeddings as groups of their own (unless tied): the root then gathers only its norm.

    Otherwise the root group holds both vocabulary matrices, and gathering them at once is the largest
    transient of a step (2 x vocab x hidden, more than a decoder block for small models).
    """
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    if get_in is None or get_out is None:
        return []
    embeddings = [m for m in (get_in(), get_out()) if isinstance(m, nn.Module)]
    weights = [getattr(m, "weight", None) for m in embeddings]
    if len(embeddings) == 2 and weights[0] is weights[1]:
        return []  # tied: one parameter in two modules stays in the root group
    return embeddings


def prepare_for_sharding(model: nn.Module) -> nn.Module:
    """Give NeuroAda layers row-shardable columns and cells; call on EVERY copy whose state dict is exchanged."""
    from ..core.model import neuroada_layers

    for layer in neuroada_layers(model).values():
        layer.cells_as_parameters()
    return model


def mixed_precision_policy(param_dtype: torch.dtype | None = None):
    """FSDP2 policy: gather in ``param_dtype`` (None = each parameter's own dtype), reduce gradients in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)


def shard_model(model: nn.Module, *, param_dtype: torch.dtype | None = None,
                reshard_after_forward: bool = True) -> nn.Module:
    """FSDP2 on each decoder block, then the root; NeuroAda layers switch to local-row writes. Same object back."""
    from torch.distributed.fsdp import fully_shard

    from ..core.model import neuroada_layers

    prepare_for_sharding(model)
    policy = mixed_precision_policy(param_dtype)
    for block in decoder_blocks(model) + _untied_embeddings(model):
        fully_shard(block, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    layers = list(neuroada_layers(model).values())
    for layer in layers:
        layer.sharded = True
    if layers:
        def sync_local_rows(module, args, kwargs):  # runs before FSDP2's pre-forward: W is still sharded
            for layer in layers:
                layer.sync_cells()

        # prepend: ahead of FSDP2's own pre-forward hook (registered with prepend=True by fully_shard)
        model.register_forward_pre_hook(sync_local_rows, prepend=True, with_kwargs=True)
    return model


def lean_load(model: nn.Module, full_model: nn.Module | None, device: torch.device | str, *,
              param_dtype: torch.dtype | None = None) -> nn.Module:
    """Shard ``model`` (built on the meta device, attached like ``full_model``), fill it from process 0.

    ``full_model``: on process 0 the attached model holding the real values (CPU is fine), None elsewhere.
    Only process 0 ever holds a full copy; the others allocate just their shards.
    """
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    rank = dist.get_rank()
    if (full_model is None) != (rank != 0):
        raise ValueError("lean_load: pass full_model on process 0 and None on the others")
    full_state, full_buffers = {}, {}
    if full_model is not None:
        prepare_for_sharding(full_model)
        full_state = full_model.state_dict()  # fused NeuroAda: W's cells hold orig + delta (synced on the way)
        full_buffers = dict(full_model.named_buffers())
    shard_model(model, param_dtype=param_dtype)
    model.to_empty(device=device)
    set_model_state_dict(model, full_state,
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    # Buffers are not sharded and may be non-persistent (rotary inv_freq): copy them from process 0.
    for name, buffer in model.named_buffers():
        if rank == 0:
            buffer.copy_(full_buffers[name].to(buffer.device))
        dist.broadcast(buffer, src=0)
    return model


def local_parameter_bytes(model: nn.Module) -> int:
    """Bytes of parameters this process holds (its shards under fsdp)."""
    from ..core.layer import local_tensor

    return sum(local_tensor(p).numel() * p.element_size() for p in model.parameters())


def _gathered_names(module: nn.Module) -> list[str]:
    from ..core.layer import NeuroAdaLinear

    cells = ("neuroada_idx", "neuroada_orig") if isinstance(module, NeuroAdaLinear) else ()
    return [name for name, p in module._parameters.items()
            if p is not None and (p.requires_grad or name in cells)]


@contextlib.contextmanager
def full_trainable_view(model: nn.Module) -> Iterator[nn.Module]:
    """Inside: trainable parameters and NeuroAda columns/cells are whole tensors on every process (collective).

    So that ``method.save(model, ...)`` (save_adapter, PEFT's save_pretrained) runs unchanged on process 0.
    Frozen base weights stay sharded. Every process must enter; do not run forward inside.
    """
    from ..core.layer import DTensor

    swapped = []
    for module in model.modules():
        for name in _gathered_names(module):
            param = module._parameters[name]
            if isinstance(param, DTensor):
                full = nn.Parameter(param.full_tensor(), requires_grad=param.requires_grad)
                module._parameters[name] = full
                swapped.append((module, name, param))
    try:
        yield model
    finally:
        for module, name, param in swapped:
            module._parameters[name] = param


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The whole optimizer state on process 0 (keys = parameter names, tensors on CPU); {} elsewhere. Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, _plain(optimizer),
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict | None) -> None:
    """Inverse of ``optimizer_state``: process 0 passes what it saved, the others None; each keeps its rows."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, _plain(optimizer), state or {},
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def _plain(optimizer):
    """The torch optimizer under accelerate's AcceleratedOptimizer wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """fsdp's ``no_sync``: skip the reduce-scatter on accumulation micro-batches (gradients stay unsharded)."""
    if enabled or not hasattr(model, "set_requires_gradient_sync"):
        yield
        return
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


class ShardedOptimizerState:
    """What checkpoints save and restore of a sharded optimizer: ``state_dict`` / ``load_state_dict`` with the
    whole state gathered to process 0 and scattered back (both collective: every process calls them)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict:
        return optimizer_state(self.model, self.optimizer)

    def load_state_dict(self, state: dict) -> None:
        load_optimizer_state(self.model, self.optimizer, state)
