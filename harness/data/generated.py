"""Generated training data on the data side: where a generated set lives, the checks before work,
and the mixing of real and generated batches the trainer streams.

A generated set (harness/generate/generation.py writes it) is an ordinary dataset folder of this
layer's format (harness/data/shards.py: `train-NNNNNN.tar` + `manifest.json`) under
`<results_dir>/artifacts/generated/<key>/`, so `make_loader` streams it unchanged, each rank its
own shards. Its manifest is written last: a set without one (a generation still running, or
killed) is never read.

Mixing (`data.generated`, `data.generated_ratio`), as DM-Improves-AT's SemiSupervisedSampler: a
rank's batch of B holds int(B * ratio) generated and B - int(B * ratio) real images (the papers:
ratio 0.7), shuffled together; an epoch is ceil(N_real / global batch) steps (their
`num_batches = ceil(dataset_size / batch_size)` with dataset_size the real set's). Each epoch both
streams start a fresh pass, seeded from (seed, epoch) like every loader here, and a stream that
runs out starts its next pass (seeded by the pass number), so the batches are a function of
(seed, epoch, rank) alone: a resumed epoch is the uninterrupted one. The generated set is read
without replacement within a pass (theirs draws with replacement); with millions of generated
images an epoch reads only the first shards of its pass, a different set each epoch.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

from harness.core.errors import DataError
from harness.data.location import join
from harness.data.shards import load_manifest

GENERATED_REL = "artifacts/generated"
PASS_STRIDE = 1 << 20  # a stream's pass p of epoch e reads the loader's "epoch" e * PASS_STRIDE + p
_MIX_TAG = 7


def generated_location(results_dir: str, key: str) -> str:
    """The folder (or URI) of generated set `key` in a results store."""
    return join(str(results_dir), f"{GENERATED_REL}/{key}")


def generated_ratio(dcfg: dict[str, Any]) -> float:
    """`data.generated_ratio`, checked: in [0, 1) (a batch keeps at least its real part)."""
    try:
        ratio = float(dcfg.get("generated_ratio", 0.7))
    except (TypeError, ValueError):
        ratio = float("nan")
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"data.generated_ratio must be in [0, 1) (the generated share of each batch; the papers "
                         f"use 0.7), got {dcfg.get('generated_ratio')!r}. Fix: data.generated_ratio=0.7")
    return ratio


def check_generated_set(location: str, real: dict[str, Any], readers: int = 1,
                        img_size: int | None = None) -> dict[str, Any]:
    """The generated set's manifest, refused (DataError naming the fix) when it is missing (never
    generated there, or still being written), its classes or image shape differ from the real
    dataset's (or its image shape from the cell's), or it has fewer shards than `readers` (ranks x loader workers)."""
    try:
        manifest = load_manifest(location)
    except DataError as err:
        raise DataError(f"generated set {location} cannot be read ({str(err).splitlines()[0]}). Fix: pass "
                        f"data.generated=<settings> to generate it (a grid does so once), or the key of a set "
                        f"that is complete in this results_dir") from None
    if manifest["num_classes"] != real["num_classes"]:
        raise DataError(f"generated set {location} has {manifest['num_classes']} classes, the real dataset "
                        f"{real.get('name')} has {real['num_classes']}. Fix: use a set generated for "
                        f"{real.get('name')} (data.generated=<settings> generates one)")
    size = int(img_size or real["image_size"][0])
    if manifest["channels"] != real["channels"] or list(manifest["image_size"]) != [size, size]:
        raise DataError(f"generated set {location} holds {manifest['channels']}-channel "
                        f"{'x'.join(map(str, manifest['image_size']))} images, the cell trains on "
                        f"{real['channels']}-channel {size}x{size}. Fix: use a set generated for this "
                        f"dataset and data.img_size (data.generated=<settings> generates one)")
    shards = len(manifest["splits"]["train"]["shards"])
    if readers > shards:
        raise DataError(f"generated set {location} has {shards} shard(s), fewer than the {readers} readers "
                        f"(ranks x loader workers). Fix: generate with a smaller samples_per_shard or more "
                        f"per_class, or lower trainer.num_workers")
    return manifest


def shard_readers(world_size: int, num_workers: Any) -> int:
    """How many readers split a set's shards: ranks x loader workers (0 workers: the rank reads)."""
    return int(world_size) * max(1, int(num_workers or 0))


def mix_sizes(per_rank_batch: int, ratio: float) -> tuple[int, int]:
    """(real, generated) images of a rank's batch: int(B * ratio) generated, as the papers' sampler."""
    generated = int(per_rank_batch * ratio)
    return per_rank_batch - generated, generated


def mixed_steps(real_total: int, global_batch: int, drop_last: bool = False) -> int:
    """Steps of an epoch with generated data: ceil(real images / global batch), as the papers;
    floor with `trainer.drop_last` (full batches only), which needs one full batch of real images."""
    if drop_last:
        if int(real_total) < int(global_batch):
            raise ValueError(f"trainer.drop_last: {real_total} real images are fewer than one global batch of "
                             f"{global_batch}; lower trainer.batch_size or set trainer.drop_last=false")
        return int(real_total) // int(global_batch)
    return max(1, -(-int(real_total) // int(global_batch)))


def _cycle(make_pass: Callable[[int], Iterable[tuple]], epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of pass 0, 1, ... of a stream (each pass a fresh loader seeded by (epoch, pass))."""
    p = 0
    while True:
        empty = True
        for batch in make_pass(epoch * PASS_STRIDE + p):
            empty = False
            yield batch[0], batch[1]
        if empty:
            raise DataError("a training stream gave no samples in a whole pass")
        p += 1


def _take(stream: Iterator[tuple[torch.Tensor, torch.Tensor]], n: int, held: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Exactly n samples from a stream of batches, keeping what is left for the next call in `held`."""
    xs, ys, have = [], [], 0
    while have < n:
        if held:
            x, y = held.pop()
        else:
            x, y = next(stream)
        need = n - have
        if len(y) > need:
            held.append((x[need:], y[need:]))
            x, y = x[:need], y[:need]
        xs.append(x)
        ys.append(y)
        have += len(y)
    return torch.cat(xs), torch.cat(ys)


def mixed_batches(real_pass: Callable[[int], Iterable[tuple]], generated_pass: Callable[[int], Iterable[tuple]] | None,
                  steps: int, n_real: int, n_generated: int, *, seed: int, epoch: int, rank: int
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """`steps` batches of n_real real + n_generated generated images, shuffled together.

    `real_pass(e)` / `generated_pass(e)`: one pass of a stream as a loader seeded with epoch `e`
    (the trainer's make_loader with this rank's batch size for that part)."""
    real = _cycle(real_pass, epoch)
    gen = _cycle(generated_pass, epoch) if n_generated else None
    held_real: list = []
    held_gen: list = []
    for step in range(steps):
        x, y = _take(real, n_real, held_real)
        if gen is not None:
            xg, yg = _take(gen, n_generated, held_gen)
            x, y = torch.cat([x, xg]), torch.cat([y, yg])
        ss = np.random.SeedSequence([int(seed) & (2**64 - 1), int(epoch), _MIX_TAG, int(rank), step])
        order = torch.from_numpy(np.random.default_rng(ss).permutation(len(y)))
        yield x[order], y[order]
