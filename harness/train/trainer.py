"""One DDP trainer for every method.

The loop knows nothing about any one method: it builds the classifier, lets the method `build`
on it, wraps the result in DistributedDataParallel (gloo on CPU, NCCL on GPU; world size 1 is
still DDP, so the single-process path is the multi-process path), and calls
`method.training_step` per batch. It owns the optimiser, the per-step LR schedule, one
checkpoint per epoch (resume continues from the last finished epoch), the speed options
(`trainer.precision=bf16` autocast, `channels_last`, `compile`: CPU and CUDA alike; pinned memory
and prefetch on CUDA), and the cell's wall time, images/s, FLOPs and peak memory.

World size > 1 on one machine spawns processes with torch.multiprocessing; every rank sees a
disjoint part of each epoch (harness/data/loader.py) and runs the same number of batches, so
DDP never waits on a rank that ran out of data.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from architectures.presets import build_classifier
from harness.backdoor.plan import train_plan
from harness.data.loader import make_loader, split_count
from harness.data.shards import load_manifest
from harness.core.device import autocast, check_precision, device_name
from harness.core.progress import progress_bar
from harness.eval.cost import count_flops, flops_per_image, peak_memory_bytes, reset_peak_memory
from harness.train.compile import FIX as COMPILE_FIX, check_compile, compile_backend, compile_classifier
from harness.train.device import cell_device
from harness.train.schedule import lr_factor
from methods.base import Method, TrainContext, build_method

from harness.store import checkpoint_sync
from harness.store.checkpoints import load_checkpoint, save_checkpoint
from harness.store.checkpoint_sync import CHECKPOINT, SUMMARY  # noqa: F401  (names shared with the store sync)


class NonFiniteLossError(RuntimeError):
    """A method produced a NaN/inf loss: the cell is recorded as failed, the grid goes on."""


@dataclass
class TrainSummary:
    epochs: int
    world_size: int
    n_train: int
    train_seconds: float
    images_per_second: float
    final_train_loss: float
    samples_per_epoch: list[int] = field(default_factory=list)
    replicas_in_sync: bool = True
    device: str = "cpu"
    precision: str = "fp32"
    curve: list[dict[str, float]] = field(default_factory=list)
    device_name: str | None = None
    flops_per_image: float | None = None  # forward pass, FlopCounterMode
    train_flops: float | None = None  # FLOPs of the first step per image (attack included) x images seen
    peak_memory_bytes: int | None = None  # rank 0
    compile: str | None = None  # torch.compile backend, None: eager


def check_trainer_config(tcfg: dict[str, Any]) -> None:
    """Fail before any work on trainer settings that could only fail later, inside a cell."""
    world_size, epochs, batch = (int(tcfg.get(k, 1)) for k in ("world_size", "epochs", "batch_size"))
    if world_size < 1 or epochs < 1 or batch < 1:
        raise ValueError(f"trainer.world_size, trainer.epochs and trainer.batch_size must be >= 1; "
                         f"got {world_size}, {epochs}, {batch}")
    if batch < world_size:
        raise ValueError(f"trainer.batch_size ({batch}) is the global batch: it must be >= "
                         f"trainer.world_size ({world_size})")
    if tcfg.get("precision", "fp32") not in ("fp32", "bf16"):
        raise ValueError(f"trainer.precision must be fp32 or bf16, got {tcfg.get('precision')!r}")
    compile_backend(tcfg.get("compile", False))
    _optimizer(tcfg["optimizer"], [{"params": [torch.zeros(1, requires_grad=True)]}])
    lr_factor(tcfg["schedule"], 0.0, epochs)


def train(cfg: dict[str, Any], work_dir: Path) -> TrainSummary:
    """Train the cell described by the resolved config `cfg`; checkpoints live in `work_dir`.

    Returns the summary; the final weights are in `work_dir/checkpoint.pt`.
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_sync.pull(cfg, work_dir)  # resume from the store's last epoch if it is newer (another node)
    world_size = int(cfg["trainer"].get("world_size", 1))
    store_dir = Path(tempfile.mkdtemp(prefix="rg-store-", dir=work_dir))
    store_file = str(store_dir / "store")
    try:
        if world_size == 1:
            _train_rank(0, 1, cfg, str(work_dir), store_file)
        else:
            mp.start_processes(_train_rank, args=(world_size, cfg, str(work_dir), store_file),
                               nprocs=world_size, start_method="spawn", join=True)
    except mp.ProcessRaisedException as err:
        if "NonFiniteLossError" in str(err):
            raise NonFiniteLossError(str(err).strip().splitlines()[-1]) from None
        raise
    finally:
        for leftover in store_dir.glob("*"):
            leftover.unlink(missing_ok=True)
        store_dir.rmdir()
    return TrainSummary(**json.loads((work_dir / SUMMARY).read_text()))


# --------------------------------------------------------------------------- one rank


def _train_rank(rank: int, world_size: int, cfg: dict[str, Any], work_dir_s: str, store_file: str) -> None:
    work_dir = Path(work_dir_s)
    device = _rank_setup(cfg, rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.FileStore(store_file, world_size),
                            rank=rank, world_size=world_size)
    try:
        _fit_and_write_summary(rank, world_size, cfg, work_dir, device)
    finally:
        dist.destroy_process_group()


def train_in_process_group(cfg: dict[str, Any], work_dir: Path) -> None:
    """Train one rank inside a process group someone else set up (Ray Train's TorchTrainer workers).

    Every rank pulls the store's checkpoint first, so a restarted worker group resumes from the
    last epoch; rank 0 writes and pushes the summary.
    """
    rank, world_size = dist.get_rank(), dist.get_world_size()
    device = _rank_setup(cfg, int(os.environ.get("LOCAL_RANK", rank)))
    work_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_sync.pull(cfg, work_dir)
    dist.barrier()
    _fit_and_write_summary(rank, world_size, cfg, work_dir, device)


def _rank_setup(cfg: dict[str, Any], local_rank: int) -> torch.device:
    """Per-process setup of one DDP rank: its device, its CPU threads, a quiet log."""
    # Tiny 1x1 / single-channel convs make DDP warn that grad strides differ from its buckets:
    # a copy per step, harmless at that size; keep it out of every cell's log.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    torch.set_num_threads(int(cfg["trainer"].get("threads_per_rank") or 1))
    device = cell_device(cfg, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def _fit_and_write_summary(rank: int, world_size: int, cfg: dict[str, Any], work_dir: Path,
                           device: torch.device) -> None:
    summary = _fit(rank, world_size, cfg, work_dir, device)
    if rank == 0:
        _atomic_write_text(work_dir / SUMMARY, json.dumps(asdict(summary)))
        checkpoint_sync.push_summary(cfg, work_dir)


def _fit(rank: int, world_size: int, cfg: dict[str, Any], work_dir: Path, device: torch.device) -> TrainSummary:
    tcfg, dcfg = cfg["trainer"], cfg["data"]
    dataset_dir = Path(dcfg["dir"])
    manifest = load_manifest(dataset_dir)
    use_cuda = device.type == "cuda"
    precision = str(tcfg.get("precision", "fp32"))
    check_precision(precision, device)
    channels_last = bool(tcfg.get("channels_last", False))
    backend = compile_backend(tcfg.get("compile", False))
    if backend is not None:
        check_compile(backend, device)  # before any data is read or any step runs

    torch.manual_seed(int(cfg["seed"]))  # identical init on every rank (DDP also broadcasts rank 0's)
    classifier = build_classifier(
        cfg["arch"], num_classes=manifest["num_classes"], in_chans=manifest["channels"],
        img_size=int(dcfg.get("img_size") or manifest["image_size"][0]),
        mean=manifest["mean"], std=manifest["std"],
    )
    method = build_method(cfg["method"])
    image_shape = (manifest["channels"], int(dcfg.get("img_size") or manifest["image_size"][0]),
                   int(dcfg.get("img_size") or manifest["image_size"][1]))
    forward_flops = flops_per_image(classifier.to(device), image_shape, device)
    module = method.build(compile_classifier(classifier, backend)).to(device)
    if channels_last:
        module = module.to(memory_format=torch.channels_last)
    optimizer = _optimizer(tcfg["optimizer"], method.param_groups(module))
    base_lrs = [group["lr"] for group in optimizer.param_groups]

    epochs = int(tcfg["epochs"])
    global_batch = int(tcfg["batch_size"])
    per_rank_batch = max(1, global_batch // world_size)
    counts = [split_count(dataset_dir, "train", r, world_size, limit=dcfg.get("train_limit"),
                          num_workers=int(tcfg.get("num_workers", 0))) for r in range(world_size)]
    steps_per_epoch = max(1, math.ceil(max(counts) / per_rank_batch))
    if min(counts) < steps_per_epoch:
        raise ValueError(f"too few training samples per rank ({min(counts)}) for {steps_per_epoch} steps; "
                         f"lower trainer.world_size or trainer.batch_size")

    start_epoch, state = _load_checkpoint(work_dir / CHECKPOINT, module, optimizer, method, device)
    if rank == 0 and 0 < start_epoch < epochs:  # a retried cell (worker/node/driver died): say so in the grid log
        print(f"{cfg.get('label', 'cell')}: resuming from the epoch {start_epoch - 1} checkpoint", flush=True)
    if start_epoch == 0 and tcfg.get("init_from"):  # a later stage starts from an earlier one's weights
        init = load_checkpoint(tcfg["init_from"], map_location=device)
        module.load_state_dict(init["model"])
    ddp = DDP(module, device_ids=[device.index] if use_cuda else None,
              find_unused_parameters=method.find_unused_parameters)
    torch.manual_seed(int(cfg["seed"]) * 1000 + rank + 7919 * start_epoch)  # attack/augment randomness
    curve: list[dict[str, float]] = state.get("curve", [])
    train_seconds = float(state.get("train_seconds", 0.0))
    samples_per_epoch: list[int] = state.get("samples_per_epoch", [])

    poison = train_plan(cfg)  # None unless the cell trains on poisoned data
    step_flops_per_image: float | None = None
    reset_peak_memory(device)
    sync_every = 50 if use_cuda else 1  # reading a GPU value waits for the GPU: only now and then
    bar = progress_bar(total=(epochs - start_epoch) * steps_per_epoch, desc=cfg.get("label", "train"),
                       enabled=rank == 0 and bool(tcfg.get("progress", True)))
    for epoch in range(start_epoch, epochs):
        t0 = time.perf_counter()
        ddp.train()
        loader = make_loader(dataset_dir, "train", per_rank_batch, rank=rank, world_size=world_size,
                             num_workers=int(tcfg.get("num_workers", 0)), shuffle=True,
                             seed=int(cfg["seed"]), epoch=epoch, img_size=dcfg.get("img_size"),
                             augment=dcfg.get("augment"), limit=dcfg.get("train_limit"),
                             shuffle_buffer=dcfg.get("shuffle_buffer"), cache_dir=dcfg.get("cache"),
                             poison=poison.for_epoch(epoch) if poison else None,
                             pin_memory=use_cuda, prefetch_factor=tcfg.get("prefetch_factor") if use_cuda else None)
        sums: dict[str, torch.Tensor] = {}
        seen = 0
        for step_in_epoch, (x, y) in enumerate(even_batches(loader, counts[rank], steps_per_epoch)):
            lr_scale = lr_factor(tcfg["schedule"], epoch + step_in_epoch / steps_per_epoch, epochs)
            for group, base in zip(optimizer.param_groups, base_lrs):
                group["lr"] = base * lr_scale
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            ctx = TrainContext(epoch=epoch, epochs=epochs, step=epoch * steps_per_epoch + step_in_epoch,
                               steps_per_epoch=steps_per_epoch, device=device, rank=rank,
                               world_size=world_size, classifier=method.eval_model(module), lr_scale=lr_scale)
            first_step = step_flops_per_image is None and step_in_epoch == 0
            try:
                if first_step:  # count the FLOPs of one whole step (train-time attack included), once
                    box: dict[str, Any] = {}
                    flops = count_flops(lambda: box.update(logs=_step(method, ddp, optimizer, x, y, ctx,
                                                                      device, precision)))
                    logs = box["logs"]
                    step_flops_per_image = flops / y.shape[0]
                else:
                    logs = _step(method, ddp, optimizer, x, y, ctx, device, precision)
            except Exception as err:
                if backend is not None and first_step and not isinstance(err, NonFiniteLossError):
                    raise RuntimeError(f"torch.compile (backend {backend}) failed on the first training step: "
                                       f"{type(err).__name__}: {err}; {COMPILE_FIX}") from err
                raise
            method.after_step(module, ctx)
            seen += y.shape[0]
            for name, value in logs.items():
                sums[name] = sums.get(name, 0) + value.detach().float() * y.shape[0]
            bar.update(1)
            if step_in_epoch % sync_every == 0 or step_in_epoch == steps_per_epoch - 1:
                _check_finite(cfg, sums["loss"], epoch, step_in_epoch)
                bar.set_postfix(epoch=epoch, loss=f"{float(logs['loss'].detach()):.3f}")
        epoch_stats = _reduce_epoch({k: float(v) for k, v in sums.items()}, seen, device)
        epoch_seconds = time.perf_counter() - t0
        train_seconds += epoch_seconds
        samples_per_epoch.append(int(epoch_stats["samples"]))
        curve.append({"epoch": epoch, "lr": optimizer.param_groups[0]["lr"], "seconds": epoch_seconds, **epoch_stats})
        if rank == 0:
            _save_checkpoint(work_dir / CHECKPOINT, epoch, module, optimizer, method,
                             {"curve": curve, "train_seconds": train_seconds, "samples_per_epoch": samples_per_epoch})
            checkpoint_sync.record_epoch(cfg, work_dir, epoch)  # pushed to the store for a URI results_dir
        dist.barrier()
    bar.close()

    in_sync = _replicas_in_sync(module, device)
    total_samples = sum(samples_per_epoch)
    return TrainSummary(
        epochs=epochs, world_size=world_size, n_train=sum(counts), train_seconds=train_seconds,
        images_per_second=total_samples / train_seconds if train_seconds > 0 else 0.0,
        final_train_loss=curve[-1]["loss"] if curve else float("nan"),
        samples_per_epoch=samples_per_epoch, replicas_in_sync=in_sync,
        device=str(device.type), precision=precision, curve=curve, device_name=device_name(device),
        flops_per_image=forward_flops,
        train_flops=step_flops_per_image * total_samples if step_flops_per_image is not None else None,
        peak_memory_bytes=peak_memory_bytes(device), compile=backend,
    )


def _step(method: Method, ddp: DDP, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
          ctx: TrainContext, device: torch.device, precision: str) -> dict[str, torch.Tensor]:
    """One optimisation step: the method's loss (autocast in `precision`), backward, update."""
    with autocast(device, precision):
        logs = method.training_step(ddp, x, y, ctx)
    optimizer.zero_grad(set_to_none=True)
    logs["loss"].backward()
    optimizer.step()
    return logs


def _check_finite(cfg: dict[str, Any], loss_sum: torch.Tensor, epoch: int, step: int) -> None:
    """Stop the cell on a NaN/inf loss (checked every step on a CPU, every few steps on a GPU)."""
    if not torch.isfinite(loss_sum):
        raise NonFiniteLossError(f"{cfg['method']['name']}: loss is {float(loss_sum)} at epoch {epoch}, "
                                 f"step {step} or before; lower the learning rate or check the data")


def even_batches(loader: Iterable, n_samples: int, n_batches: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Re-cut a rank's stream of batches into exactly `n_batches` batches of near-equal size.

    Every rank then runs the same number of DDP steps (no rank waits on another that ran out),
    while every sample of the epoch is still used exactly once.
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
    leftover = sum(1 for _ in it)
    if buffered or leftover:
        raise RuntimeError(f"data loader gave more samples than the {n_samples} planned for this rank")


# --------------------------------------------------------------------------- helpers


_OPTIMIZERS = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW, "adam": torch.optim.Adam}


def _optimizer(ocfg: dict[str, Any], groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    ocfg = dict(ocfg)
    name = ocfg.pop("name")
    if name not in _OPTIMIZERS:
        raise ValueError(f"unknown optimizer '{name}'. Known optimizers: {', '.join(sorted(_OPTIMIZERS))}")
    try:
        return _OPTIMIZERS[name](groups, **ocfg)
    except TypeError as err:
        raise ValueError(f"bad settings for optimizer '{name}': {err}") from None


def _reduce_epoch(sums: dict[str, float], seen: int, device: torch.device) -> dict[str, float]:
    """Sample-weighted means of the logged terms over all ranks, plus the epoch's sample count."""
    names = sorted(sums)
    tensor = torch.tensor([sums[n] for n in names] + [float(seen)], dtype=torch.float64,
                          device=device if device.type == "cuda" else "cpu")
    dist.all_reduce(tensor)
    total = tensor[-1].item()
    stats = {n: tensor[i].item() / max(total, 1.0) for i, n in enumerate(names)}
    stats["samples"] = total
    return stats


def _replicas_in_sync(module: nn.Module, device: torch.device) -> bool:
    """All ranks hold bitwise-equal parameters (what DDP promises); checked once at the end."""
    with torch.no_grad():
        flat = torch.cat([p.detach().double().flatten() for p in module.parameters()])
        probe = torch.stack([flat.sum(), (flat * torch.arange(flat.numel(), dtype=flat.dtype,
                                                               device=flat.device)).sum()])
        gathered = [torch.zeros_like(probe) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, probe)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def _save_checkpoint(path: Path, epoch: int, module: nn.Module, optimizer: torch.optim.Optimizer,
                     method: Method, extra: dict[str, Any]) -> None:
    state = {"epoch": epoch, "model": module.state_dict(), "optimizer": optimizer.state_dict(),
             "method": method.state_dict(), "rng_cpu": torch.get_rng_state(), **extra}
    save_checkpoint(path, state)


def _load_checkpoint(path: Path, module: nn.Module, optimizer: torch.optim.Optimizer, method: Method,
                     device: torch.device) -> tuple[int, dict[str, Any]]:
    """(first epoch to run, saved extras); (0, {}) when there is no checkpoint."""
    if not path.exists():
        return 0, {}
    state = load_checkpoint(path, map_location=device)
    module.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    method.load_state_dict(state.get("method", {}))
    return int(state["epoch"]) + 1, state


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def load_trained_classifier(cfg: dict[str, Any], work_dir: Path, device: torch.device | str = "cpu") -> nn.Module:
    """Rebuild the cell's module and load its final checkpoint onto `device` (the cell's, see
    harness/train/device.py); returns the method's eval model."""
    manifest = load_manifest(Path(cfg["data"]["dir"]))
    torch.manual_seed(int(cfg["seed"]))
    classifier = build_classifier(
        cfg["arch"], num_classes=manifest["num_classes"], in_chans=manifest["channels"],
        img_size=int(cfg["data"].get("img_size") or manifest["image_size"][0]),
        mean=manifest["mean"], std=manifest["std"],
    )
    method = build_method(cfg["method"])
    module = method.build(classifier)
    state = load_checkpoint(work_dir / CHECKPOINT, map_location="cpu")  # then moved to the cell's device
    module.load_state_dict(state["model"])
    module.to(device).eval()  # the cell's device: every eval stage runs there
    return method.eval_model(module)
