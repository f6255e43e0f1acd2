"""One DDP trainer for every method.

The loop knows nothing about any one method: it builds the classifier, lets the method `build`
on it, wraps the result in DistributedDataParallel (gloo on CPU, NCCL on GPU; world size 1 is
still DDP, so the single-process path is the multi-process path), and calls every hook of the
method contract (methods/base.py lists them in call order). It owns the optimiser and the
method's extra optimisers, the per-step LR schedule, one checkpoint per epoch (resume continues
from the last finished epoch), the speed options (`trainer.precision=bf16` autocast,
`channels_last`, `compile`: CPU and CUDA alike; pinned memory and prefetch on CUDA), and the
cell's wall time, images/s, FLOPs and peak memory.

Training you can trust: a validation split carved from train (harness/data/validation.py) is
never streamed; after every `probe_every` epochs the probe (harness/train/probes.py) measures it
(clean, PGD-10 or ASR) into the curve; `trainer.select` keeps the best probed epoch's weights
(harness/train/best_epoch.py); the training-integrity flags are read off the curve
(harness/train/health.py). The test split is never opened here.

World size > 1 on one machine spawns processes (harness/train/ranks.py); every rank sees a
disjoint part of each epoch (harness/data/loader.py) and runs the same number of batches, so
DDP never waits on a rank that ran out of data. With `data.generated` (a generated set, built by
its artifact node) each batch mixes real and generated images by `data.generated_ratio`, an epoch
being ceil(real images / batch) steps (harness/data/generated.py).
"""
from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from architectures.classifier import Classifier
from architectures.presets import build_classifier
from harness.backdoor.plan import train_plan
from harness.core.device import autocast, check_precision, device_name
from harness.core.progress import progress_bar
from harness.eval.cost import count_flops, flops_per_image, peak_memory_bytes, reset_peak_memory
from harness.data.generated import (check_generated_set, generated_ratio, mix_sizes, mixed_batches, mixed_steps,
                                    shard_readers)
from harness.data.loader import make_loader, split_count
from harness.data.shards import load_manifest
from harness.data.validation import validation_split
from harness.store import checkpoint_sync
from harness.store.checkpoint_sync import CHECKPOINT, SUMMARY
from harness.train.best_epoch import check_select, improved, restore_selected, save_best, select_rule, selection
from harness.train.batches import epoch_steps, even_batches, reduce_epoch, replicas_in_sync, sync_buffers
from harness.train.checkpointing import (atomic_write_text, load_checkpoint, load_optimizer_state, load_weights,
                                         save_checkpoint)
from harness.train.device import rank_setup
from harness.train.ema import WeightAverage, ema_settings
from harness.train.ranks import run_ranks
from harness.train.optimizers import build_optimizer, check_trainer_config
from harness.train.health import TRAIN_ROBUST
from harness.train.probes import ValidationProbe
from harness.train.compile import FIX as COMPILE_FIX, check_compile, compile_backend, compile_classifier
from harness.train.schedule import lr_factor, momentum_at, schedule_position
from harness.train.selection import TrainSamples
from methods.base import ExtraOptimizer, Method, TrainContext, build_method

__all__ = ["CHECKPOINT", "SUMMARY", "NonFiniteLossError", "TrainSummary", "check_trainer_config",
           "even_batches", "load_trained_classifier", "train", "train_in_process_group"]


PRE_PASS_SEED = 0x5EED  # a method's pre-pass reads the epoch in another order: seed + this


class NonFiniteLossError(RuntimeError):
    """A method produced a NaN/inf loss: the cell is recorded as failed, the grid goes on."""


@dataclass
class TrainSummary:
    epochs: int
    world_size: int
    n_train: int
    train_seconds: float
    images_per_second: float  # steady state: the run's first batch and step (loader start and shuffle-buffer
    # fill, FLOP count, warm-up, compilation) left out
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
    num_classes: int | None = None
    validation: dict[str, Any] | None = None  # the held-out split: n, n_split, fraction, max, sha256 (None: off)
    selection: dict[str, Any] | None = None  # trainer.select: rule, epoch, metric, value, reason
    probe_seconds: float = 0.0  # validation probes, inside train_seconds (not in images/s)
    ema: dict[str, Any] | None = None  # trainer.ema: the delivered weights are the average (harness/train/ema.py)
    generated: dict[str, Any] | None = None  # data.generated: the set mixed in, its ratio, the batch split (None: off)
    method_summary: dict[str, Any] = field(default_factory=dict)  # Method.summary(): what the method decided


def train(cfg: dict[str, Any], work_dir: Path) -> TrainSummary:
    """Train the cell described by the resolved config `cfg`; checkpoints live in `work_dir`.

    Returns the summary; the final weights are in `work_dir/checkpoint.pt`.
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_sync.pull(cfg, work_dir)  # resume from the store's last epoch if it is newer (another node)
    world_size = int(cfg["trainer"].get("world_size", 1))
    try:
        run_ranks(_fit_and_write_summary, world_size, cfg, cfg, work_dir, store_dir=work_dir)
    except mp.ProcessRaisedException as err:
        if "NonFiniteLossError" in str(err):
            raise NonFiniteLossError(str(err).strip().splitlines()[-1]) from None
        raise
    return TrainSummary(**json.loads((work_dir / SUMMARY).read_text()))


def train_in_process_group(cfg: dict[str, Any], work_dir: Path) -> None:
    """Train one rank inside a process group someone else set up (Ray Train's TorchTrainer workers).

    Every rank pulls the store's checkpoint first, so a restarted worker group resumes from the
    last epoch; rank 0 writes and pushes the summary.
    """
    rank, world_size = dist.get_rank(), dist.get_world_size()
    device = rank_setup(cfg, int(os.environ.get("LOCAL_RANK", rank)))
    work_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_sync.pull(cfg, work_dir)
    dist.barrier()
    _fit_and_write_summary(rank, world_size, device, cfg, work_dir)


def _fit_and_write_summary(rank: int, world_size: int, device: torch.device, cfg: dict[str, Any],
                           work_dir: Path) -> None:
    summary = _fit(rank, world_size, cfg, work_dir, device)
    if rank == 0:
        atomic_write_text(work_dir / SUMMARY, json.dumps(asdict(summary)))
        checkpoint_sync.push_summary(cfg, work_dir)


def _classifier(cfg: dict[str, Any], manifest: dict[str, Any]) -> Classifier:
    """The cell's classifier, freshly initialised from the cell's seed (identical on every rank)."""
    torch.manual_seed(int(cfg["seed"]))
    return build_classifier(
        cfg["arch"], num_classes=manifest["num_classes"], in_chans=manifest["channels"],
        img_size=int(cfg["data"].get("img_size") or manifest["image_size"][0]),
        mean=manifest["mean"], std=manifest["std"],
    )


def _generated_mix(cfg: dict[str, Any], manifest: dict[str, Any], counts: list[int], per_rank_batch: int,
                   world_size: int) -> dict[str, Any] | None:
    """The generated set a cell mixes in and how (None: `data.generated` off), checked before any
    step: its manifest complete, its classes and image shape the real data's, the ratio in [0, 1)."""
    dcfg = cfg["data"]
    directory = dcfg.get("generated_dir")
    if not directory:
        return None
    ratio = generated_ratio(dcfg)
    readers = shard_readers(world_size, cfg["trainer"].get("num_workers"))
    generated = check_generated_set(directory, manifest, readers, dcfg.get("img_size"))
    n_real, n_gen = mix_sizes(per_rank_batch, ratio)
    return {"dir": str(directory), "key": Path(str(directory)).name, "name": generated["name"],
            "images": generated["splits"]["train"]["count"], "ratio": ratio, "real_per_rank_batch": n_real,
            "generated_per_rank_batch": n_gen, "steps_per_epoch": mixed_steps(sum(counts), per_rank_batch * world_size,
                                                                   bool(cfg["trainer"].get("drop_last", False))),
            "manifest_sha256": generated["content_sha256"]}


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

    classifier = _classifier(cfg, manifest)
    size = int(dcfg.get("img_size") or manifest["image_size"][0])
    forward_flops = flops_per_image(classifier.to(device), (manifest["channels"], size, size), device)
    method = build_method(cfg["method"])  # the contract's hooks, in the order methods/base.py lists
    module = method.build(compile_classifier(classifier, backend)).to(device)
    if channels_last:
        module = module.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(tcfg["optimizer"], method.param_groups(module))
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    extras = method.extra_optimizers(module)
    attack_target = method.eval_model(module)  # what train-time attacks run on (a part of `module`)

    epochs, per_rank_batch = int(tcfg["epochs"]), max(1, int(tcfg["batch_size"]) // world_size)
    start_epoch, state = load_checkpoint(work_dir / CHECKPOINT, module, optimizer, extras, method, device)
    if rank == 0 and 0 < start_epoch < epochs:  # a retried cell (worker/node/driver died): say so in the grid log
        print(f"{cfg.get('label', 'cell')}: resuming from the epoch {start_epoch - 1} checkpoint", flush=True)
    if start_epoch == 0 and tcfg.get("init_from"):  # a later stage starts from an earlier one's weights
        load_weights(tcfg["init_from"], module, device)
        if tcfg.get("init_optimizer"):  # ... and continues its optimiser (momentum buffers), as a
            load_optimizer_state(tcfg["init_from"], optimizer, device)  # script keeping one SGD across stages
    # the part of the split the method trains on (None: all; ABL: its isolated 1%), decided again on resume,
    # never the validation split (TrainSamples does not show it either)
    select = method.select_train_samples(TrainSamples(cfg, device, rank, world_size))
    pre_select = method.pre_pass_samples()  # None: the pre-pass streams `select` (D-BR: its suspected poisoned)
    held = validation_split(cfg)  # None: trainer.validation off
    if held is not None:
        select = held.train_indices(select)
        pre_select = held.train_indices(pre_select) if pre_select is not None else None
    rule = select_rule(tcfg)
    check_select(tcfg, held is not None, train_plan(cfg) is not None)
    probe = ValidationProbe.load(cfg, held, device, rank, world_size, precision, trained=select) \
        if held is not None else None
    if probe is not None and state.get("probe_robust_n") is not None:  # sized by the first run: the same images
        probe.set_robust_n(int(state["probe_robust_n"]), int(state.get("probe_trained_robust_n") or 0))
    counts = [split_count(dataset_dir, "train", r, world_size, limit=dcfg.get("train_limit"),
                          num_workers=int(tcfg.get("num_workers", 0)), select=select) for r in range(world_size)]
    mix = _generated_mix(cfg, manifest, counts, per_rank_batch, world_size)  # None: real data alone
    if mix is None:
        steps_per_epoch, used = epoch_steps(counts, per_rank_batch, bool(tcfg.get("drop_last", False)))
    else:  # an epoch is ceil(real images / global batch) steps, each batch real + generated
        steps_per_epoch, used = mix["steps_per_epoch"], counts
    if pre_select is not None and mix is not None:
        raise ValueError(f"method '{cfg['method']['name']}' streams a pre-pass of its own samples, which "
                         f"data.generated does not mix; unset data.generated for this method")
    pre_counts = [split_count(dataset_dir, "train", r, world_size, limit=dcfg.get("train_limit"),
                              num_workers=int(tcfg.get("num_workers", 0)), select=pre_select)
                  for r in range(world_size)] if pre_select is not None else counts
    pre_steps, pre_used = epoch_steps(pre_counts, per_rank_batch, bool(tcfg.get("drop_last", False))) \
        if pre_select is not None else (steps_per_epoch, used)
    pre_weight = sum(used) / max(1, sum(pre_used))  # the epoch's logs are divided by the training pass's samples
    averaging = ema_settings(tcfg)  # the weight average starts from the weights training starts from
    ema = WeightAverage(module, averaging, epochs * steps_per_epoch, device) if averaging is not None else None
    if ema is not None and state.get("ema"):
        ema.load_state_dict(state["ema"])
    delivered = ema.module if ema is not None else module  # what is probed, selected and evaluated
    # gradients live in DDP's buckets (no copy in and out each step, one gradient-sized buffer less)
    ddp = DDP(module, device_ids=[device.index] if use_cuda else None,
              find_unused_parameters=method.find_unused_parameters, gradient_as_bucket_view=True)
    curve: list[dict[str, float]] = state.get("curve", [])
    train_seconds = float(state.get("train_seconds", 0.0))
    samples_per_epoch: list[int] = state.get("samples_per_epoch", [])

    def context(epoch: int, step_in_epoch: int) -> TrainContext:
        lr_scale = lr_factor(tcfg["schedule"], schedule_position(tcfg["schedule"], epoch, step_in_epoch,
                                                                 steps_per_epoch), epochs, steps_per_epoch)
        return TrainContext(epoch=epoch, epochs=epochs, step=epoch * steps_per_epoch + step_in_epoch,
                            steps_per_epoch=steps_per_epoch, device=device, rank=rank, world_size=world_size,
                            classifier=attack_target, lr_scale=lr_scale)

    poison = train_plan(cfg)  # None unless the cell trains on poisoned data

    def running() -> dict[str, Any]:
        """The trainer's running state a checkpoint keeps beside the weights and optimisers."""
        return {"curve": curve, "train_seconds": train_seconds, "samples_per_epoch": samples_per_epoch,
                "probe_robust_n": None if probe is None else probe.robust_n,
                "probe_trained_robust_n": None if probe is None else probe.trained_robust_n,
                "ema": None if ema is None else ema.state_dict()}
    step_flops_per_image: float | None = None
    warmup = (0.0, 0)  # (seconds, samples) of this run's first step, left out of images/s
    reset_peak_memory(device)
    sync_every = 50 if use_cuda else 1  # reading a GPU value waits for the GPU: only now and then
    bar = progress_bar(total=(epochs - start_epoch) * steps_per_epoch, desc=cfg.get("label", "train"),
                       enabled=rank == 0 and bool(tcfg.get("progress", True)))
    def loader(directory: Path | str, batch: int, seed: int, epoch: int, real: bool, pre: bool = False) -> Any:
        """One pass of this rank's part of the real split (or of the generated set: no limit,
        selection or poison), shuffled from (seed, epoch) and augmented alike; `pre`: the
        pre-pass's own selection where the method has one."""
        chosen = pre_select if pre and pre_select is not None else select
        return make_loader(directory, "train", batch, rank=rank, world_size=world_size,
                           num_workers=int(tcfg.get("num_workers", 0)), shuffle=bool(dcfg.get("shuffle", True)),
                           seed=seed, epoch=epoch, img_size=dcfg.get("img_size"),
                           augment=dcfg.get("augment"), limit=dcfg.get("train_limit") if real else None,
                           shuffle_buffer=dcfg.get("shuffle_buffer"), cache_dir=dcfg.get("cache"),
                           poison=poison.for_epoch(epoch) if poison and real else None, select=chosen if real else None,
                           pin_memory=use_cuda, prefetch_factor=tcfg.get("prefetch_factor") if use_cuda else None)

    def epoch_batches(epoch: int, seed: int, pre: bool = False) -> Any:
        """This rank's batches of one pass over the epoch's data (`pre`: the pre-pass's), shuffled from `seed`."""
        if pre and pre_select is not None:
            return even_batches(loader(dataset_dir, per_rank_batch, seed, epoch, True, pre=True), pre_used[rank],
                                pre_steps, drop=pre_counts[rank] - pre_used[rank])
        if mix is not None:  # real + generated in every batch (harness/data/generated.py)
            n_real, n_gen = mix["real_per_rank_batch"], mix["generated_per_rank_batch"]
            return mixed_batches(lambda e: loader(dataset_dir, n_real, seed, e, True),
                                 lambda e: loader(mix["dir"], n_gen, seed, e, False), steps_per_epoch,
                                 n_real, n_gen, seed=seed, epoch=epoch, rank=rank)
        return even_batches(loader(dataset_dir, per_rank_batch, seed, epoch, True), used[rank], steps_per_epoch,
                            drop=counts[rank] - used[rank])

    for epoch in range(start_epoch, epochs):
        t0 = time.perf_counter()
        seed_epoch(int(cfg["seed"]), rank, epoch)  # a resumed epoch draws what the uninterrupted run drew
        sync_buffers(module)  # ... and starts from rank 0's BatchNorm statistics, as a resume does
        ddp.train()
        method.on_epoch_start(context(epoch, 0))
        sums: dict[str, torch.Tensor] = {}
        seen = 0
        if method.pre_pass(context(epoch, 0)):  # the method's own pass first (CBD's critic): another shuffle
            for step_in_epoch, (x, y) in enumerate(epoch_batches(epoch, int(cfg["seed"]) + PRE_PASS_SEED, pre=True)):
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                pre_ctx = context(epoch, step_in_epoch)
                if method.pre_pass_steps_trainer:  # backward and the trainer's step (D-BR's unlearning)
                    for group, base in zip(optimizer.param_groups, base_lrs):
                        group["lr"] = base * pre_ctx.lr_scale
                    pre_logs = _step(method, ddp, optimizer, extras, x, y, pre_ctx, device, precision, pre=True)
                    _check_finite(cfg, pre_logs["loss"].detach(), epoch, step_in_epoch)
                else:
                    with autocast(device, precision):
                        pre_logs = method.pre_pass_step(ddp, x, y, pre_ctx)
                weight = y.shape[0] * pre_weight  # epoch means over the pre-pass's own samples
                for name, value in pre_logs.items():
                    sums[f"pre_{name}"] = sums.get(f"pre_{name}", 0) + value.detach().float() * weight
        batches_t0 = time.perf_counter()  # the wait for the run's first batch is warm-up too (pipeline fill)
        for step_in_epoch, (x, y) in enumerate(epoch_batches(epoch, int(cfg["seed"]))):
            ctx = context(epoch, step_in_epoch)
            momentum = momentum_at(tcfg["schedule"], schedule_position(tcfg["schedule"], epoch, step_in_epoch,
                                                                       steps_per_epoch), epochs)
            for group, base in zip(optimizer.param_groups, base_lrs):
                group["lr"] = base * ctx.lr_scale
                if momentum is not None:  # a cyclic schedule cycling momentum (torch's CyclicLR)
                    group.update({"betas": (momentum, *group["betas"][1:])} if "betas" in group else {"momentum": momentum})
            for extra in extras.values():
                extra.set_lr_scale(ctx.lr_scale)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            first_step = step_flops_per_image is None and step_in_epoch == 0
            try:
                if first_step:  # count the FLOPs of one whole step (attack and after_step included), once
                    box: dict[str, Any] = {}
                    flops = count_flops(lambda: box.update(logs=_step(method, ddp, optimizer, extras, x, y, ctx,
                                                                      device, precision))
                                        or method.after_step(module, ctx))
                    logs = box["logs"]
                    step_flops_per_image = flops / y.shape[0]
                else:
                    logs = _step(method, ddp, optimizer, extras, x, y, ctx, device, precision)
                    method.after_step(module, ctx)
            except Exception as err:
                if backend is not None and first_step and not isinstance(err, NonFiniteLossError):
                    raise RuntimeError(f"torch.compile (backend {backend}) failed on the first training step: "
                                       f"{type(err).__name__}: {err}; {COMPILE_FIX}") from err
                raise
            if ema is not None:
                ema.update(module, ctx.step + 1)
            seen += y.shape[0]
            for name, value in logs.items():
                sums[name] = sums.get(name, 0) + value.detach().float() * y.shape[0]
            bar.update(1)
            if step_in_epoch % sync_every == 0 or step_in_epoch == steps_per_epoch - 1:
                _check_finite(cfg, sums["loss"], epoch, step_in_epoch)
                bar.set_postfix(epoch=epoch, loss=f"{float(logs['loss'].detach()):.3f}")
            if first_step:  # the finite check above waited for the device: the step is done
                warmup = (time.perf_counter() - batches_t0, int(y.shape[0]) * world_size)  # ranks step together
                if probe is not None and probe.robust_n is None:  # the probe's share of these FLOPs: its budget
                    probe.size_robust(step_flops_per_image, forward_flops, sum(used), TRAIN_ROBUST in logs)
        method.on_epoch_end(ctx)
        epoch_stats = reduce_epoch({k: float(v) for k, v in sums.items()}, seen, device)
        epoch_seconds = time.perf_counter() - t0
        train_seconds += epoch_seconds
        samples_per_epoch.append(int(epoch_stats["samples"]))
        entry = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"], "seconds": epoch_seconds, **epoch_stats}
        if probe is not None and probe.due(epoch, epochs):  # on every rank: they split the batches
            entry.update(probe.run(method.eval_model(delivered), delivered, epoch))
            train_seconds += entry["probe_seconds"]
        curve.append(entry)
        if rank == 0:
            if improved(curve, rule):  # before the epoch's checkpoint: a resume always finds the best so far
                save_best(work_dir, epoch, delivered)
                checkpoint_sync.record_best(cfg, work_dir)
            save_checkpoint(work_dir / CHECKPOINT, epoch, module, optimizer, extras, method, running())
            checkpoint_sync.record_epoch(cfg, work_dir, epoch)  # pushed to the store for a URI results_dir
        dist.barrier()
    bar.close()
    if epochs == 0 and rank == 0:  # a stage with no training (CLP: the pruned model is the result)
        save_checkpoint(work_dir / CHECKPOINT, -1, module, optimizer, extras, method, running())
        checkpoint_sync.record_epoch(cfg, work_dir, -1)

    chosen = selection(curve, rule, epochs)
    if ema is not None:  # the average is the model (the selected epoch's, when one is selected below)
        module.load_state_dict(ema.module.state_dict())
    if (restore_selected(work_dir, module, chosen, rank, device) or ema is not None) and rank == 0:
        save_checkpoint(work_dir / CHECKPOINT, epochs - 1, module, optimizer, extras, method, running())
        checkpoint_sync.record_epoch(cfg, work_dir, epochs - 1)
    probe_seconds = sum(float(c.get("probe_seconds", 0.0)) for c in curve)
    total_samples = sum(samples_per_epoch)
    return TrainSummary(
        epochs=epochs, world_size=world_size, n_train=sum(counts), train_seconds=train_seconds,
        images_per_second=steady_images_per_second(total_samples, train_seconds - probe_seconds, *warmup),
        final_train_loss=curve[-1]["loss"] if curve else float("nan"),
        samples_per_epoch=samples_per_epoch, replicas_in_sync=replicas_in_sync(module),
        device=str(device.type), precision=precision, curve=curve, device_name=device_name(device),
        flops_per_image=forward_flops,
        train_flops=step_flops_per_image * total_samples if step_flops_per_image is not None else None,
        peak_memory_bytes=peak_memory_bytes(device), compile=backend, num_classes=int(manifest["num_classes"]),
        validation=held.describe() if held is not None else None, selection=chosen, probe_seconds=probe_seconds,
        ema=None if ema is None else ema.describe(), generated=mix, method_summary=method.summary(),
    )


def seed_epoch(seed: int, rank: int, epoch: int) -> None:
    """Seed every global generator a step may draw from (torch on the CPU and every CUDA device:
    attack starts, dropout, a method's noise; numpy; Python's random) from (seed, rank, epoch).

    The data order and augmentation are pure functions of (seed, epoch, rank) already
    (harness/data/loader.py), and everything else a step reads (weights, optimiser and method
    state, BatchNorm statistics, the schedule) is in the epoch checkpoint; so an epoch resumed
    after a crash computes exactly what the uninterrupted run computed: bitwise-equal weights
    (tests/test_resume_determinism.py). A method that keeps a generator of its own must seed it
    from its context or save it in `state_dict`."""
    words = np.random.SeedSequence([_u32(seed), _u32(rank), _u32(epoch), _EPOCH_SEED_TAG]).generate_state(3)
    torch.manual_seed(int(words[0]))
    np.random.seed(int(words[1]))
    random.seed(int(words[2]))


_EPOCH_SEED_TAG = 0x7E50


def _u32(value: int) -> int:
    return int(value) & 0xFFFF_FFFF


def steady_images_per_second(samples: int, seconds: float, warmup_seconds: float, warmup_samples: int) -> float:
    """Images/s without the first step, which alone counts FLOPs and pays one-time costs
    (allocator growth, cuDNN/oneDNN autotuning, torch.compile), nor the wait for its batch: the
    loader's start and its shuffle-buffer fill (up to `data.shuffle_buffer` samples decoded before
    the first batch; later batches' decoding is counted where it makes a step wait). All steps
    when there is only one."""
    if samples > warmup_samples and seconds > warmup_seconds:
        return (samples - warmup_samples) / (seconds - warmup_seconds)
    return samples / seconds if seconds > 0 else 0.0


def _step(method: Method, ddp: DDP, optimizer: torch.optim.Optimizer, extras: dict[str, ExtraOptimizer],
          x: torch.Tensor, y: torch.Tensor, ctx: TrainContext, device: torch.device,
          precision: str, pre: bool = False) -> dict[str, torch.Tensor]:
    """One optimisation step: the method's loss (autocast in `precision`; `pre`: its pre-pass
    loss, `pre_pass_steps_trainer`), backward, the trainer's optimiser step, then the extra
    optimisers the trainer steps."""
    with autocast(device, precision):
        logs = (method.pre_pass_step if pre else method.training_step)(ddp, x, y, ctx)
    optimizer.zero_grad(set_to_none=True)
    logs["loss"].backward()
    optimizer.step()
    for extra in extras.values():
        extra.trainer_step()
    return logs


def _check_finite(cfg: dict[str, Any], loss_sum: torch.Tensor, epoch: int, step: int) -> None:
    """Stop the cell on a NaN/inf loss (checked every step on a CPU, every few steps on a GPU)."""
    if not torch.isfinite(loss_sum):
        raise NonFiniteLossError(f"{cfg['method']['name']}: loss is {float(loss_sum)} at epoch {epoch}, "
                                 f"step {step} or before; lower the learning rate or check the data")


def load_trained_classifier(cfg: dict[str, Any], work_dir: Path, device: torch.device | str = "cpu") -> nn.Module:
    """Rebuild the cell's module and load its final checkpoint; returns the method's eval model."""
    classifier = _classifier(cfg, load_manifest(Path(cfg["data"]["dir"])))
    method = build_method(cfg["method"])
    module = method.build(classifier)
    load_weights(work_dir / CHECKPOINT, module, device)
    module.to(device).eval()
    return method.eval_model(module)
