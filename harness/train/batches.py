"""What keeps DDP ranks in step: equal batch counts per rank, epoch means over all ranks, and
the end-of-training check that every rank holds the same weights."""
from __future__ import annotations

import math
from typing import Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn


def epoch_steps(counts: list[int], per_rank_batch: int, drop_last: bool = False) -> tuple[int, list[int]]:
    """(steps per epoch, samples each rank uses) for ranks holding `counts` samples.

    Default: ceil(largest count / batch) steps and every sample once (smaller batches on the
    smaller ranks). `drop_last` (torch's DataLoader(drop_last=True), as CausalAdv's and ADML's
    official loaders): floor(smallest count / batch) full batches; the rest of each rank's
    shuffled epoch is left out, other samples each epoch."""
    if drop_last:
        steps = min(counts) // per_rank_batch
        if steps < 1:
            raise ValueError(f"trainer.drop_last: a rank holds {min(counts)} samples, fewer than one batch of "
                             f"{per_rank_batch}; lower trainer.batch_size or set trainer.drop_last=false")
        return steps, [steps * per_rank_batch] * len(counts)
    steps = max(1, math.ceil(max(counts) / per_rank_batch))
    if min(counts) < steps:
        raise ValueError(f"too few training samples per rank ({min(counts)}) for {steps} steps; "
                         f"lower trainer.world_size or trainer.batch_size")
    return steps, list(counts)


def even_batches(loader: Iterable, n_samples: int, n_batches: int,
                 drop: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Re-cut a rank's stream of batches into exactly `n_batches` batches of near-equal size.

    Every rank then runs the same number of DDP steps (no rank waits on another that ran out),
    while every sample of the epoch is still used exactly once; with `drop` the stream's last
    `drop` samples are left out (`epoch_steps(drop_last=True)`).
    """
    sizes = [n_samples // n_batches + (1 if i < n_samples % n_batches else 0) for i in range(n_batches)]
    buf_x: list[torch.Tensor] = []
    buf_y: list[torch.Tensor] = []
    buffered = 0
    it = iter(loader)
    for size in sizes:
        while buffered < size:
            x, y = next(it)[:2]
            buf_x.append(x)
            buf_y.append(y)
            buffered += y.shape[0]
        xs, ys = torch.cat(buf_x), torch.cat(buf_y)
        yield xs[:size], ys[:size]
        buf_x, buf_y = [xs[size:]], [ys[size:]]
        buffered -= size
    leftover = buffered + sum(int(batch[1].shape[0]) for batch in it)
    if leftover != drop:
        raise RuntimeError(f"data loader gave {n_samples + leftover} samples where {n_samples} + {drop} dropped "
                           f"were planned for this rank")


def reduce_epoch(sums: dict[str, float], seen: int, device: torch.device) -> dict[str, float]:
    """Sample-weighted means of the logged terms over all ranks, plus the epoch's sample count."""
    names = sorted(sums)
    tensor = torch.tensor([sums[n] for n in names] + [float(seen)], dtype=torch.float64,
                          device=device if device.type == "cuda" else "cpu")
    dist.all_reduce(tensor)
    total = tensor[-1].item()
    stats = {n: tensor[i].item() / max(total, 1.0) for i, n in enumerate(names)}
    stats["samples"] = total
    return stats


def replicas_in_sync(module: nn.Module) -> bool:
    """All ranks hold bitwise-equal parameters (what DDP promises); checked once at the end."""
    with torch.no_grad():
        flat = torch.cat([p.detach().double().flatten() for p in module.parameters()])
        probe = torch.stack([flat.sum(), (flat * torch.arange(flat.numel(), dtype=flat.dtype,
                                                               device=flat.device)).sum()])
        gathered = [torch.zeros_like(probe) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, probe)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def sync_buffers(module: nn.Module) -> None:
    """Every rank takes rank 0's buffers (BatchNorm running statistics), as a resumed run does
    from rank 0's checkpoint. DDP broadcasts them before each forward through its wrapper, but a
    train-mode forward then updates each rank's copy with its own batch, and train-time attacks
    run in eval mode on the unwrapped model with those per-rank statistics: called at every
    epoch start, this makes an uninterrupted epoch start where a resumed one does."""
    if dist.get_world_size() == 1:
        return
    for buffer in module.buffers():
        dist.broadcast(buffer.data, src=0)
