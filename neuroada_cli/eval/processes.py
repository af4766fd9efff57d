"""Where evaluation runs: the accelerator's device, and the processes of an ``accelerate launch`` sharing the work.

``neuroada eval`` under ``accelerate launch --num_processes N`` (or torchrun) gives every process a strided share
of each task's examples (positions r, r + N, r + 2N, ...: every share holds long and short prompts alike),
gathers the records to process 0 and puts them back in the original order; only process 0 writes files. One
process (no launcher) is the same code with N = 1. The device is accelerate's: ``cuda:LOCAL_RANK`` when CUDA is
present, else the CPU (gloo between processes).

Placement: the model is loaded on the CPU and moved here after loading (``place``), in the dtype it was loaded in
(``model.dtype``). A bitsandbytes-quantized model is placed on its device at load (models/loading.py) and is never
moved: bitsandbytes refuses or re-quantizes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence


@dataclass(frozen=True)
class Processes:
    """This process's place in the launch: ``rank`` of ``world``, its ``device``, and the two collectives eval needs.

    ``gather(obj)`` returns every process's object in rank order (on every process); ``broadcast(obj)`` returns
    process 0's object. With one process both are the identity.
    """

    rank: int = 0
    world: int = 1
    device: Any = "cpu"
    gather: Callable[[Any], list] = field(default=lambda obj: [obj])
    broadcast: Callable[[Any], Any] = field(default=lambda obj: obj)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, count: int) -> list[int]:
        """The positions (0 .. count-1) this process evaluates."""
        return list(range(self.rank, count, self.world))

    def merge(self, count: int, shares: Sequence[Sequence[Any]]) -> list:
        """Every process's results (``shares`` in rank order, each in its own positions' order) in input order."""
        merged: list = [None] * count
        for rank, results in enumerate(shares):
            positions = range(rank, count, self.world)
            if len(results) != len(positions):
                raise RuntimeError(f"process {rank} returned {len(results)} results for {len(positions)} examples")
            for position, result in zip(positions, results):
                merged[position] = result
        return merged


def current_processes() -> Processes:
    """The launch this process belongs to (a single process when started without a launcher).

    Uses accelerate's ``PartialState`` (created by the trainer's Accelerator when eval runs after training), with
    ``cpu=True`` when there is no CUDA so that a ``--multi_gpu`` launch on a CPU machine becomes gloo.
    """
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    if state.num_processes == 1:
        return Processes(device=state.device)

    def gather(obj):
        import torch.distributed as dist

        gathered = [None] * state.num_processes
        dist.all_gather_object(gathered, obj)
        return gathered

    def broadcast(obj):
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    return Processes(rank=state.process_index, world=state.num_processes, device=state.device,
                     gather=gather, broadcast=broadcast)


def place(model, device):
    """``model`` on ``device`` (every parameter and buffer), its dtype unchanged; quantized models stay put."""
    import torch

    from ..models import is_quantized

    device = torch.device(device)
    if is_quantized(model):
        return model
    if any(tensor.device != device for tensor in _tensors(model)):
        model.to(device)
    return model


def _tensors(model):
    yield from model.parameters()
    yield from model.buffers()


def devices_of(model) -> set[str]:
    """The device types holding the model's parameters and buffers (tests assert {"cuda"})."""
    return {tensor.device.type for tensor in _tensors(model)}
