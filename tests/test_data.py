"""Tests for harness.data: shard preparation, manifest checks and the rank/worker-exact loader."""
from __future__ import annotations

import io
import pickle
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from harness.data.loader import make_loader, split_count
from harness.data.prepare import prepare_cifar10, prepare_digits
from harness.data.shards import DataError, dataset_sha256, decode_png, load_manifest, verify_shards
from harness.core.registry import DATASETS


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepare_digits(tmp_path_factory.mktemp("data"))


def _copy(dataset_dir: Path, tmp_path: Path) -> Path:
    """A private copy of a dataset, for tests that damage it."""
    return Path(shutil.copytree(dataset_dir, tmp_path / dataset_dir.name))


def _read_split(dataset_dir: Path, split: str) -> dict[str, tuple[np.ndarray, int]]:
    """All samples of a split, decoded straight from the shards with webdataset."""
    manifest = load_manifest(dataset_dir)
    out = {}
    for shard in manifest["splits"][split]["shards"]:
        with open(dataset_dir / shard["file"], "rb") as f:
            files = wds.tariterators.tar_file_expander([{"url": shard["file"], "stream": f}])
            for s in wds.tariterators.group_by_keys(files):
                out[s["__key__"]] = (decode_png(s["png"]), int(s["cls"]))
    return out


def _epoch_keys(dataset_dir: Path, world_size: int, num_workers: int, **kw) -> list[list[str]]:
    """Keys seen by each rank in one epoch, in order."""
    out = []
    for rank in range(world_size):
        loader = make_loader(
            dataset_dir, "train", 50, rank=rank, world_size=world_size,
            num_workers=num_workers, return_keys=True, **kw,
        )
        out.append([k for _, _, keys in loader for k in keys])
    return out


# --- digits preparation -------------------------------------------------------------------


def test_digits_manifest_and_counts(digits_dir: Path) -> None:
    m = load_manifest(digits_dir)
    assert m["name"] == "digits" and m["format_version"] == 2
    assert m["num_classes"] == 10 and m["class_names"] == [str(c) for c in range(10)]
    assert m["channels"] == 1 and m["image_size"] == [8, 8]
    assert m["splits"]["test"]["count"] == 360
    assert m["splits"]["train"]["count"] + m["splits"]["test"]["count"] == 1797
    assert [s["count"] for s in m["splits"]["train"]["shards"]] == [64] * 22 + [29]
    assert [s["file"] for s in m["splits"]["train"]["shards"]][:2] == ["train-000000.tar", "train-000001.tar"]
    assert sum(m["splits"]["train"]["label_counts"]) == 1437 and min(m["splits"]["train"]["label_counts"]) > 0
    assert "random_state=0" in m["split_rule"] and "stratify" in m["split_rule"]
    assert 0.0 < m["mean"][0] < 1.0 and 0.0 < m["std"][0] < 1.0
    verify_shards(digits_dir, m)
    assert len(dataset_sha256(m)) == 64


def test_digits_lossless_roundtrip_and_split(digits_dir: Path) -> None:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    expected = np.round(d.images * 255 / 16).astype(np.uint8)
    _, test_idx = train_test_split(
        np.arange(1797), test_size=0.2, random_state=0, stratify=d.target
    )
    samples = _read_split(digits_dir, "test")
    assert sorted(samples) == [f"{i:06d}" for i in range(360)]
    for k, src in enumerate(np.sort(test_idx)):
        image, label = samples[f"{k:06d}"]
        assert image.dtype == np.uint8 and image.shape == (8, 8)
        np.testing.assert_array_equal(image, expected[src])
        assert label == d.target[src]
    train = _read_split(digits_dir, "train")
    images = np.stack([v[0] for v in train.values()]).astype(np.float64) / 255
    assert load_manifest(digits_dir)["mean"][0] == pytest.approx(images.mean())
    assert load_manifest(digits_dir)["std"][0] == pytest.approx(images.std())


def test_digits_prepare_is_deterministic_and_idempotent(digits_dir: Path, tmp_path: Path) -> None:
    again = prepare_digits(tmp_path)
    assert load_manifest(again) == load_manifest(digits_dir)
    for shard in load_manifest(again)["splits"]["train"]["shards"]:
        assert (again / shard["file"]).read_bytes() == (digits_dir / shard["file"]).read_bytes()
    stamp = (again / "manifest.json").stat().st_mtime_ns
    assert prepare_digits(tmp_path) == again
    assert (again / "manifest.json").stat().st_mtime_ns == stamp  # no work the second time
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_prepare_repairs_a_corrupt_dataset(digits_dir: Path, tmp_path: Path) -> None:
    copy = _copy(digits_dir, tmp_path)
    (copy / "test-000000.tar").unlink()
    assert prepare_digits(tmp_path) == copy
    verify_shards(copy, load_manifest(copy))


def test_prepare_losing_a_concurrent_race_uses_the_winners_copy(
    digits_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two cells on one node preparing digits at once: the one whose rename comes second
    (target already there, not empty) keeps the winner's dataset instead of crashing."""
    import harness.data.shards as shards

    real_rename = shards.os.rename

    def winner_renames_first(src: str, dst: str) -> None:
        shutil.copytree(digits_dir, dst)  # the concurrent prepare finishes in between
        real_rename(src, dst)  # raises: the target exists and is not empty

    monkeypatch.setattr(shards.os, "rename", winner_renames_first)
    out = prepare_digits(tmp_path)
    assert out == tmp_path / "digits"
    verify_shards(out, load_manifest(out))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # loser's temp copy removed


def test_dataset_plugins_registered(tmp_path: Path) -> None:
    assert DATASETS.get("digits").needs_source is False
    cifar = DATASETS.get("cifar10")()
    assert DATASETS.get("cifar10").needs_source is True
    with pytest.raises(DataError, match="--source"):
        cifar.prepare(tmp_path, None)


# --- CIFAR-10 from a tiny archive in the official format ------------------------------------


def _tiny_cifar_archive(path: Path, per_batch: int = 20) -> dict[str, tuple[np.ndarray, list[int]]]:
    """Write a cifar-10-python.tar.gz lookalike; return {member: (data, labels)}."""
    rng = np.random.default_rng(123)
    members: dict[str, object] = {}
    batches = {}
    for i, name in enumerate([f"data_batch_{j}" for j in range(1, 6)] + ["test_batch"]):
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=per_batch)]
        batches[name] = (data, labels)
        members[name] = {
            b"batch_label": f"batch {i}".encode(),
            b"labels": labels,
            b"data": data,
            b"filenames": [f"img_{i}_{k}.png".encode() for k in range(per_batch)],
        }
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer",
             b"dog", b"frog", b"horse", b"ship", b"truck"]
    members["batches.meta"] = {b"label_names": names, b"num_cases_per_batch": per_batch,
                               b"num_vis": 3072}
    with tarfile.open(path, "w:gz") as tar:
        for name, obj in members.items():
            payload = pickle.dumps(obj, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return batches


def test_cifar10_conversion(tmp_path: Path) -> None:
    archive = tmp_path / "cifar-10-python.tar.gz"
    batches = _tiny_cifar_archive(archive)
    out = prepare_cifar10(archive, tmp_path / "data")
    m = load_manifest(out)
    assert m["splits"]["train"]["count"] == 100 and m["splits"]["test"]["count"] == 20
    assert m["channels"] == 3 and m["image_size"] == [32, 32] and m["class_names"][0] == "airplane"
    train = _read_split(out, "train")
    data = np.concatenate([batches[f"data_batch_{j}"][0] for j in range(1, 6)])
    labels = sum((batches[f"data_batch_{j}"][1] for j in range(1, 6)), [])
    rng = np.random.default_rng(0)
    for k in [0, 19, 20, 57, 99]:
        image, label = train[f"{k:06d}"]
        assert image.shape == (32, 32, 3) and label == labels[k]
        for c, i, j in rng.integers(0, [3, 32, 32], size=(20, 3)):
            assert image[i, j, c] == data[k, c * 1024 + i * 32 + j]
        np.testing.assert_array_equal(image, data[k].reshape(3, 32, 32).transpose(1, 2, 0))
    test = _read_split(out, "test")
    assert [test[f"{k:06d}"][1] for k in range(20)] == batches["test_batch"][1]
    x, y = next(iter(make_loader(out, "test", 20)))
    source = torch.from_numpy(batches["test_batch"][0][3].reshape(3, 32, 32))
    torch.testing.assert_close(x[3], source / 255.0)
    assert y.tolist() == batches["test_batch"][1]


def test_cifar10_missing_archive_and_member(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "cifar-10-python.tar.gz"
    with pytest.raises(DataError, match=str(missing)):
        prepare_cifar10(missing, tmp_path / "data")
    partial = tmp_path / "partial.tar.gz"
    with tarfile.open(partial, "w:gz") as tar:
        payload = pickle.dumps({b"label_names": [b"a"]})
        info = tarfile.TarInfo("cifar-10-batches-py/batches.meta")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    with pytest.raises(DataError, match="data_batch_1"):
        prepare_cifar10(partial, tmp_path / "data")
    assert not (tmp_path / "data" / "cifar10").exists()


# --- damaged datasets -----------------------------------------------------------------------


def test_missing_shard_raises(digits_dir: Path, tmp_path: Path) -> None:
    copy = _copy(digits_dir, tmp_path)
    (copy / "train-000001.tar").unlink()
    with pytest.raises(DataError, match="train-000001.tar") as err:
        make_loader(copy, "train", 32)
    assert "robustgrid data prepare digits" in str(err.value)
    make_loader(copy, "test", 32)  # other split unaffected


def test_corrupt_shard_raises(digits_dir: Path, tmp_path: Path) -> None:
    copy = _copy(digits_dir, tmp_path)
    shard = copy / "train-000002.tar"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="train-000002.tar"):
        make_loader(copy, "train", 32)
    with pytest.raises(DataError, match="train-000002.tar"):
        verify_shards(copy, load_manifest(copy))


def test_an_image_of_another_shape_than_the_manifest_is_named_before_training(digits_dir: Path, tmp_path: Path) -> None:
    """A shard re-packed with one RGB image (its manifest forged to match its bytes and hash): the
    per-node check and the loader name the shard and sample, not a bare torch.stack error mid-training
    (issue 24, item 4)."""
    import hashlib
    import json

    from harness.data.shards import content_sha256, encode_png

    copy = _copy(digits_dir, tmp_path)
    shard = copy / "train-000001.tar"
    out = io.BytesIO()
    with tarfile.open(shard) as src, tarfile.open(fileobj=out, mode="w") as dst:
        for member in src:
            data = src.extractfile(member).read()
            if member.name == "000070.png":
                data = encode_png(np.zeros((8, 8, 3), dtype=np.uint8))
                member.size = len(data)
            dst.addfile(member, io.BytesIO(data))
    shard.write_bytes(out.getvalue())
    manifest = json.loads((copy / "manifest.json").read_text())
    entry = next(e for e in manifest["splits"]["train"]["shards"] if e["file"] == shard.name)
    entry.update(size=len(out.getvalue()), sha256=hashlib.sha256(out.getvalue()).hexdigest())
    manifest["content_sha256"] = content_sha256(manifest)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"train-000001.tar: sample 000070 has 3 channel\(s\) of 8x8, the manifest "
                                        r"says 1 channel\(s\) of 8x8"):
        verify_shards(copy, load_manifest(copy))
    with pytest.raises(DataError, match="sample 000070 has 3 channel"):
        list(make_loader(copy, "train", 32))


def test_missing_or_invalid_manifest_raises(digits_dir: Path, tmp_path: Path) -> None:
    copy = _copy(digits_dir, tmp_path)
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="manifest.json"):
        load_manifest(copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(DataError, match="manifest.json"):
        make_loader(copy, "train", 32)


# --- loader semantics -----------------------------------------------------------------------


@pytest.mark.parametrize("world_size,num_workers", [(1, 0), (2, 0), (2, 2), (3, 1)])
def test_epoch_covers_split_exactly_once(
    digits_dir: Path, world_size: int, num_workers: int
) -> None:
    per_rank = _epoch_keys(digits_dir, world_size, num_workers, shuffle=True, seed=5, epoch=1)
    all_keys = [k for keys in per_rank for k in keys]
    assert sorted(all_keys) == [f"{i:06d}" for i in range(1437)]
    sizes = [len(keys) for keys in per_rank]
    assert max(sizes) - min(sizes) <= 64  # whole shards per rank: at most one shard apart
    assert sizes == [split_count(digits_dir, "train", r, world_size) for r in range(world_size)]


@pytest.mark.parametrize("world_size,num_workers", [(1, 2), (3, 1)])
def test_limit_takes_first_indices_exactly_once(
    digits_dir: Path, world_size: int, num_workers: int
) -> None:
    per_rank = _epoch_keys(digits_dir, world_size, num_workers, shuffle=True, limit=301)
    assert sorted(k for keys in per_rank for k in keys) == [f"{i:06d}" for i in range(301)]
    counts = [split_count(digits_dir, "train", r, world_size, limit=301) for r in range(world_size)]
    assert sum(counts) == 301 and counts == [len(keys) for keys in per_rank]


@pytest.mark.parametrize("world_size,num_workers", [(1, 0), (2, 1), (2, 2)])
def test_selection_reads_exactly_the_selected_samples(digits_dir: Path, world_size: int, num_workers: int,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A selection (ABL's isolated 1%, or the rest) streams exactly those indices once per epoch, the
    same counts every epoch, and never opens a shard that holds none of them."""
    import harness.data.loader as loader_module

    chosen = np.array([3, 70, 71, 400, 401, 402, 1436])  # shards 0, 1, 6 and the last (64 per shard)
    opened: list[int] = []
    real = loader_module.read_shard
    monkeypatch.setattr(loader_module, "read_shard", lambda loc, entry, start, *a, **k: opened.append(start)
                        or real(loc, entry, start, *a, **k))
    for epoch in (0, 1):
        per_rank = _epoch_keys(digits_dir, world_size, num_workers, shuffle=True, seed=2, epoch=epoch, select=chosen)
        assert sorted(k for keys in per_rank for k in keys) == [f"{i:06d}" for i in chosen]
        assert [len(k) for k in per_rank] == [split_count(digits_dir, "train", r, world_size, select=chosen)
                                              for r in range(world_size)]
    if num_workers == 0:  # (loader workers are other processes: the patch is not theirs)
        assert sorted(set(opened)) == [0, 64, 384, 1408]
    rest = np.setdiff1d(np.arange(1437), chosen)  # the complement: every other sample, once
    keys = _epoch_keys(digits_dir, 1, 0, shuffle=True, seed=2, select=rest)[0]
    assert sorted(keys) == [f"{i:06d}" for i in rest]
    x, y = next(iter(make_loader(digits_dir, "train", 7, select=chosen)))
    samples = _read_split(digits_dir, "train")
    for xi, yi, i in zip(x, y, chosen):  # the selected samples' own pixels and labels
        image, label = samples[f"{i:06d}"]
        assert int(yi) == label and torch.equal((xi * 255).round().to(torch.uint8).squeeze(0), torch.from_numpy(image))
    with pytest.raises(ValueError, match=r"indices in \[0, 1437\)"):
        make_loader(digits_dir, "train", 8, select=np.array([5, 1437]))


def test_worker_count_does_not_change_batches(digits_dir: Path) -> None:
    kw = dict(shuffle=True, seed=3, augment={"crop_padding": 2, "hflip": True}, limit=300)
    a = [(x, y) for x, y in make_loader(digits_dir, "train", 32, num_workers=0, **kw)]
    b = [(x, y) for x, y in make_loader(digits_dir, "train", 32, num_workers=2, **kw)]
    assert len(a) == len(b) == len(make_loader(digits_dir, "train", 32, limit=300)) == 10
    for (xa, ya), (xb, yb) in zip(a, b):
        torch.testing.assert_close(xa, xb)
        assert torch.equal(ya, yb)
    assert [len(y) for _, y in a] == [32] * 9 + [12]


def test_shuffle_determinism(digits_dir: Path) -> None:
    def order(**kw) -> list[str]:
        return _epoch_keys(digits_dir, 1, 0, **kw)[0]

    assert order(shuffle=True, seed=1, epoch=0) == order(shuffle=True, seed=1, epoch=0)
    assert order(shuffle=True, seed=1, epoch=0) != order(shuffle=True, seed=1, epoch=1)
    assert order(shuffle=True, seed=1, epoch=0) != order(shuffle=True, seed=2, epoch=0)
    assert order() == [f"{i:06d}" for i in range(1437)]


def test_batch_dtype_range_shape_and_labels(digits_dir: Path) -> None:
    samples = _read_split(digits_dir, "test")
    seen = 0
    for x, y, keys in make_loader(digits_dir, "test", 64, return_keys=True):
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.shape == (len(keys), 1, 8, 8) and 0.0 <= x.min() and x.max() <= 1.0
        for xi, yi, key in zip(x, y, keys):
            image, label = samples[key]
            torch.testing.assert_close(xi[0], torch.from_numpy(image).float() / 255)
            assert yi.item() == label
        seen += len(keys)
    assert seen == 360


def test_resize_and_augment(digits_dir: Path) -> None:
    x, _ = next(iter(make_loader(digits_dir, "train", 16, img_size=16)))
    assert x.shape == (16, 1, 16, 16) and 0.0 <= x.min() and x.max() <= 1.0
    aug = {"crop_padding": 2, "hflip": True}
    plain, _ = next(iter(make_loader(digits_dir, "train", 16, img_size=16)))
    x1, _ = next(iter(make_loader(digits_dir, "train", 16, img_size=16, augment=aug, seed=7)))
    x2, _ = next(iter(make_loader(digits_dir, "train", 16, img_size=16, augment=aug, seed=7)))
    assert x1.shape == plain.shape and 0.0 <= x1.min() and x1.max() <= 1.0
    assert torch.equal(x1, x2)  # reproducible from the seed
    assert not torch.equal(x1, plain)  # and actually applied
    with pytest.raises(ValueError, match="unknown augment"):
        make_loader(digits_dir, "train", 16, augment={"rotate": 10})


def test_cutout_zeroes_one_square_per_sample_in_every_channel() -> None:
    """Cutout as DeVries & Taylor's code (ABL's fine-tuning: 1 hole, length 3): a centre uniform
    over the image, rows and columns c - 1 .. c (2 x 2), clipped at the border, seeded."""
    from harness.data.loader import BatchTransform

    transform = BatchTransform.from_args(None, {"cutout": {"holes": 1, "length": 3}})
    x = torch.rand(512, 3, 8, 8) + 0.5  # no pixel is zero before
    out = transform(x, torch.Generator().manual_seed(0))
    zero = out == 0
    assert torch.equal(zero[:, 0], zero[:, 1]) and torch.equal(zero[:, 0], zero[:, 2])  # every channel
    sizes = zero[:, 0].flatten(1).sum(1)
    assert set(sizes.tolist()) == {1, 2, 4}  # 2 x 2 inside; cut to 2 x 1 or 1 x 1 at the top/left border
    assert (sizes == 4).float().mean() > 0.6  # centres 1..7 of 0..7 in both axes: 49 / 64 inside
    for i in range(len(x)):
        rows, cols = zero[i, 0].nonzero(as_tuple=True)
        assert rows.max() - rows.min() <= 1 and cols.max() - cols.min() <= 1  # one contiguous square
    assert torch.equal(torch.where(zero, 0.0, x), out)  # the rest untouched
    assert torch.equal(out, transform(x, torch.Generator().manual_seed(0)))  # reproducible from the seed
    centres = torch.Generator().manual_seed(0)  # the documented draws: row centres, then column centres
    cy, cx = torch.randint(0, 8, (512,), generator=centres), torch.randint(0, 8, (512,), generator=centres)
    assert all(bool(zero[i, 0, cy[i] - 1 if cy[i] else 0, cx[i] - 1 if cx[i] else 0]) for i in range(512))
    assert BatchTransform.from_args(None, {"cutout": {"holes": 1, "length": 1}}).cutout is None  # zeroes nothing
    with pytest.raises(ValueError, match="augment.cutout must be"):
        BatchTransform.from_args(None, {"cutout": 3})


def test_cutout_runs_after_crop_and_flip_in_the_loader(digits_dir: Path) -> None:
    aug = {"crop_padding": 1, "hflip": True}
    kw = dict(shuffle=True, seed=5, limit=64)
    base, _ = next(iter(make_loader(digits_dir, "train", 64, augment=aug, **kw)))
    cut, _ = next(iter(make_loader(digits_dir, "train", 64, augment={**aug, "cutout": {"holes": 1, "length": 3}}, **kw)))
    changed = (base != cut).flatten(1).sum(1)
    assert torch.equal(torch.where(cut == 0, 0.0, base), cut)  # the same crop/flip draws, then squares zeroed
    assert (changed <= 4).all() and (changed > 0).any()


# --- cluster scale: shard partitioning, integrity once per node, bad input ---------------


def test_ranks_read_disjoint_shards_within_their_share(digits_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each rank opens only its own shards: disjoint, covering the split, <= 1/W + one shard of bytes."""
    from harness.data.location import DataLocation

    opened: list[str] = []
    real_open = DataLocation.open_stream

    def recording_open(self, name: str, version: str | None = None):
        opened.append(name)
        return real_open(self, name, version)

    monkeypatch.setattr(DataLocation, "open_stream", recording_open)
    shards = {s["file"]: s["size"] for s in load_manifest(digits_dir)["splits"]["train"]["shards"]}
    per_rank = []
    for rank in range(4):
        loader = make_loader(digits_dir, "train", 32, rank=rank, world_size=4, shuffle=True, seed=1, epoch=2,
                             return_keys=True)  # (the node's one-time full check happens here)
        opened.clear()
        keys = [k for _, _, b in loader for k in b]
        per_rank.append(set(opened))
        assert len(opened) == len(set(opened))  # no shard read twice
        assert sum(shards[f] for f in opened) <= sum(shards.values()) / 4 + max(shards.values())
        assert len(keys) == split_count(digits_dir, "train", rank, 4)
    assert set().union(*per_rank) == set(shards)
    assert sum(len(s) for s in per_rank) == len(shards)  # pairwise disjoint


def test_shard_order_changes_with_epoch_but_counts_do_not(digits_dir: Path) -> None:
    first = _epoch_keys(digits_dir, 2, 0, shuffle=True, seed=0, epoch=0)
    second = _epoch_keys(digits_dir, 2, 0, shuffle=True, seed=0, epoch=1)
    assert [len(k) for k in first] == [len(k) for k in second]
    assert set(first[0]) != set(second[0])  # the shards move between ranks from epoch to epoch


def test_more_readers_than_shards_fails_naming_both(digits_dir: Path) -> None:
    with pytest.raises(DataError, match=r"4 rank\(s\) x 2 loader worker\(s\) = 8 shard readers.*only 6 shard"):
        split_count(digits_dir, "test", 0, 4, num_workers=2)


def test_shards_are_hashed_once_per_node(digits_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import harness.data.integrity as integrity

    copy = _copy(digits_dir, tmp_path)
    make_loader(copy, "test", 32)  # first use on this node: full check, marker written

    def no_second_hash(*args, **kwargs):
        raise AssertionError("shards hashed again")

    monkeypatch.setattr(integrity, "_full_check", no_second_hash)
    for epoch in range(3):
        assert sum(len(y) for _, y in make_loader(copy, "test", 32, epoch=epoch)) == 360
    (copy / "test-000001.tar").write_bytes((copy / "test-000001.tar").read_bytes()[:-1000])
    with pytest.raises(DataError, match="test-000001.tar is truncated"):  # sizes are checked every time
        make_loader(copy, "test", 32)


def test_old_or_edited_manifest_is_refused(digits_dir: Path, tmp_path: Path) -> None:
    import json

    copy = _copy(digits_dir, tmp_path)
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "num_classes": 12}))
    with pytest.raises(DataError, match="edited"):
        load_manifest(copy)
    (copy / "manifest.json").write_text(json.dumps({**manifest, "format_version": 1}))
    with pytest.raises(DataError, match=r"format_version 1.*robustgrid data prepare digits --out"):
        load_manifest(copy)


def test_class_count_is_checked_against_the_labels(digits_dir: Path, tmp_path: Path) -> None:
    """A manifest whose class count disagrees with its shards' labels (re-hashed so it loads) is refused."""
    import json

    from harness.data.shards import content_sha256

    copy = _copy(digits_dir, tmp_path)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest.update(num_classes=12, class_names=[str(c) for c in range(12)])
    for entry in manifest["splits"].values():
        entry["label_counts"] = entry["label_counts"] + [0, 0]
    manifest["content_sha256"] = content_sha256(manifest)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="says 12 classes, but its train shards hold labels of 10"):
        make_loader(copy, "train", 32)
