"""The loading pipeline: shards -> float batches, each (rank, loader worker) reading its own shards.

Plan of one epoch (`EpochPlan`; `limit` first cuts the split to its samples `0..limit-1`, so
the shard holding sample `limit-1` is read up to there):

* Shard order. Full shards are permuted from `(seed, epoch)` (identity when `shuffle=False`);
  the partial shards (the split's tail and the one `limit` cuts) always come last, in order.
* Ranks. Rank `r` of `W` gets shards `order[r::W]`, so every sample is read exactly once per
  epoch across ranks, and each rank reads at most its 1/W share of the bytes plus one shard.
* Workers. A rank's shards are "blocks"; block `k` is read and decoded by loader worker
  `k % num_workers`, so each (rank, worker) reads a disjoint set of whole shards, at most its
  1/(W x workers) share plus one. `W x num_workers` above the shard count is an error.
* Selection. `select` (split indices, e.g. ABL's isolated 1% or the other 99%) keeps only those
  samples: a shard holding none of them is never opened, a shard is read up to its last selected
  sample and only the selected ones are decoded. Shards then keep their manifest order in every
  epoch (rank counts must not change from epoch to epoch, and selected shards are of all sizes);
  samples are still permuted within shards and through the shuffle buffer.
* Samples. Within a block, samples are permuted from `(seed, epoch, shard)`. The rank's main
  process takes the blocks in order `k = 0, 1, ...` (the DataLoader returns worker outputs
  round-robin) into a shuffle buffer of `shuffle_buffer` samples and draws each batch from it
  with a generator seeded by `(seed, epoch, rank)`; augmentation is seeded per batch from
  `(seed, epoch, rank, batch index)`. None of this depends on `num_workers`, so an epoch's
  batches (contents, order, augmentation) are the same whatever the worker count.

Exact-once versus equal sizes. Reading whole shards keeps I/O at 1/W, but rank sample counts
then differ by up to one shard (the tail shard, and `n_shards % W` ranks with one shard more).
We keep exact-once and make steps equal instead: `split_count` gives each rank's count (it does
not depend on the epoch, since partial shards are placed last), and the trainer's
`even_batches` cuts every rank's samples into the same number of steps (smaller batches on the
smaller ranks; at most one shard's worth of imbalance). At prepare time, choose
`--samples-per-shard` so the train split has many more shards than ranks x workers (e.g. >= 8
per reader, ~100-500 MB each for ImageNet): the imbalance is then a few percent.

Memory. A rank holds at most the shuffle buffer, one batch, and the decoded blocks in flight
(2 per worker, the DataLoader's prefetch): a bound set by shard size and `shuffle_buffer`,
flat as the split grows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from harness.data.integrity import dataset_version, manifest_shape, read_shard
from harness.data.location import DataLocation
from harness.data.shards import DataError, decode_png, load_manifest, prepare_hint, verify_shards

_ORDER_TAG = 0  # separate seed streams: shard order, augmentation, in-shard order, buffer draws
_AUGMENT_TAG = 1
_SHARD_TAG = 2
_BUFFER_TAG = 3
AUGMENT_KEYS = frozenset({"crop_padding", "hflip", "random_resized_crop", "cutout"})
DEFAULT_SHUFFLE_BUFFER = 4096


def split_count(
    dataset_dir: Path | str, split: str, rank: int, world_size: int, limit: int | None = None,
    num_workers: int = 0, select: np.ndarray | None = None,
) -> int:
    """How many samples rank `rank` of `world_size` sees in one epoch of `split` (any epoch).

    Raises DataError when `world_size x num_workers` readers exceed the split's shards.
    """
    _check_rank(rank, world_size)
    loc = DataLocation(dataset_dir)
    plan = _plan(load_manifest(loc), loc.uri, split, limit, rank, world_size, num_workers, False, 0, 0, select)
    return plan.rank_count()


def make_loader(
    dataset_dir: Path | str,
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
    poison: Callable[[torch.Tensor, torch.Tensor, np.ndarray, int, int], tuple[torch.Tensor, torch.Tensor]] | None = None,
    shuffle_buffer: int | None = None,
    cache_dir: str | None = None,
    pin_memory: bool = False,
    prefetch_factor: int | None = None,
    select: np.ndarray | None = None,
) -> "EpochLoader":
    """One epoch of `split` for this rank: batches `(x, y)` or `(x, y, keys)`.

    x: float32 (B, C, H, W) in [0, 1]; y: int64 (B,); keys: list of "%06d" split indices.
    Shards are checked first (sizes always, hashes once per node: harness.data.integrity), so a
    missing or corrupt shard raises DataError here. `dataset_dir` is a folder or a URI.
    `poison(x, y, split indices, rank, batch index) -> (x, y)` (harness.backdoor.plan) is applied
    to each decoded batch at native resolution, before resize and augmentation, in the rank's main
    process: like the batches, it does not depend on `num_workers`.
    `len(loader)` is this rank's number of batches. Make a new loader for each epoch.
    `pin_memory` / `prefetch_factor` (batches each worker keeps ready; workers only): for a CUDA
    trainer, so the copy to the GPU overlaps compute.
    `select`: only these split indices (module doc, "Selection").
    """
    _check_rank(rank, world_size)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if img_size is not None and img_size < 1:
        raise ValueError(f"img_size must be >= 1, got {img_size}")
    buffer = DEFAULT_SHUFFLE_BUFFER if shuffle_buffer is None else int(shuffle_buffer)
    if buffer < 0:
        raise ValueError(f"data.shuffle_buffer must be >= 0, got {buffer}")
    transform = BatchTransform.from_args(img_size, augment)
    loc = DataLocation(dataset_dir, cache_dir)
    manifest = load_manifest(loc)
    plan = _plan(manifest, loc.uri, split, limit, rank, world_size, num_workers, shuffle, seed, epoch, select)
    verify_shards(loc, manifest, (split,))
    source = BlockSource(loc, manifest["splits"][split]["shards"], plan, manifest["num_classes"],
                         dataset_version(manifest), manifest_shape(manifest))
    loader = EpochLoader(source, plan, batch_size, num_workers, buffer if shuffle else 0, transform,
                         return_keys, poison)
    loader.pin_memory, loader.prefetch_factor = pin_memory, prefetch_factor
    return loader


def _plan(manifest: dict[str, Any], where: str, split: str, limit: int | None, rank: int, world_size: int,
          num_workers: int, shuffle: bool, seed: int, epoch: int,
          select: np.ndarray | None = None) -> "EpochPlan":
    entry = manifest["splits"].get(split)
    if entry is None:
        known = ", ".join(sorted(manifest["splits"])) or "(none)"
        raise DataError(f"dataset {where} has no split '{split}' (it has: {known})")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    counts, left = [], entry["count"] if limit is None else min(int(limit), entry["count"])
    for shard in entry["shards"]:
        take = min(shard["count"], left)
        if take <= 0:
            break
        counts.append(take)
        left -= take
    starts = tuple(int(v) for v in np.cumsum([0, *counts])[:-1])
    selected = None if select is None else _selected_positions(select, counts, split, where)
    if selected is not None:
        counts = [len(positions) for positions in selected]
    readers = world_size * max(1, num_workers)
    if readers > sum(1 for c in counts if c > 0):
        raise DataError(
            f"{world_size} rank(s) x {max(1, num_workers)} loader worker(s) = {readers} shard readers, but "
            f"split '{split}' of {where} has only {sum(1 for c in counts if c > 0)} shard(s)"
            f"{' within the limit' if limit else ''}{' holding selected samples' if selected else ''}. "
            f"Fix: lower trainer.num_workers or the rank count, or re-prepare with a smaller "
            f"--samples-per-shard; {prepare_hint(where)}"
        )
    return EpochPlan(tuple(counts), starts, rank, world_size, shuffle, seed, epoch,
                     None if selected is None else tuple(selected))


def _selected_positions(select: np.ndarray, counts: list[int], split: str, where: str) -> list[np.ndarray]:
    """Per shard, the sorted positions (within the shard) of the selected split indices."""
    chosen = np.unique(np.asarray(select, dtype=np.int64))
    total = sum(counts)
    if len(chosen) == 0 or chosen[0] < 0 or chosen[-1] >= total:
        raise ValueError(f"a selection of split '{split}' of {where} must hold indices in [0, {total}), "
                         f"got {len(chosen)} index(es)"
                         + (f" from {chosen[0]} to {chosen[-1]}" if len(chosen) else ""))
    bounds = np.cumsum([0, *counts])
    return [chosen[(chosen >= lo) & (chosen < hi)] - lo for lo, hi in zip(bounds[:-1], bounds[1:])]


@dataclass(frozen=True)
class EpochPlan:
    """Which shards (and how many of their samples) one rank reads in one epoch (module doc)."""

    counts: tuple[int, ...]  # samples used from each shard, in manifest order
    shard_starts: tuple[int, ...]  # split index of each shard's first sample
    rank: int
    world_size: int
    shuffle: bool
    seed: int
    epoch: int
    selected: tuple[np.ndarray, ...] | None = None  # per shard: positions of the selected samples

    def positions(self, shard: int) -> np.ndarray:
        """Positions (within the shard) of the samples used from it, sorted."""
        return np.arange(self.counts[shard]) if self.selected is None else self.selected[shard]

    def shard_order(self) -> list[int]:
        if self.selected is not None:  # fixed: rank counts must not change between epochs
            return [i for i, c in enumerate(self.counts) if c > 0]
        full = max(self.counts)
        whole = [i for i, c in enumerate(self.counts) if c == full]
        partial = [i for i, c in enumerate(self.counts) if c != full]
        if self.shuffle:
            rng = np.random.default_rng(self._seed(_ORDER_TAG))
            whole = [whole[i] for i in rng.permutation(len(whole))]
        return whole + partial

    def rank_shards(self) -> list[int]:
        return self.shard_order()[self.rank :: self.world_size]

    def rank_count(self) -> int:
        return sum(self.counts[i] for i in self.rank_shards())

    def sample_order(self, shard: int) -> np.ndarray:
        """Order in which a block emits its shard's used samples (a permutation of `positions`)."""
        n = self.counts[shard]
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng(self._seed(_SHARD_TAG, shard)).permutation(n)

    def buffer_generator(self) -> np.random.Generator:
        return np.random.default_rng(self._seed(_BUFFER_TAG, self.rank))

    def augment_generator(self, batch_index: int) -> torch.Generator:
        ss = self._seed(_AUGMENT_TAG, self.rank, batch_index)
        return torch.Generator().manual_seed(int(ss.generate_state(1, dtype=np.uint64)[0]))

    def _seed(self, tag: int, *extra: int) -> np.random.SeedSequence:
        return np.random.SeedSequence([_u64(self.seed), _u64(self.epoch), tag, *extra])


class BlockSource(IterableDataset):
    """Blocks of one rank's epoch: `(block index, uint8 images, labels, split indices)` per shard.

    Run inside each DataLoader worker, it reads only the blocks `k % num_workers == worker`.
    """

    def __init__(self, loc: DataLocation, shards: list[dict[str, Any]], plan: EpochPlan, num_classes: int,
                 version: str, shape: tuple[int, int, int] | None = None) -> None:
        super().__init__()
        self.loc, self.shards, self.plan = loc, shards, plan
        self.num_classes, self.version, self.shape = num_classes, version, shape

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        blocks = self.plan.rank_shards()
        for k in range(worker, len(blocks), workers):
            yield (k, *self.read_block(blocks[k]))

    def read_block(self, shard: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Decode the used samples of one shard, in the plan's within-shard order."""
        start, entry = self.plan.shard_starts[shard], self.shards[shard]
        positions = self.plan.positions(shard)
        wanted = set((start + positions).tolist()) if self.plan.selected is not None else None
        end = start + int(positions[-1]) + 1  # the shard is read up to its last used sample
        images, labels = [], []
        stream = read_shard(self.loc, entry, start, self.num_classes, self.version, shape=self.shape)
        try:
            for index, png, label in stream:
                if index >= end:
                    break  # `limit` (or the selection) ends within this shard: the rest is never read
                if wanted is not None and index not in wanted:
                    continue  # not selected: never decoded
                images.append(_decode(png, entry["file"], index, self.loc))
                labels.append(label)
        finally:
            stream.close()
        order = self.plan.sample_order(shard)
        try:
            x = torch.from_numpy(np.stack(images)[order])
        except ValueError:
            raise DataError(f"shard {entry['file']} holds images of different shapes; "
                            f"{prepare_hint(self.loc.uri)}") from None
        y = torch.tensor(labels, dtype=torch.int64)[order]
        return x, y, torch.from_numpy(start + positions[order])


class EpochLoader:
    """Iterates one rank's batches: blocks (from workers) -> shuffle buffer -> batches -> transform.
    `pin_memory` / `prefetch_factor` (blocks each worker keeps ready): for a CUDA trainer, so the
    copy to the GPU overlaps compute."""

    pin_memory: bool = False
    prefetch_factor: int | None = None

    def __init__(self, source: BlockSource, plan: EpochPlan, batch_size: int, num_workers: int, buffer: int,
                 transform: "BatchTransform", return_keys: bool, poison: Callable | None) -> None:
        self.source, self.plan, self.batch_size, self.num_workers = source, plan, batch_size, num_workers
        self.buffer, self.transform, self.return_keys, self.poison = buffer, transform, return_keys, poison

    def __len__(self) -> int:
        return math.ceil(self.plan.rank_count() / self.batch_size)

    def blocks(self) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]:
        if self.num_workers == 0:
            return iter(self.source)
        prefetch = {"prefetch_factor": int(self.prefetch_factor)} if self.prefetch_factor else {}
        return iter(DataLoader(self.source, batch_size=None, num_workers=self.num_workers,
                               persistent_workers=False, **prefetch))

    def __iter__(self) -> Iterator[tuple]:
        pool = _SamplePool(self.buffer, self.plan.buffer_generator())
        batch_index = 0
        for expected, (k, x, y, idx) in enumerate(self.blocks()):
            if k != expected:  # the round-robin contract of DataLoader workers
                raise RuntimeError(f"loader blocks arrived out of order ({k} where {expected} was due)")
            pool.add(x, y, idx)
            while len(pool) >= self.buffer + self.batch_size:
                yield self._finish(pool.draw(self.batch_size), batch_index)
                batch_index += 1
        while len(pool):
            yield self._finish(pool.draw(min(self.batch_size, len(pool))), batch_index)
            batch_index += 1

    def _finish(self, batch: tuple[torch.Tensor, torch.Tensor, np.ndarray], batch_index: int) -> tuple:
        x8, y, idx = batch
        x = x8.to(torch.float32).div_(255.0)
        if self.poison is not None:
            x, y = self.poison(x, y, idx, self.plan.rank, batch_index)
        x = self.transform(x, self.plan.augment_generator(batch_index))
        if self.pin_memory:
            x, y = x.pin_memory(), y.pin_memory()
        return (x, y, [f"{i:06d}" for i in idx.tolist()]) if self.return_keys else (x, y)


class _SamplePool:
    """The shuffle buffer: samples drawn uniformly at random (swap-remove), or first-in first-out."""

    def __init__(self, buffer: int, rng: np.random.Generator) -> None:
        self.buffer, self.rng = buffer, rng
        self.items: list[tuple[torch.Tensor, int, int]] = []
        self.head = 0  # FIFO read position

    def __len__(self) -> int:
        return len(self.items) - self.head

    def add(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> None:
        if self.head:
            del self.items[: self.head]
            self.head = 0
        # a copy per sample, so a block's memory is freed once its last sample left the pool
        self.items.extend(zip((t.clone() for t in x.unbind(0)), y.tolist(), idx.tolist()))

    def draw(self, n: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        if self.buffer > 0:
            picked = []
            items = self.items
            for u in self.rng.random(n).tolist():  # one generator call per batch, not per sample
                j = int(u * len(items))
                items[j], items[-1] = items[-1], items[j]
                picked.append(items.pop())
        else:
            picked = self.items[self.head : self.head + n]
            self.head += n
        return (torch.stack([p[0] for p in picked]), torch.tensor([p[1] for p in picked], dtype=torch.int64),
                np.array([p[2] for p in picked], dtype=np.int64))


def _decode(png: bytes, shard: str, index: int, loc: DataLocation) -> np.ndarray:
    """PNG bytes -> uint8 C x H x W."""
    try:
        image = decode_png(png)
    except Exception as exc:
        raise DataError(f"shard {shard}: sample {index:06d} cannot be decoded ({exc!r}); "
                        f"{prepare_hint(loc.uri)}") from None
    return image[None] if image.ndim == 2 else image.transpose(2, 0, 1)


@dataclass(frozen=True)
class BatchTransform:
    """Random-resized-crop or resize to `img_size` (bilinear), then random crop (zero padding), flip,
    Cutout.

    `random_resized_crop: [min_scale, max_scale]` is the ImageNet recipe (area fraction in that
    range, aspect ratio in [3/4, 4/3], log-uniform), cropped per sample and resized to `img_size`.
    `cutout: {holes, length}` zeroes `holes` squares per sample, every channel, as the Cutout of
    DeVries & Taylor's code (ABL's fine-tuning uses holes 1, length 3): each centre uniform over
    the image, the square its rows and columns c - length//2 .. c + length//2 - 1, clipped to
    the image (so an odd length zeroes length - 1 pixels a side: 3 -> 2 x 2).
    """

    img_size: int | None = None
    crop_padding: int = 0
    hflip: bool = False
    rrc_scale: tuple[float, float] | None = None
    cutout: tuple[int, int] | None = None  # (holes, length)

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
        rrc = augment.get("random_resized_crop")
        if rrc is not None:
            rrc = tuple(float(v) for v in rrc)
            if len(rrc) != 2 or not 0.0 < rrc[0] <= rrc[1] <= 1.0:
                raise ValueError(f"augment.random_resized_crop must be [min_scale, max_scale] in (0, 1], got {rrc}")
        return cls(img_size, crop, bool(augment.get("hflip", False)), rrc, _cutout_setting(augment.get("cutout")))

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        s = self.img_size
        if self.rrc_scale is not None:
            x = _random_resized_crop(x, self.rrc_scale, s or x.shape[-1], gen)
        elif s is not None and tuple(x.shape[-2:]) != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=False)
            x = x.clamp_(0.0, 1.0)
        if self.crop_padding > 0:
            x = _random_crop(x, self.crop_padding, gen)
        if self.hflip:
            flip = torch.rand(x.shape[0], generator=gen) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        if self.cutout is not None:
            x = _cutout(x, *self.cutout, gen)
        return x


def _cutout_setting(value: Any) -> tuple[int, int] | None:
    """`augment.cutout` ({holes, length}; null: none) as (holes, length)."""
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) != {"holes", "length"}:
        raise ValueError(f"augment.cutout must be {{holes: <int>, length: <int>}} or null, got {value!r}")
    holes, length = int(value["holes"]), int(value["length"])
    if holes < 0 or length < 0:
        raise ValueError(f"augment.cutout holes and length must be >= 0, got {value!r}")
    return (holes, length) if holes and length >= 2 else None  # length 0 or 1 zeroes nothing


def _cutout(x: torch.Tensor, holes: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """Zero `holes` squares of side `length` per sample (BatchTransform's docstring); per hole the
    row centres of the batch are drawn first, then the column centres."""
    b, _, h, w = x.shape
    half = length // 2
    rows, cols = torch.arange(h), torch.arange(w)
    keep = torch.ones(b, h, w, dtype=x.dtype)
    for _ in range(holes):
        cy = torch.randint(0, h, (b,), generator=gen)[:, None]
        cx = torch.randint(0, w, (b,), generator=gen)[:, None]
        in_rows = (rows >= cy - half) & (rows < cy + half)  # B, H
        in_cols = (cols >= cx - half) & (cols < cx + half)  # B, W
        keep[in_rows[:, :, None] & in_cols[:, None, :]] = 0
    return x * keep[:, None]


def _random_resized_crop(x: torch.Tensor, scale: tuple[float, float], size: int,
                         gen: torch.Generator) -> torch.Tensor:
    """Per-sample crop of a random area fraction and aspect ratio, resized to size x size."""
    b, _, h, w = x.shape
    area = torch.empty(b).uniform_(scale[0], scale[1], generator=gen) * h * w
    ratio = torch.exp(torch.empty(b).uniform_(math.log(3 / 4), math.log(4 / 3), generator=gen))
    cw = torch.sqrt(area * ratio).round().clamp(1, w).long()
    ch = torch.sqrt(area / ratio).round().clamp(1, h).long()
    oy = (torch.rand(b, generator=gen) * (h - ch + 1)).long()
    ox = (torch.rand(b, generator=gen) * (w - cw + 1)).long()
    out = [F.interpolate(x[i : i + 1, :, oy[i] : oy[i] + ch[i], ox[i] : ox[i] + cw[i]], size=(size, size),
                         mode="bilinear", align_corners=False) for i in range(b)]
    return torch.cat(out).clamp_(0.0, 1.0)


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


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")


def _u64(value: int) -> int:
    """Map any int (also negative) to a non-negative seed word."""
    return int(value) & 0xFFFF_FFFF_FFFF_FFFF
