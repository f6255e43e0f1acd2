"""Each of the field's datasets converted from a tiny archive in its exact real format, then
trained for one epoch through the loader; plus the bad-input errors of folder trees."""
from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from architectures.presets import build_classifier
from harness.core.registry import DATASETS
from harness.data.loader import make_loader
from harness.data.shards import DataError, load_manifest


def _train_one_epoch(dataset_dir: Path | str, img_size: int | None = None) -> int:
    """One epoch of a tiny model over the train split; returns the samples seen."""
    m = load_manifest(dataset_dir)
    torch.manual_seed(0)
    size = img_size or m["image_size"][0]
    model = build_classifier({"name": "test_resnet", "kwargs": {}}, num_classes=m["num_classes"],
                             in_chans=m["channels"], img_size=size, mean=m["mean"], std=m["std"])
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    seen = 0
    for x, y in make_loader(dataset_dir, "train", 16, shuffle=True, img_size=img_size,
                            augment={"crop_padding": 2, "hflip": True}):
        loss = F.cross_entropy(model(x), y)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        seen += len(y)
    assert seen == m["splits"]["train"]["count"]
    return seen


def _png(rng: np.random.Generator, size: tuple[int, int], fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def test_cifar100_python_archive(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    archive = tmp_path / "cifar-100-python.tar.gz"
    members = {}
    for split, n in (("train", 200), ("test", 40)):
        labels = [i % 100 for i in range(n)]
        members[f"cifar-100-python/{split}"] = {
            b"filenames": [b"x.png"] * n, b"batch_label": b"b", b"fine_labels": labels,
            b"coarse_labels": [lab // 5 for lab in labels], b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8)}
    members["cifar-100-python/meta"] = {b"fine_label_names": [f"c{i}".encode() for i in range(100)],
                                        b"coarse_label_names": [f"s{i}".encode() for i in range(20)]}
    with tarfile.open(archive, "w:gz") as tar:
        for name, obj in members.items():
            payload = pickle.dumps(obj, protocol=2)
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    out = DATASETS.get("cifar100")().prepare(tmp_path / "data", archive, samples_per_shard=50)
    m = load_manifest(out)
    assert m["num_classes"] == 100 and m["class_names"][7] == "c7" and m["splits"]["test"]["count"] == 40
    x, y = next(iter(make_loader(out, "train", 3)))
    data = members["cifar-100-python/train"][b"data"]
    torch.testing.assert_close(x[2], torch.from_numpy(data[2].reshape(3, 32, 32)) / 255.0)
    assert y.tolist() == [0, 1, 2]
    assert _train_one_epoch(out) == 200


def test_svhn_mat_files(tmp_path: Path) -> None:
    from scipy.io import savemat

    rng = np.random.default_rng(1)
    src = tmp_path / "svhn"
    src.mkdir()
    for split, n in (("train", 60), ("test", 20)):
        y = (np.arange(n) % 10 + 1).reshape(-1, 1).astype(np.uint8)  # 1..10, 10 = digit 0
        savemat(src / f"{split}_32x32.mat", {"X": rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8), "y": y})
    out = DATASETS.get("svhn")().prepare(tmp_path / "data", src, samples_per_shard=20)
    _, y = next(iter(make_loader(out, "test", 20)))
    assert y.tolist() == [(i % 10 + 1) % 10 for i in range(20)]
    assert _train_one_epoch(out) == 60


def _tiny_imagenet(root: Path, classes: list[str], val_classes: list[str]) -> Path:
    rng = np.random.default_rng(2)
    top = root / "tiny-imagenet-200"
    (top / "val" / "images").mkdir(parents=True)
    (top / "wnids.txt").write_text("\n".join(classes) + "\n")
    for c in classes:
        (top / "train" / c / "images").mkdir(parents=True)
        (top / "train" / c / f"{c}_boxes.txt").write_text("")
        for i in range(6):
            (top / "train" / c / "images" / f"{c}_{i}.JPEG").write_bytes(_png(rng, (64, 64)))
    rows = []
    for i, c in enumerate(val_classes * 2):
        (top / "val" / "images" / f"val_{i}.JPEG").write_bytes(_png(rng, (64, 64)))
        rows.append(f"val_{i}.JPEG\t{c}\t0\t0\t63\t63")
    (top / "val" / "val_annotations.txt").write_text("\n".join(rows) + "\n")
    return top


def test_tiny_imagenet_layout(tmp_path: Path) -> None:
    classes = ["n01443537", "n01629819", "n01641577"]
    src = _tiny_imagenet(tmp_path, classes, classes)
    out = DATASETS.get("tinyimagenet")().prepare(tmp_path / "data", src, samples_per_shard=4)
    m = load_manifest(out)
    assert m["class_names"] == classes and m["image_size"] == [64, 64]
    assert m["splits"]["test"]["label_counts"] == [2, 2, 2]
    assert _train_one_epoch(out) == 18


def test_imagenet_tree_resized_and_class_mismatch(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    src = tmp_path / "imagenet"
    for split, n in (("train", 5), ("val", 2)):
        for c in ("n01440764", "n01443537"):
            (src / split / c).mkdir(parents=True)
            for i in range(n):
                size = (50 + 7 * i, 40 + 3 * i)  # ImageNet images come in any size
                (src / split / c / f"{c}_{i}.JPEG").write_bytes(_png(rng, size))
    with pytest.raises(DataError, match="--size"):
        DATASETS.get("imagefolder")().prepare(tmp_path / "data", src)
    out = DATASETS.get("imagenet")().prepare(tmp_path / "data", src, size=24, samples_per_shard=3)
    m = load_manifest(out)
    assert m["image_size"] == [24, 24] and m["num_classes"] == 2
    assert _train_one_epoch(out, img_size=16) == 10
    (src / "val" / "n99999999").mkdir()
    with pytest.raises(DataError, match="train has 2 classes, val has 3"):
        DATASETS.get("imagefolder")().prepare(tmp_path / "other", src, size=24)


def test_hugging_face_save_to_disk_and_parquet(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    rng = np.random.default_rng(4)

    def split(n: int) -> "datasets.Dataset":
        images = [Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)) for _ in range(n)]
        features = datasets.Features({"img": datasets.Image(),
                                      "label": datasets.ClassLabel(names=["cat", "dog", "emu"])})
        return datasets.Dataset.from_dict({"img": images, "label": [i % 3 for i in range(n)]}, features=features)

    dd = datasets.DatasetDict({"train": split(12), "test": split(6)})
    dd.save_to_disk(str(tmp_path / "saved"))
    out = DATASETS.get("hf")().prepare(tmp_path / "data", tmp_path / "saved", samples_per_shard=4)
    m = load_manifest(out)
    assert m["class_names"] == ["cat", "dog", "emu"] and m["image_size"] == [12, 12]
    x, _ = next(iter(make_loader(out, "train", 1)))
    expected = np.asarray(dd["train"][0]["img"].convert("RGB"))
    torch.testing.assert_close(x[0], torch.from_numpy(expected.transpose(2, 0, 1).copy()) / 255.0)
    assert _train_one_epoch(out) == 12
    (tmp_path / "pq" / "data").mkdir(parents=True)
    dd["train"].to_parquet(str(tmp_path / "pq" / "data" / "train-00000-of-00001.parquet"))
    dd["test"].to_parquet(str(tmp_path / "pq" / "data" / "test-00000-of-00001.parquet"))
    out_pq = DATASETS.get("hf")().prepare(tmp_path / "data2", tmp_path / "pq", samples_per_shard=4)
    assert load_manifest(out_pq)["splits"] == m["splits"]  # the same data, byte for byte
