"""GTSRB from its official archives: a tiny archive in the real format (per-class folders of .ppm with
GT-000NN.csv, the test zip and GT-final_test.csv) converted, resized to 32x32, and read back."""
from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from harness.core.registry import DATASETS
from harness.data.loader import make_loader
from harness.data.shards import DataError, load_manifest

HEADER = "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId\n"


def _ppm(rng: np.random.Generator, w: int, h: int) -> tuple[bytes, np.ndarray]:
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PPM")
    return buf.getvalue(), image


def _gtsrb(folder: Path, per_class: int = 1, test: int = 5, zipped_gt: bool = False) -> dict[str, list]:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    made: dict[str, list] = {"train": [], "test": []}
    with zipfile.ZipFile(folder / "GTSRB_Final_Training_Images.zip", "w") as z:
        for c in range(43):
            prefix = f"GTSRB/Final_Training/Images/{c:05d}/"
            rows = HEADER
            for i in range(per_class):
                w, h = 30 + i + c % 5, 33 + c % 3  # GTSRB's sizes vary (15..250 px)
                data, image = _ppm(rng, w, h)
                name = f"{i:05d}_{i:05d}.ppm"
                z.writestr(prefix + name, data)
                rows += f"{name};{w};{h};5;5;{w - 5};{h - 5};{c}\n"
                made["train"].append((image, c))
            z.writestr(prefix + f"GT-{c:05d}.csv", rows)
    rows = HEADER
    with zipfile.ZipFile(folder / "GTSRB_Final_Test_Images.zip", "w") as z:
        for i in range(test):
            data, image = _ppm(rng, 40, 37)
            z.writestr(f"GTSRB/Final_Test/Images/{i:05d}.ppm", data)
            label = (7 * i) % 43
            rows += f"{i:05d}.ppm;40;37;5;5;35;32;{label}\n"
            made["test"].append((image, label))
        z.writestr("GTSRB/Final_Test/Images/GT-final_test.test.csv", HEADER.replace(";ClassId", ""))
    if zipped_gt:
        with zipfile.ZipFile(folder / "GTSRB_Final_Test_GT.zip", "w") as z:
            z.writestr("GT-final_test.csv", rows)
    else:
        (folder / "GT-final_test.csv").write_text(rows)
    return made


def _resized(image: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize((32, 32), Image.BILINEAR))


@pytest.mark.parametrize("zipped_gt", [False, True])
def test_gtsrb_archives_convert_to_43_classes_at_32(tmp_path: Path, zipped_gt: bool) -> None:
    made = _gtsrb(tmp_path / "src", zipped_gt=zipped_gt)
    out = DATASETS.get("gtsrb")().prepare(tmp_path / "data", tmp_path / "src", samples_per_shard=16)
    m = load_manifest(out)
    assert m["num_classes"] == 43 and m["image_size"] == [32, 32] and m["channels"] == 3
    assert m["splits"]["train"]["count"] == 43 and m["splits"]["test"]["count"] == 5
    x, y = next(iter(make_loader(out, "test", 5)))
    assert y.tolist() == [label for _, label in made["test"]]  # GT-final_test.csv's order
    expected = np.stack([_resized(image) for image, _ in made["test"]])  # BackdoorBench: Resize((32, 32)) on PIL
    np.testing.assert_array_equal((x * 255).round().byte().permute(0, 2, 3, 1).numpy(), expected)
    x, y = next(iter(make_loader(out, "train", 43)))
    assert y.tolist() == list(range(43))  # class order, then CSV order
    np.testing.assert_array_equal((x[5] * 255).round().byte().permute(1, 2, 0).numpy(), _resized(made["train"][5][0]))


def test_gtsrb_missing_pieces_are_named(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _gtsrb(src)
    (src / "GT-final_test.csv").unlink()
    with pytest.raises(DataError, match="GT-final_test.csv"):
        DATASETS.get("gtsrb")().prepare(tmp_path / "data", src)
    with pytest.raises(DataError, match="GTSRB_Final_Training_Images.zip"):
        DATASETS.get("gtsrb")().prepare(tmp_path / "data", tmp_path / "empty")
    with zipfile.ZipFile(src / "GTSRB_Final_Training_Images.zip", "w") as z:  # class folders missing
        z.writestr("GTSRB/Final_Training/Images/00000/GT-00000.csv", HEADER)
    (src / "GT-final_test.csv").write_text(HEADER)
    with pytest.raises(DataError, match="lacks the class folder"):
        DATASETS.get("gtsrb")().prepare(tmp_path / "data", src)
