"""GTSRB (the German Traffic Sign Recognition Benchmark, 43 classes) from its official archives,
BackdoorBench's third dataset.

Source: a folder holding the files as distributed (and as torchvision's GTSRB reads them):
* GTSRB_Final_Training_Images.zip: GTSRB/Final_Training/Images/000NN/*.ppm, one folder per class
  00000..00042, each with GT-000NN.csv (`Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId`);
* GTSRB_Final_Test_Images.zip: GTSRB/Final_Test/Images/*.ppm;
* the test labels: GT-final_test.csv (same columns) beside them, or inside GTSRB_Final_Test_GT.zip.

As BackdoorBench (dataset/GTSRB.py, then transforms.Resize((32, 32)) on the PIL image): the whole
image, not its Roi box, resized to 32x32 with PIL's bilinear filter (`size` sets another side);
training samples in class order then CSV row order, test samples in GT-final_test.csv's order.
The archives are read in place (zipfile), nothing is extracted.
"""
from __future__ import annotations

import csv
import io
import re
import zipfile
from pathlib import Path, PurePosixPath
from typing import Iterator

import numpy as np
from PIL import Image

from harness.data.prepare import _final
from harness.data.shards import DataError, existing_dataset, write_dataset

NUM_CLASSES = 43
TRAIN_ZIP, TEST_ZIP, TEST_GT_ZIP, TEST_CSV = ("GTSRB_Final_Training_Images.zip", "GTSRB_Final_Test_Images.zip",
                                             "GTSRB_Final_Test_GT.zip", "GT-final_test.csv")


def _rows(data: bytes, where: str) -> list[tuple[str, int]]:
    """(Filename, ClassId) rows of a GTSRB annotation CSV (semicolon-separated, with a header)."""
    reader = csv.reader(io.StringIO(data.decode("utf-8-sig")), delimiter=";")
    header = next(reader, None)
    if not header or "Filename" not in header or "ClassId" not in header:
        raise DataError(f"{where} is not a GTSRB annotation file: expected a header with Filename and ClassId, "
                        f"got {header}")
    file_col, class_col = header.index("Filename"), header.index("ClassId")
    rows = []
    for row in reader:
        if row:
            label = int(row[class_col])
            if not 0 <= label < NUM_CLASSES:
                raise DataError(f"{where}: ClassId {label} outside 0..{NUM_CLASSES - 1} (row {row})")
            rows.append((row[file_col], label))
    return rows


def _image(data: bytes, size: int, where: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as pil:
            return np.asarray(pil.convert("RGB").resize((size, size), Image.BILINEAR)).copy()
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot decode GTSRB image {where} ({exc})") from None


def _open(folder: Path, name: str) -> zipfile.ZipFile:
    path = folder / name
    if not path.is_file():
        raise DataError(f"GTSRB file {path} does not exist; --source is the folder holding {TRAIN_ZIP}, "
                        f"{TEST_ZIP} and {TEST_CSV} (or {TEST_GT_ZIP}), as https://benchmark.ini.rub.de/ "
                        f"distributes them")
    try:
        return zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        raise DataError(f"{path} is not a readable zip archive ({exc})") from None


def _train_samples(folder: Path, size: int) -> Iterator[tuple[np.ndarray, int]]:
    with _open(folder, TRAIN_ZIP) as z:
        csvs = {m: PurePosixPath(m) for m in z.namelist() if re.fullmatch(r"GT-\d{5}\.csv", PurePosixPath(m).name)}
        by_class = {int(p.name[3:8]): m for m, p in csvs.items()}
        missing = sorted(set(range(NUM_CLASSES)) - set(by_class))
        if missing:
            raise DataError(f"{folder / TRAIN_ZIP} lacks the class folder(s) "
                            f"{', '.join(f'{c:05d}' for c in missing[:5])}{'...' if len(missing) > 5 else ''} "
                            f"(each 000NN/ with GT-000NN.csv)")
        for c in range(NUM_CLASSES):
            member = by_class[c]
            for filename, label in _rows(z.read(member), f"{TRAIN_ZIP}:{member}"):
                path = str(PurePosixPath(member).parent / filename)
                try:
                    data = z.read(path)
                except KeyError:
                    raise DataError(f"{TRAIN_ZIP}: {member} names {filename}, which the archive lacks") from None
                yield _image(data, size, f"{TRAIN_ZIP}:{path}"), label


def _test_labels(folder: Path) -> list[tuple[str, int]]:
    if (folder / TEST_CSV).is_file():
        return _rows((folder / TEST_CSV).read_bytes(), str(folder / TEST_CSV))
    if (folder / TEST_GT_ZIP).is_file():
        with _open(folder, TEST_GT_ZIP) as z:
            member = next((m for m in z.namelist() if PurePosixPath(m).name == TEST_CSV), None)
            if member is None:
                raise DataError(f"{folder / TEST_GT_ZIP} holds no {TEST_CSV}")
            return _rows(z.read(member), f"{TEST_GT_ZIP}:{member}")
    raise DataError(f"GTSRB test labels not found: put {TEST_CSV} (or {TEST_GT_ZIP}) in {folder}")


def _test_samples(folder: Path, size: int) -> Iterator[tuple[np.ndarray, int]]:
    rows = _test_labels(folder)
    with _open(folder, TEST_ZIP) as z:
        images = {PurePosixPath(m).name: m for m in z.namelist() if m.lower().endswith(".ppm")}
        for filename, label in rows:
            if filename not in images:
                raise DataError(f"{TEST_CSV} names {filename}, which {TEST_ZIP} lacks")
            yield _image(z.read(images[filename]), size, f"{TEST_ZIP}:{images[filename]}"), label


def prepare_gtsrb(folder: Path, out_root: Path | str, samples_per_shard: int = 1000, size: int = 32) -> Path | str:
    """GTSRB's official zips in `folder` -> `<out_root>/gtsrb` (size x size RGB, 43 classes)."""
    final = _final(out_root, "gtsrb")
    if existing_dataset(final):
        return final
    folder = Path(folder)
    if int(size) < 1:
        raise DataError(f"GTSRB size must be >= 1 pixel, got {size}")
    for name in (TRAIN_ZIP, TEST_ZIP):  # fail before any work
        _open(folder, name).close()
    _test_labels(folder)
    info = {"num_classes": NUM_CLASSES, "class_names": [f"{c:05d}" for c in range(NUM_CLASSES)], "channels": 3,
            "image_size": [int(size), int(size)],
            "source": f"GTSRB ({TRAIN_ZIP}, {TEST_ZIP}, {TEST_CSV})",
            "split_rule": f"official train (39209) / test (12630); whole images resized to {size}x{size} "
                          f"(PIL bilinear, as BackdoorBench), class then CSV order"}
    return write_dataset(out_root, "gtsrb", {"train": lambda: _train_samples(folder, int(size)),
                                             "test": lambda: _test_samples(folder, int(size))},
                         info, samples_per_shard)
