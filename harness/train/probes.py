"""Per-epoch validation probes: how the model does on images training never sees, every few epochs.

What a probe measures, on the validation split (harness/data/validation.py), on the cell's device:
- clean accuracy, and the share of predictions the most predicted class takes (a collapse);
- clean cells: PGD-10 robust accuracy at the cell's `data.eps` (L-inf, step eps/4, uniform start;
  harness/attacks/pgd.py), counted as the evaluation counts (clean-correct and still correct);
- backdoor cells: C-Acc and the attack success rate on a triggered copy of the non-target images
  (the trigger applied at native resolution, as the evaluation's test-mode poison plan does);
- methods with a train-time attack (they log `train_robust_acc`): PGD-10 accuracy on a fixed sample
  of images training DOES stream (`train_pgd_acc`), so the train-time attack is compared with PGD-10
  on the same kind of images. Compared with the validation split instead, a model that memorised
  its training set (robust overfitting) would read as a weak attack. The sample is, for each held-out
  index, the next index training streams: the same shards the validation read opens, no extra I/O.

The probe runs on the unwrapped model the evaluation attacks (`method.eval_model`), in eval mode
(BatchNorm's running statistics used, never updated), under the trainer's precision, with
gradients taken only with respect to the input. Its random starts come from a generator of its
own seeded by (seed, epoch, batch index), so the global generators a training step draws from
are untouched and a resumed run probes exactly what the uninterrupted one probed.

DDP: the validation images are read once per node, each rank reading its share of the shards
that hold them, and gathered; they are cut into fixed batches of PROBE_BATCH in split-index order,
rank r probes batches r, r + W, ..., and the counts are summed over ranks. A batch's result does
not depend on who probes it, so W ranks give exactly one rank's numbers. Before probing, every
rank takes rank 0's BatchNorm statistics (what the checkpoint holds).

Cost, a budget: `trainer.probe_budget` (default 0.05) caps the probe at that share of the training
FLOPs between two probes. Clean accuracy (one forward per image) runs on the whole split; PGD-10
costs about 21 forwards' worth per image (each step a forward and an input-gradient backward,
then the scoring forward), so it runs on the first `robust_n` images of a fixed, seeded order of
the split, as many as the budget pays for: all of them under PGD-AT's 10-step training, about a
quarter under FGSM-RS's, a few under ERM's. Fewer than MIN_ATTACKED (10) are not attacked at all
(unless trainer.select=best_val_robust asks for them): no flag reads a robust accuracy of so few
images, and on a small model each PGD step costs a fixed ~5 ms whatever the batch, so those few
would cost more than the FLOP budget says (measured at 8x8: 7.6% of ERM's training time). With a train-time attack
the attacked images are shared between the validation split and the trained sample (half each,
the validation split first when it is smaller). The counts are computed once, from the FLOPs of
the run's first training step, and kept in the checkpoint, so a resumed run probes the same images
(benchmarks/probe_cost.py measures the share in seconds).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from harness.attacks.base import attack_mode, parse_number
from harness.attacks.pgd import pgd_linf
from harness.backdoor.plan import PoisonPlan, split_labels, test_plan
from harness.core.locations import is_uri
from harness.core.device import autocast
from harness.data.loader import BatchTransform
from harness.data.shards import load_manifest
from harness.data.validation import ValidationSplit, empty_class_message, read_selected
from harness.train.batches import sync_buffers

PROBE_STEPS = 10
ROBUST_FORWARDS = 2 * PROBE_STEPS + 1  # an attacked image's cost in forwards (module doc)
DEFAULT_BUDGET = 0.05
MIN_ATTACKED = 10  # a PGD probe on fewer images is not run: no flag reads so few (trainer.flags.min_images: 10)
PROBE_BATCH = 128  # fixed (not the trainer's batch): the batches, hence the results, do not depend on W
_PROBE_TAG = 0x9208E
_TRAINED_BATCHES = 1 << 20  # the trained sample's batches draw their PGD starts from seeds of their own


def probe_every(tcfg: dict[str, Any]) -> int:
    """`trainer.probe_every` (default 1), checked: a whole number >= 1."""
    value = tcfg.get("probe_every", 1)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"trainer.probe_every={value!r} must be a whole number >= 1 (probe every N epochs, "
                         f"and always after the last); turn probes off with trainer.validation.fraction=0")
    return value


def probe_budget(tcfg: dict[str, Any]) -> float:
    """`trainer.probe_budget` (default 0.05), checked: the probe's share of training FLOPs, in [0, 1]."""
    value = tcfg.get("probe_budget", DEFAULT_BUDGET)
    budget = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else -1.0
    if not 0.0 <= budget <= 1.0:
        raise ValueError(f"trainer.probe_budget={value!r} must be a share of the training FLOPs in [0, 1] "
                         f"(0: clean accuracy only), e.g. trainer.probe_budget=0.05")
    return budget


def robust_count(budget: float, every: int, step_flops: float | None, forward_flops: float | None,
                 epoch_samples: int, n_val: int, triggered: bool, cap: int | None = None) -> int:
    """How many images (at most `cap`, default `n_val`) the PGD-10 probe can attack within `budget`
    of the training FLOPs of `every` epochs, after the clean pass over the `n_val` validation images
    (all `cap` when the FLOPs are unknown)."""
    cap = n_val if cap is None else cap
    if not step_flops or not forward_flops:
        return cap
    allowed = budget * every * step_flops * epoch_samples - n_val * forward_flops * (2 if triggered else 1)
    return int(min(cap, max(0.0, allowed // (ROBUST_FORWARDS * forward_flops))))


def share_attacked(total: int, n_val: int, n_trained: int) -> tuple[int, int]:
    """(validation, trained-sample) images of `total` attacked ones: half each, the rest to the other."""
    val = min(n_val, max(total - total // 2, total - n_trained))
    return val, min(n_trained, total - val)


def trained_sample(held: np.ndarray, trained: np.ndarray) -> np.ndarray:
    """For each held-out index, the first index training streams after it (wrapping), distinct,
    sorted: a fixed sample of trained images lying in the shards the validation read opens."""
    if len(trained) == 0:
        return np.zeros(0, dtype=np.int64)
    at = np.searchsorted(trained, held) % len(trained)
    return np.unique(trained[at]).astype(np.int64)


class ValidationProbe:
    """The validation images of this rank's probe batches, and the probe itself (module doc)."""

    def __init__(self, cfg: dict[str, Any], held: ValidationSplit, images: torch.Tensor, labels: torch.Tensor,
                 keys: torch.Tensor, device: torch.device, rank: int, world_size: int, num_classes: int,
                 precision: str, trained: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> None:
        self.held, self.device, self.rank, self.world_size = held, device, rank, world_size
        self.num_classes, self.precision, self.seed = num_classes, precision, int(cfg["seed"])
        self.every = probe_every(cfg["trainer"])
        self.eps = parse_number(cfg["data"].get("eps") or 0.0)
        self.budget = probe_budget(cfg["trainer"])
        self.selects_on_robust = str(cfg["trainer"].get("select") or "last") == "best_val_robust"
        self.robust_n: int | None = None  # set once: `size_robust`, or the checkpoint's
        self.trained_robust_n = 0  # trained-sample images PGD-10 attacks (a method with a train-time attack)
        self.order = np.random.default_rng(np.random.SeedSequence([self.seed & 0xFFFF_FFFF, _PROBE_TAG])
                                           ).permutation(held.size)  # robust subset: a seeded order's head
        self.transform = BatchTransform.from_args(cfg["data"].get("img_size"), None)
        self.poison: PoisonPlan | None = test_plan(cfg)
        starts = range(0, len(labels), PROBE_BATCH)
        self.batches = [(b, s, images[s:s + PROBE_BATCH], labels[s:s + PROBE_BATCH], keys[s:s + PROBE_BATCH])
                        for b, s in enumerate(starts) if b % world_size == rank]
        self.robust_mask = torch.zeros(held.size, dtype=torch.bool)
        t_images, t_labels, t_keys = trained if trained is not None else (images[:0], labels[:0], keys[:0])
        self.n_trained = int(len(t_labels))
        self.trained_batches = [(b, s, t_images[s:s + PROBE_BATCH], t_labels[s:s + PROBE_BATCH])
                                for b, s in enumerate(range(0, self.n_trained, PROBE_BATCH))
                                if (b + len(starts)) % world_size == rank]  # continue the round-robin
        self.trained_order = np.random.default_rng(np.random.SeedSequence(
            [self.seed & 0xFFFF_FFFF, _PROBE_TAG, 1])).permutation(self.n_trained)
        self.trained_mask = torch.zeros(self.n_trained, dtype=torch.bool)

    def size_robust(self, step_flops: float | None, forward_flops: float | None, epoch_samples: int,
                    train_attack: bool) -> tuple[int, int]:
        """Fix the attacked counts from the training step's FLOPs (module doc); returns
        (validation, trained sample). `train_attack`: the method logs `train_robust_acc`."""
        capacity = self.held.size + (self.n_trained if train_attack and self.poison is None else 0)
        total = robust_count(self.budget, self.every, step_flops, forward_flops, epoch_samples,
                             self.held.size, self.poison is not None, cap=capacity)
        val, trained = share_attacked(total, self.held.size, capacity - self.held.size)
        if val < MIN_ATTACKED and not self.selects_on_robust:
            val = 0  # too few to inform any flag: not worth the probe's time (module doc)
        self.set_robust_n(val, trained if trained >= MIN_ATTACKED else 0)
        return val, trained

    def set_robust_n(self, n: int, trained: int = 0) -> None:
        self.robust_n, self.trained_robust_n = int(n), int(trained)
        self.robust_mask = torch.zeros(self.held.size, dtype=torch.bool)
        self.robust_mask[torch.from_numpy(self.order[: self.robust_n])] = True
        self.trained_mask = torch.zeros(self.n_trained, dtype=torch.bool)
        self.trained_mask[torch.from_numpy(self.trained_order[: self.trained_robust_n])] = True

    @classmethod
    def load(cls, cfg: dict[str, Any], held: ValidationSplit, device: torch.device, rank: int, world_size: int,
             precision: str, trained: np.ndarray | None = None) -> "ValidationProbe":
        """Read the validation images and the trained sample (`trained`: the split indices training
        streams; this rank's share of their shards, then gathered on every rank), in split-index
        order; refuse a split that takes a whole class out of training."""
        data = cfg["data"]
        sample = trained_sample(held.indices, np.asarray(trained, dtype=np.int64)) if trained is not None \
            else np.zeros(0, dtype=np.int64)
        wanted = np.union1d(held.indices, sample)
        part = read_selected(data["dir"], "train", wanted, rank, world_size, limit=data.get("train_limit"),
                             cache_dir=data.get("cache"))
        if world_size > 1:
            parts: list[Any] = [None] * world_size
            dist.all_gather_object(parts, part)
            part = tuple(torch.cat([p[i] for p in parts]) for i in range(3))
        images, labels, keys = part
        order = torch.argsort(keys)
        images, labels, keys = images[order], labels[order], keys[order]
        if not torch.equal(keys, torch.from_numpy(wanted)):
            raise RuntimeError(f"the validation read gave {len(keys)} samples where {len(wanted)} were asked for")
        is_held = torch.from_numpy(np.isin(wanted, held.indices))
        manifest = load_manifest(data["dir"])
        _refuse_emptied_class(_train_label_counts(data, manifest), labels[is_held], held)
        return cls(cfg, held, images[is_held], labels[is_held], keys[is_held], device, rank, world_size,
                   int(manifest["num_classes"]), precision,
                   trained=(images[~is_held], labels[~is_held], keys[~is_held]))

    def due(self, epoch: int, epochs: int) -> bool:
        """Probe after this epoch: every `probe_every` epochs and always after the last."""
        return (epoch + 1) % self.every == 0 or epoch == epochs - 1

    def run(self, model: nn.Module, module: nn.Module, epoch: int) -> dict[str, float]:
        """Probe `model` (the evaluated classifier, part of `module`) after `epoch`; every rank
        returns the same numbers. Keys: val_n, val_clean_acc, val_top_class(_share), and
        val_robust_acc (clean cells) or val_asr (backdoor cells), probe_seconds."""
        t0 = time.perf_counter()
        if dist.is_available() and dist.is_initialized():
            sync_buffers(module)  # every rank probes rank 0's BatchNorm statistics, as the checkpoint holds
        k = self.num_classes
        counts = torch.zeros(5 + k, dtype=torch.float64)  # clean, robust, asr hits, asr images, trained PGD, preds
        if self.robust_n is None:
            self.set_robust_n(self.held.size)  # no FLOP count: every validation image
        with attack_mode(model), autocast(self.device, self.precision):
            for batch, start, x8, y, keys in self.batches:
                counts[:4] += self._batch(model, batch, epoch, x8, y, keys, self.robust_mask[start:start + len(y)],
                                          counts[5:])
            for batch, start, x8, y in self.trained_batches:
                chosen = self.trained_mask[start:start + len(y)]
                if bool(chosen.any()):
                    x = self.transform(x8[chosen].float().div_(255.0), torch.Generator()).to(self.device)
                    yc = y[chosen].to(self.device)
                    with torch.no_grad():
                        correct = model(x).argmax(1) == yc
                    counts[4] += float(self._robust(model, x[correct], yc[correct], _TRAINED_BATCHES + batch, epoch).sum())
        if self.world_size > 1:
            reduce_on = counts.to(self.device) if self.device.type == "cuda" else counts
            dist.all_reduce(reduce_on)
            counts = reduce_on.cpu()
        n = self.held.size
        hist = counts[5:]
        out = {"val_n": float(n), "val_clean_acc": float(counts[0]) / n,
               "val_top_class": float(int(hist.argmax())), "val_top_class_share": float(hist.max()) / n}
        if self.poison is None and self.robust_n:
            out["val_robust_acc"] = float(counts[1]) / self.robust_n
            out["val_robust_n"] = float(self.robust_n)
        if self.poison is None and self.trained_robust_n:
            out["train_pgd_acc"] = float(counts[4]) / self.trained_robust_n
            out["train_pgd_n"] = float(self.trained_robust_n)
        elif self.poison is not None:
            out["val_asr"] = float(counts[2]) / max(float(counts[3]), 1.0)
        out["probe_seconds"] = time.perf_counter() - t0
        return out

    def _batch(self, model: nn.Module, batch: int, epoch: int, x8: torch.Tensor, y: torch.Tensor,
               keys: torch.Tensor, attacked: torch.Tensor, predictions: torch.Tensor) -> torch.Tensor:
        """Counts of one probe batch (clean, robust, ASR hits, ASR images), float64 on the CPU;
        its predictions per class are added to `predictions`."""
        out = torch.zeros(4, dtype=torch.float64)
        x = self.transform(x8.float().div_(255.0), torch.Generator()).to(self.device)
        y = y.to(self.device)
        with torch.no_grad():
            pred = model(x).argmax(1)
        correct = pred == y
        out[0] = float(correct.sum())
        predictions += torch.bincount(pred.cpu(), minlength=self.num_classes)[: self.num_classes].double()
        if self.poison is None:
            chosen = correct & attacked.to(self.device)  # robust: in the attacked subset, correct, still correct
            out[1] = float(self._robust(model, x[chosen], y[chosen], batch, epoch).sum())
            return out
        keep = y != self.poison.poison.target
        if bool(keep.any()):
            xt, _ = self.poison(x8.float().div_(255.0), y.cpu(), keys.numpy())
            xt = self.transform(xt, torch.Generator()).to(self.device)
            with torch.no_grad():
                hits = model(xt[keep]).argmax(1) == self.poison.poison.target
            out[2], out[3] = float(hits.sum()), float(keep.sum())
        return out

    def _robust(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int, epoch: int) -> torch.Tensor:
        """Which of the (clean-correct) points stay correct under PGD-10 at eps, step eps/4."""
        if x.shape[0] == 0 or self.eps <= 0:
            return torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        gen = torch.Generator().manual_seed(_batch_seed(self.seed, epoch, batch))
        noise = (torch.rand(x.shape, generator=gen, dtype=torch.float32) * 2 - 1).to(x.device, x.dtype) * self.eps
        x_adv = pgd_linf(model, x, y, eps=self.eps, step_size=self.eps / 4, steps=PROBE_STEPS,
                         loss_fn=F.cross_entropy, init=lambda z: z + noise)
        with torch.no_grad():
            return model(x_adv).argmax(1) == y


def _batch_seed(seed: int, epoch: int, batch: int) -> int:
    ss = np.random.SeedSequence([int(seed) & 0xFFFF_FFFF, int(epoch), _PROBE_TAG, int(batch)])
    return int(ss.generate_state(1, dtype=np.uint64)[0] >> 1)


def _train_label_counts(data: dict[str, Any], manifest: dict[str, Any]) -> list[int] | None:
    """Images per class of the training split the validation is carved from: the manifest's counts
    (no label read), or with data.train_limit the limited split's labels when the data is local."""
    limit = data.get("train_limit")
    if limit is None:
        return manifest["splits"]["train"].get("label_counts")
    if is_uri(str(data["dir"])):
        return None  # counted by the preflight where it can read labels; not worth a full remote read here
    labels = split_labels(Path(data["dir"]), "train")[: int(limit)]
    return np.bincount(labels, minlength=int(manifest["num_classes"])).tolist()


def _refuse_emptied_class(label_counts: list[int] | None, held_labels: torch.Tensor, held: ValidationSplit) -> None:
    if not label_counts:
        return
    held_counts = torch.bincount(held_labels, minlength=len(label_counts)).tolist()
    emptied = [(c, int(n)) for c, n in enumerate(label_counts) if n > 0 and held_counts[c] >= n]
    if emptied:
        raise ValueError(empty_class_message(emptied, held))
