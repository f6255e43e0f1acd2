"""The loading pipeline: WebDataset shards -> float batches, split exactly across ranks and workers.

Guarantee (for any number of shards, ranks and workers; see `_EpochPlan`):

* One epoch over `n` samples (`n` = split count, or `limit` when smaller: then the samples with
  indices `0..limit-1`) is a permutation `order` of those indices: the identity when
  `shuffle=False`, otherwise a uniform permutation drawn from `(seed, epoch)` only.
* Rank `r` of `W` gets `order[r::W]` (like torch's DistributedSampler, without padding), so
  the ranks together see every sample exactly once and rank sizes differ by at most one.
* Each rank's sequence is cut into batches of `batch_size`; only its last batch may be short
  (no drop_last). Batch `b` is built by loader worker `b % num_workers`, and the DataLoader
  returns worker outputs round-robin, so a rank's batches (contents, order, augmentation) are
  identical whatever `num_workers` is. Augmentation randomness is seeded per batch from
  `(seed, epoch, rank, batch index)`, which pins it to the (rank, worker) that builds it.

Every reader walks only the shards holding its samples and keeps just those (by key), holding
early arrivals in memory until their turn: at most its share of the encoded split.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from harness.data.shards import DataError, decode_png, load_manifest, prepare_hint, verify_shards

_ORDER_TAG = 0  # separate seed streams: epoch order vs. augmentation
_AUGMENT_TAG = 1
AUGMENT_KEYS = frozenset({"crop_padding", "hflip"})


def split_count(
    dataset_dir: Path, split: str, rank: int, world_size: int, limit: int | None = None
) -> int:
    """How many samples rank `rank` of `world_size` sees in one epoch of `split`."""
    _check_rank(rank, world_size)
    n = _limited_count(load_manifest(dataset_dir), dataset_dir, split, limit)
    return len(range(rank, n, world_size))


def make_loader(
    dataset_dir: Path,
    split: str,
    batch_size: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    shuffle: bool = False,
    seed: int = 0,
    epoch: int = 0,
    img_size: int | None = None,
    augment: dict | None = None,
    return_keys: bool = False,
    limit: int | None = None,
    poison: Callable[[torch.Tensor, torch.Tensor, np.ndarray], tuple[torch.Tensor, torch.Tensor]] | None = None,
    pin_memory: bool = False,
    prefetch_factor: int | None = None,
) -> Iterable:
    """A DataLoader over one epoch of `split` for this rank: batches `(x, y)` or `(x, y, keys)`.

    x: float32 (B, C, H, W) in [0, 1]; y: int64 (B,); keys: list of "%06d" split indices.
    Shards are hash-checked first, so a missing or corrupt shard raises DataError here.
    `poison(x, y, split indices) -> (x, y)` (harness.backdoor.plan) is applied to each decoded
    batch at native resolution, before resize and augmentation.
    `len(loader)` is this rank's number of batches. Make a new loader for each epoch.
    `pin_memory` / `prefetch_factor` (batches each worker keeps ready; workers only): for a CUDA
    trainer, so the copy to the GPU overlaps compute.
    """
    dataset_dir = Path(dataset_dir)
    _check_rank(rank, world_size)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if img_size is not None and img_size < 1:
        raise ValueError(f"img_size must be >= 1, got {img_size}")
    manifest = load_manifest(dataset_dir)
    n = _limited_count(manifest, dataset_dir, split, limit)
    verify_shards(dataset_dir, manifest, (split,))
    reader = ShardReader(
        dataset_dir=dataset_dir,
        shards=[(s["file"], s["count"]) for s in manifest["splits"][split]["shards"]],
        plan=_EpochPlan(n, rank, world_size, batch_size, shuffle, seed, epoch),
        transform=BatchTransform.from_args(img_size, augment),
        return_keys=return_keys,
        poison=poison,
    )
    prefetch = {"prefetch_factor": int(prefetch_factor)} if prefetch_factor and num_workers > 0 else {}
    return DataLoader(reader, batch_size=None, num_workers=num_workers, persistent_workers=False,
                      pin_memory=pin_memory, **prefetch)


@dataclass(frozen=True)
class _EpochPlan:
    """Which sample indices, in which batches, one rank reads in one epoch (see module doc)."""

    n: int
    rank: int
    world_size: int
    batch_size: int
    shuffle: bool
    seed: int
    epoch: int

    def rank_indices(self) -> np.ndarray:
        """This rank's indices in epoch order: `order[rank::world_size]`."""
        if self.shuffle:
            ss = np.random.SeedSequence([_u64(self.seed), _u64(self.epoch), _ORDER_TAG])
            order = np.random.default_rng(ss).permutation(self.n)
        else:
            order = np.arange(self.n)
        return order[self.rank :: self.world_size]

    def num_batches(self) -> int:
        return math.ceil(len(range(self.rank, self.n, self.world_size)) / self.batch_size)

    def worker_batches(self, worker: int, num_workers: int) -> list[tuple[int, np.ndarray]]:
        """`(batch index, indices)` for the batches built by loader worker `worker`."""
        idx = self.rank_indices()
        b, bs = self.batch_size, self.num_batches()
        return [(j, idx[j * b : (j + 1) * b]) for j in range(worker, bs, num_workers)]

    def augment_generator(self, batch_index: int) -> torch.Generator:
        ss = np.random.SeedSequence(
            [_u64(self.seed), _u64(self.epoch), self.rank, batch_index, _AUGMENT_TAG]
        )
        return torch.Generator().manual_seed(int(ss.generate_state(1, dtype=np.uint64)[0]))


@dataclass(frozen=True)
class BatchTransform:
    """Resize to `img_size` (bilinear) then random crop (zero padding) and horizontal flip."""

    img_size: int | None = None
    crop_padding: int = 0
    hflip: bool = False

    @classmethod
    def from_args(cls, img_size: int | None, augment: dict | None) -> "BatchTransform":
        augment = dict(augment or {})
        unknown = set(augment) - AUGMENT_KEYS
        if unknown:
            raise ValueError(
                f"unknown augment key(s) {sorted(unknown)}; known: {sorted(AUGMENT_KEYS)}"
            )
        crop = int(augment.get("crop_padding", 0) or 0)
        if crop < 0:
            raise ValueError(f"augment.crop_padding must be >= 0, got {crop}")
        return cls(img_size, crop, bool(augment.get("hflip", False)))

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        s = self.img_size
        if s is not None and tuple(x.shape[-2:]) != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=False)
            x = x.clamp_(0.0, 1.0)
        if self.crop_padding > 0:
            x = _random_crop(x, self.crop_padding, gen)
        if self.hflip:
            flip = torch.rand(x.shape[0], generator=gen) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return x


def _random_crop(x: torch.Tensor, pad: int, gen: torch.Generator) -> torch.Tensor:
    """Per-sample random (H, W) crop of `x` zero-padded by `pad` on every side."""
    b, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad)).permute(0, 2, 3, 1)  # B, H+2p, W+2p, C
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    rows = (oy[:, None] + torch.arange(h))[:, :, None]
    cols = (ox[:, None] + torch.arange(w))[:, None, :]
    out = padded[torch.arange(b)[:, None, None], rows, cols]  # B, H, W, C
    return out.permute(0, 3, 1, 2).contiguous()


class ShardReader(IterableDataset):
    """One rank's epoch as a webdataset pipeline, run by each DataLoader worker for its batches."""

    def __init__(
        self,
        dataset_dir: Path,
        shards: list[tuple[str, int]],
        plan: _EpochPlan,
        transform: BatchTransform,
        return_keys: bool,
        poison: Callable | None = None,
    ) -> None:
        super().__init__()
        self.poison = poison
        self.dataset_dir = Path(dataset_dir)
        self.shards = shards
        self.plan = plan
        self.transform = transform
        self.return_keys = return_keys

    def __len__(self) -> int:
        return self.plan.num_batches()

    def __iter__(self) -> Iterator[tuple]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        batches = self.plan.worker_batches(worker, workers)
        if not batches:
            return iter(())
        wanted = np.concatenate([idx for _, idx in batches])
        paths = [self.dataset_dir / f for f in self._shards_holding(wanted)]
        pipeline = wds.DataPipeline(
            lambda: _open_shards(paths),  # every reader walks the shards it needs
            wds.tariterators.tar_file_expander,  # = wds.tarfile_to_samples minus its opener,
            wds.tariterators.group_by_keys,  # which never closes the files it opens
            _in_order(wanted.tolist(), self.dataset_dir),
            wds.map(_decode_sample),
            _batched(batches, self.plan, self.transform, self.return_keys, self.poison),
        )
        return iter(pipeline)

    def _shards_holding(self, indices: np.ndarray) -> list[str]:
        """Shard files (in manifest order) that contain any of `indices`."""
        ends = np.cumsum([count for _, count in self.shards])
        used = set(np.searchsorted(ends, indices, side="right").tolist())
        return [self.shards[i][0] for i in sorted(used)]


def _open_shards(paths: list[Path]) -> Iterator[dict[str, Any]]:
    """Source stage: `{"url", "stream"}` per shard; each file is closed once it has been read."""
    for path in paths:
        with open(path, "rb") as stream:
            yield {"url": str(path), "stream": stream}


def _in_order(wanted: list[int], dataset_dir: Path) -> Callable[[Iterable[dict]], Iterator[dict]]:
    """Stage: keep samples whose index is in `wanted`, emit them in `wanted` order."""

    def stage(samples: Iterable[dict]) -> Iterator[dict]:
        position = {index: p for p, index in enumerate(wanted)}
        pending: dict[int, dict] = {}
        next_pos = 0
        for sample in samples:
            key = sample.get("__key__", "")
            if not key.isdigit():
                raise DataError(
                    f"shard {Path(sample.get('__url__', '?')).name} holds an entry with key "
                    f"{key!r} (expected 6-digit indices); {prepare_hint(dataset_dir)}"
                )
            p = position.get(int(key))
            if p is None:
                continue
            pending[p] = sample
            while next_pos in pending:
                yield pending.pop(next_pos)
                next_pos += 1
        if next_pos < len(wanted):
            raise DataError(
                f"sample {wanted[next_pos]:06d} was not found in the shards of {dataset_dir}; "
                f"{prepare_hint(dataset_dir)}"
            )

    return stage


def _decode_sample(sample: dict) -> tuple[torch.Tensor, int, str]:
    """Raw webdataset sample -> (uint8 C x H x W tensor, label, key)."""
    try:
        image = decode_png(sample["png"])
        label = int(sample["cls"])
    except Exception as exc:
        raise DataError(
            f"shard {Path(sample.get('__url__', '?')).name}: sample {sample.get('__key__')} "
            f"cannot be decoded ({exc!r})"
        ) from None
    image = image[None] if image.ndim == 2 else image.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(image)), label, sample["__key__"]


def _batched(
    batches: list[tuple[int, np.ndarray]],
    plan: _EpochPlan,
    transform: BatchTransform,
    return_keys: bool,
    poison: Callable | None = None,
) -> Callable[[Iterable[tuple]], Iterator[tuple]]:
    """Stage: group decoded samples into the planned batches, poison them if asked, transform."""

    def stage(samples: Iterable[tuple]) -> Iterator[tuple]:
        it = iter(samples)
        for batch_index, indices in batches:
            items = [next(it) for _ in range(len(indices))]
            x = torch.stack([image for image, _, _ in items]).to(torch.float32).div_(255.0)
            y = torch.tensor([label for _, label, _ in items], dtype=torch.int64)
            if poison is not None:
                x, y = poison(x, y, indices)
            x = transform(x, plan.augment_generator(batch_index))
            yield (x, y, [key for _, _, key in items]) if return_keys else (x, y)

    return stage


def _limited_count(
    manifest: dict[str, Any], dataset_dir: Path, split: str, limit: int | None
) -> int:
    """Samples of `split` an epoch covers: the split count, capped by `limit`."""
    entry = manifest["splits"].get(split)
    if entry is None:
        known = ", ".join(sorted(manifest["splits"])) or "(none)"
        raise DataError(f"dataset {dataset_dir} has no split '{split}' (it has: {known})")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    return entry["count"] if limit is None else min(limit, entry["count"])


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")


def _u64(value: int) -> int:
    """Map any int (also negative) to a non-negative seed word."""
    return int(value) & 0xFFFF_FFFF_FFFF_FFFF
