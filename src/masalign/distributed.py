"""Data-parallel fitting under ``torchrun``: the few collective operations :func:`masalign.fit` needs.

When ``torch.distributed`` is initialised (gloo on CPU, nccl on GPU), every process
holds the whole dataset and the same alignment, draws the same global batch (same
seed) and runs the models on its share of the rows only (:func:`shard`). One
process on the same global batch is reproduced exactly, up to float rounding:

* the interchange loss is a mean over the label tokens of the *global* batch, so
  each process divides its summed token loss by the global count
  (:func:`loss_share`), and the gradients are then *summed* over processes
  (:func:`all_reduce_gradients`), not averaged: the sum of the shares is the mean;
* validation counts (correct trials, label tokens, loss sums) are summed over
  processes (:func:`all_reduce_sum`), so every process sees the single-process
  scores and makes the same early-stopping decision; a process that decided
  differently would wait forever in the next collective.

Without an initialised process group (or with one process) every helper is a
no-op and the results are bit-identical to a plain fit.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .data import IGNORE_INDEX
from .objectives import _check_label_shape, intervention_loss


def world_size() -> int:
    """The number of processes fitting together; 1 without an initialised process group."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank; 0 without an initialised process group."""
    return dist.get_rank() if world_size() > 1 else 0


def is_main() -> bool:
    """Whether this process prints (progress bars) and, by convention, saves."""
    return rank() == 0


def shard(index: Tensor) -> Tensor:
    """This process's rows of a global batch: every ``world_size``-th, from its rank.

    Strided rather than contiguous so that the shares differ in size by at most one
    row (the global batch need not divide evenly); may be empty when the batch has
    fewer rows than there are processes.
    """
    size = world_size()
    return index if size == 1 else index[rank() :: size]


def loss_share(logits: Tensor, labels: Tensor, batch_labels: Tensor) -> Tensor:
    """This process's share of the global batch's mean label-token cross-entropy.

    ``logits`` and ``labels`` are this process's rows; ``batch_labels`` the labels of
    the whole global batch (every process holds the dataset, so the global count of
    label tokens needs no communication). Summed over processes this is exactly
    :func:`masalign.objectives.intervention_loss` of the whole batch; a per-process
    mean, averaged, would weight rows with few label tokens wrongly.
    """
    if world_size() == 1:
        return intervention_loss(logits, labels)
    _check_label_shape(logits, labels)
    total = nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    return total / int((batch_labels != IGNORE_INDEX).sum())


def _device() -> torch.device:
    # nccl reduces CUDA tensors only; gloo reduces CPU tensors.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: Sequence[float]) -> list[float]:
    """``values`` summed over processes, in float64 (counts stay exact up to 2**53)."""
    if world_size() == 1:
        return list(values)
    buffer = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_device())
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
    return buffer.tolist()


def all_reduce_gradients(parameters: Iterable[nn.Parameter]) -> None:
    """Sum each parameter's gradient over processes, in place (one collective per dtype).

    A gradient that is ``None`` on every process stays ``None`` (Adam skips such a
    parameter, and a zero gradient would still move it through its momentum); one
    that is ``None`` on some processes only (a process with no rows in the batch)
    counts as zero there.
    """
    if world_size() == 1:
        return
    parameters = [p for p in parameters if p.requires_grad]
    device = _device()
    present = torch.tensor([p.grad is not None for p in parameters], dtype=torch.float64, device=device)
    dist.all_reduce(present, op=dist.ReduceOp.MAX)
    used = [p for p, flag in zip(parameters, present.tolist(), strict=True) if flag]
    for p in used:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    for dtype in sorted({p.grad.dtype for p in used}, key=str):
        group = [p for p in used if p.grad.dtype == dtype]
        flat = torch.cat([p.grad.reshape(-1).to(device) for p in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        for p, part in zip(group, flat.split([p.numel() for p in group]), strict=True):
            p.grad.copy_(part.view_as(p.grad))


@torch.no_grad()
def broadcast_state(module: nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every process, so that all start alike
    even when a process built its alignment with another seed or standardisation."""
    if world_size() == 1:
        return
    device = _device()
    for tensor in list(module.parameters()) + list(module.buffers()):
        buffer = tensor.detach().to(device).clone()
        dist.broadcast(buffer, src=0)
        tensor.copy_(buffer)
