"""A generated set: N images per class sampled by many Ray tasks into whole WebDataset shards.

    generated set <key> = generator <key> x (per_class, sampler, steps, filter, seed, shard size)

Layout (harness/data/generated.py reads it with the ordinary loader): sample j of the set has
label j % num_classes (its conditioning class) and lives in shard j // samples_per_shard, key
"%06d" % j, `png` + `cls` as every dataset here. Each shard is made from its own seed
(seed, shard index), so a shard regenerated after a kill is the shard that was lost.

Work: the shards are split into tasks of `shards_per_task`; each task writes, per shard, the tar
and then a small `<shard>.json` record (size, sha256, label counts, pixel sums, the held-out
classifier's per-class hits, feature moments). A shard whose record exists is done: a killed or
partial run, run again, regenerates only the shards without one. When every record is there the
driver writes `summary.json` and then `manifest.json`, LAST: a set without its manifest is never
read. On Ray (a grid's artifact node runs inside a Ray task) the tasks are Ray tasks, one CPU (or
one GPU, when the cell's device is a GPU) each; outside Ray they run here one after another.

Quality, measured, not assumed (in the manifest's `generated` block and summary.json):
* `oracle_acc_per_class`: the accuracy of a held-out classifier (ACE's oracle SmallCNN, trained on
  the real train split, never used to generate or filter) on the generated images of each class;
* `fid_local`: the Fréchet distance between real-train and generated images in the penultimate
  features of a locally trained SmallCNN ("features"), with `fid_local_real_test` (real test vs
  real train) beside it as the floor. NOT comparable with Inception FID (no Inception weights).
The optional filter (`min_confidence` > 0, as the papers filter by a classifier's confidence)
keeps a candidate only when a third classifier ("filter", another seed) gives its conditioning
class at least that probability; candidates are drawn until the shard is full.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import webdataset as wds

from harness.data.generated import GENERATED_REL, generated_location
from harness.data.shards import FORMAT_VERSION, MANIFEST, content_sha256, encode_png, load_manifest, shard_name
from harness.eval.analysis.diffusion import DDPMConfig
from harness.generate.generator import SAMPLERS, Generator, ensure_generator, load_generator, sample
from harness.store.storage import open_store

SUMMARY = "summary.json"
MAX_FILTER_ROUNDS = 50
_TAR_MTIME = 0.0


@dataclass(frozen=True)
class GenerationConfig:
    """`data.generated` settings (all part of the set's key but `shards_per_task`)."""

    per_class: int = 100
    samples_per_shard: int = 256
    shards_per_task: int = 1  # how work is cut into Ray tasks: not part of the key
    sampler: str = "sde-dpmsolver++"
    sample_steps: int = 20
    batch_size: int = 256
    min_confidence: float = 0.0  # 0: no filter
    seed: int = 0
    generator: DDPMConfig = field(default_factory=DDPMConfig)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "GenerationConfig":
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown data.generated settings {sorted(unknown)}; known: {sorted(known)}")
        d["generator"] = DDPMConfig.from_dict(d.get("generator"))
        cfg = cls(**d)
        if cfg.per_class < 1 or cfg.samples_per_shard < 1 or cfg.shards_per_task < 1 or cfg.batch_size < 1:
            raise ValueError("data.generated: per_class, samples_per_shard, shards_per_task and batch_size must be >= 1")
        if cfg.sampler not in SAMPLERS:
            raise ValueError(f"data.generated.sampler '{cfg.sampler}' is not one of {', '.join(SAMPLERS)}")
        if cfg.sample_steps < 1:
            raise ValueError("data.generated.sample_steps must be >= 1")
        if not 0.0 <= cfg.min_confidence < 1.0:
            raise ValueError(f"data.generated.min_confidence must be in [0, 1) (0: no filter), got {cfg.min_confidence}")
        return cfg

    def keyed(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("shards_per_task")
        out.pop("generator")
        return out


@dataclass(frozen=True)
class GenerationSpec:
    """All a shard task needs (picklable): where, what, and from which generator."""

    data_dir: str
    results_dir: str
    img_size: int | None
    generator_key: str
    key: str
    num_classes: int
    cfg: GenerationConfig
    gpus: float = 0.0  # per shard task on Ray (the cell's resources.gpus, at most 1); not part of the key

    @property
    def total(self) -> int:
        return self.cfg.per_class * self.num_classes

    @property
    def n_shards(self) -> int:
        return math.ceil(self.total / self.cfg.samples_per_shard)

    @property
    def rel(self) -> str:
        return f"{GENERATED_REL}/{self.key}"

    def shard_range(self, index: int) -> range:
        start = index * self.cfg.samples_per_shard
        return range(start, min(self.total, start + self.cfg.samples_per_shard))


def set_key(generator_key: str, cfg: GenerationConfig) -> str:
    code = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]
    blob = json.dumps({"generator": generator_key, "set": cfg.keyed(), "code": code}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def plan_spec(data_dir: str, results_dir: str, img_size: int | None, cfg: GenerationConfig,
              gpus: float = 0.0) -> GenerationSpec:
    """The set's spec and key, from the real dataset's manifest (read once, no work)."""
    from harness.data.shards import dataset_sha256
    from harness.generate.generator import generator_key

    manifest = load_manifest(data_dir)
    size = int(img_size or manifest["image_size"][0])
    gkey = generator_key(dataset_sha256(manifest), cfg.generator, size)
    return GenerationSpec(str(data_dir), str(results_dir), img_size, gkey, set_key(gkey, cfg),
                          int(manifest["num_classes"]), cfg, min(1.0, float(gpus)))


# ------------------------------------------------------------------------------------- one shard

_MODELS: dict[tuple, Any] = {}  # per process: a task running several shards loads its models once


def _models(spec: GenerationSpec, device: torch.device) -> tuple[Generator, torch.nn.Module, torch.nn.Module,
                                                                 torch.nn.Module | None]:
    from harness.eval.analysis.aux_models import ensure_aux

    ident = (spec.results_dir, spec.generator_key, str(device), spec.cfg.min_confidence > 0)
    if ident not in _MODELS:
        aux = {role: ensure_aux(role, Path(spec.data_dir), Path(spec.results_dir), spec.img_size, device=device)[0]
               for role in ("oracle", "features") + (("filter",) if spec.cfg.min_confidence > 0 else ())}
        _MODELS.clear()
        _MODELS[ident] = (load_generator(spec.results_dir, spec.generator_key), aux["oracle"], aux["features"],
                          aux.get("filter"))
    return _MODELS[ident]


def _shard_seed(spec: GenerationSpec, index: int, round_: int) -> int:
    ss = np.random.SeedSequence([spec.cfg.seed, index, round_, int(spec.key[:12], 16)])
    return int(ss.generate_state(1, dtype=np.uint64)[0] >> 1)


def _draw(spec: GenerationSpec, index: int, labels: torch.Tensor, gen: Generator, filt: torch.nn.Module | None,
          device: torch.device) -> tuple[torch.Tensor, int]:
    """Images of `labels` (uint8-exact floats in [0, 1]), each passing the filter; candidates drawn."""
    out = torch.zeros((len(labels), *gen.shape))
    missing, drawn, round_ = torch.arange(len(labels)), 0, 0
    while len(missing):
        if round_ >= MAX_FILTER_ROUNDS:
            raise RuntimeError(f"generated shard {index}: {len(missing)} image(s) still below min_confidence="
                               f"{spec.cfg.min_confidence} after {MAX_FILTER_ROUNDS} rounds of candidates. "
                               f"Fix: lower data.generated.min_confidence or train the generator longer")
        parts = []
        for start in range(0, len(missing), spec.cfg.batch_size):
            chunk = missing[start:start + spec.cfg.batch_size]
            parts.append(sample(gen, labels[chunk], steps=spec.cfg.sample_steps, sampler=spec.cfg.sampler,
                                seed=_shard_seed(spec, index, round_) + start, device=device))
        x = (torch.cat(parts) * 255).round() / 255  # what the PNG keeps: the filter sees the stored image
        drawn += len(missing)
        keep = torch.ones(len(missing), dtype=torch.bool)
        if filt is not None:
            with torch.no_grad():
                prob = filt(x.to(device)).softmax(1).cpu()
            keep = prob[torch.arange(len(missing)), labels[missing]] >= spec.cfg.min_confidence
        out[missing[keep]] = x[keep]
        missing = missing[~keep]
        round_ += 1
    return out, drawn


def write_shard(spec: GenerationSpec, index: int, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Generate shard `index` and write it, then its record; a shard whose record exists is kept."""
    store = open_store(spec.results_dir)
    name = shard_name("train", index)
    old = store.read_bytes(f"{spec.rel}/{name}.json")
    if old is not None:
        return {**json.loads(old), "resumed": True}
    device = torch.device(device)
    t_load = time.perf_counter()
    gen, oracle, features, filt = _models(spec, device)
    t0 = time.perf_counter()  # a shard's seconds: sampling, filtering, encoding, writing (not the models' loading)
    c0 = time.process_time()  # ... and this process's CPU seconds for it (other load on the machine left out)
    started = time.time()
    indices = spec.shard_range(index)
    labels = torch.tensor([j % spec.num_classes for j in indices], dtype=torch.int64)
    x, drawn = _draw(spec, index, labels, gen, filt, device)
    x8 = (x * 255).round().to(torch.uint8)
    buf = io.BytesIO()
    writer = wds.TarWriter(buf, encoder=False, mtime=_TAR_MTIME)
    for j, img, y in zip(indices, x8, labels.tolist()):
        arr = img[0].numpy() if img.shape[0] == 1 else img.permute(1, 2, 0).numpy()
        writer.write({"__key__": f"{j:06d}", "png": encode_png(arr), "cls": b"%d" % y})
    writer.close()
    data = buf.getvalue()
    with torch.no_grad():
        xd = x.to(device)
        hits = (oracle(xd).argmax(1).cpu() == labels)
        feats = features.features(xd).double().cpu()
    pixels = x.double().flatten(2)  # N, C, H*W
    record = {
        "file": name, "count": len(indices), "size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
        "label_counts": torch.bincount(labels, minlength=spec.num_classes).tolist(),
        "oracle_hits": torch.bincount(labels[hits], minlength=spec.num_classes).tolist(),
        "pixel_sum": pixels.sum((0, 2)).tolist(), "pixel_sumsq": (pixels ** 2).sum((0, 2)).tolist(),
        "pixels": int(pixels.shape[0] * pixels.shape[2]), "drawn": drawn,
        "feature_sum": feats.sum(0).tolist(), "feature_outer": (feats.T @ feats).flatten().tolist(),
        "load_seconds": t0 - t_load, "device": str(device), "pid": os.getpid(), "started": started,
    }
    store.write_bytes(f"{spec.rel}/{name}", data)  # the tar first, its record after: a record means a whole tar
    record["seconds"], record["cpu_seconds"] = time.perf_counter() - t0, time.process_time() - c0
    record["ended"] = time.time()
    store.write_bytes(f"{spec.rel}/{name}.json", json.dumps(record).encode())
    return {**record, "resumed": False}


def shard_task(spec: GenerationSpec, indices: list[int], device: str = "cpu") -> list[dict[str, Any]]:
    """One task's shards (the body of a Ray task, or run here; Ray sets its threads to its CPUs)."""
    return [write_shard(spec, i, device) for i in indices]


# ------------------------------------------------------------------------------------ the whole set


def task_chunks(spec: GenerationSpec) -> list[list[int]]:
    step = spec.cfg.shards_per_task
    return [list(range(i, min(spec.n_shards, i + step))) for i in range(0, spec.n_shards, step)]


def run_shards(spec: GenerationSpec, device: torch.device | str = "cpu",
               log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Every shard's record: Ray tasks when Ray is up (a grid), else here one after another."""
    chunks = task_chunks(spec)
    import ray

    if ray.is_initialized():  # each task one CPU, or the cell's GPU share (the orchestrating task holds none)
        gpu = spec.gpus > 0
        remote = ray.remote(shard_task).options(num_cpus=1, num_gpus=spec.gpus, max_retries=3,
                                                name=f"generate/{spec.key}")
        refs = [remote.remote(spec, chunk, "cuda" if gpu else "cpu") for chunk in chunks]
        records = [r for part in ray.get(refs) for r in part]
    else:
        records = [r for chunk in chunks for r in shard_task(spec, chunk, str(device))]
    if log:
        log(f"generated set {spec.key}: {len(records)} shards, {sum(r['resumed'] for r in records)} kept from before")
    return records


def frechet_from_moments(n_a: int, sum_a: np.ndarray, outer_a: np.ndarray,
                         n_b: int, sum_b: np.ndarray, outer_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians given by sample counts, sums and sums of outer products
    (so shards add their moments and no feature is kept)."""
    from scipy import linalg

    def gauss(n: int, s: np.ndarray, o: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mu = s / n
        cov = (o - n * np.outer(mu, mu)) / max(n - 1, 1)
        return mu, cov + 1e-6 * np.eye(len(mu))

    mu_a, cov_a = gauss(n_a, sum_a, outer_a)
    mu_b, cov_b = gauss(n_b, sum_b, outer_b)
    covmean = linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(covmean))


def _real_moments(spec: GenerationSpec, split: str, features: torch.nn.Module, device: torch.device
                  ) -> tuple[int, np.ndarray, np.ndarray]:
    from harness.eval.analysis.diffusion import load_split

    x, _ = load_split(Path(spec.data_dir), split, img_size=spec.img_size)
    with torch.no_grad():
        f = torch.cat([features.features(x[i:i + 512].to(device)).double().cpu() for i in range(0, len(x), 512)]).numpy()
    return len(f), f.sum(0), f.T @ f


def quality(spec: GenerationSpec, records: list[dict[str, Any]], device: torch.device) -> dict[str, Any]:
    """The set's measured quality from its shards' records (module doc)."""
    from harness.eval.analysis.aux_models import ensure_aux

    features, fmeta = ensure_aux("features", Path(spec.data_dir), Path(spec.results_dir), spec.img_size, device=device)
    _, ometa = ensure_aux("oracle", Path(spec.data_dir), Path(spec.results_dir), spec.img_size, device=device)
    counts = np.sum([r["label_counts"] for r in records], axis=0)
    hits = np.sum([r["oracle_hits"] for r in records], axis=0)
    n = int(counts.sum())
    d = len(records[0]["feature_sum"])
    gsum = np.sum([r["feature_sum"] for r in records], axis=0)
    gouter = np.sum([r["feature_outer"] for r in records], axis=0).reshape(d, d)
    train = _real_moments(spec, "train", features, device)
    test = _real_moments(spec, "test", features, device)
    return {
        "oracle_acc": float(hits.sum() / n),
        "oracle_acc_per_class": (hits / np.maximum(counts, 1)).tolist(),
        "oracle_real_test_acc": ometa["test_acc"],
        "fid_local": frechet_from_moments(*train, n, gsum, gouter),
        "fid_local_real_test": frechet_from_moments(*train, *test),
        "fid_note": "Fréchet distance in a locally trained SmallCNN's features: NOT comparable with Inception FID",
        "filter_acceptance": float(n / max(1, sum(r["drawn"] for r in records))),
        "features_real_test_acc": fmeta["test_acc"],
    }


def assemble(spec: GenerationSpec, records: list[dict[str, Any]], device: torch.device,
             wall_seconds: float) -> dict[str, Any]:
    """Write summary.json, then the manifest LAST; returns the manifest."""
    real = load_manifest(spec.data_dir)
    records = sorted(records, key=lambda r: r["file"])
    if [r["file"] for r in records] != [shard_name("train", i) for i in range(spec.n_shards)]:
        raise RuntimeError(f"generated set {spec.key}: shard records missing; run it again (done shards are kept)")
    pixels = sum(r["pixels"] for r in records)
    mean = np.sum([r["pixel_sum"] for r in records], axis=0) / pixels
    std = np.sqrt(np.maximum(np.sum([r["pixel_sumsq"] for r in records], axis=0) / pixels - mean ** 2, 0))
    label_counts = np.sum([r["label_counts"] for r in records], axis=0).astype(int).tolist()
    size = int(spec.img_size or real["image_size"][0])
    shard_seconds = [r["seconds"] for r in records]
    summary = {
        "key": spec.key, "generator_key": spec.generator_key, "dataset": real.get("name"),
        "settings": asdict(spec.cfg), "images": spec.total, "shards": spec.n_shards, "tasks": len(task_chunks(spec)),
        "bytes": int(sum(r["size"] for r in records)),
        "bytes_per_shard": float(np.mean([r["size"] for r in records])),
        "wall_seconds": wall_seconds, "shard_seconds_total": float(sum(shard_seconds)),
        "images_per_second_per_worker": float(spec.total / max(1e-9, sum(shard_seconds))),
        "resumed_shards": int(sum(r.get("resumed", False) for r in records)),
        **quality(spec, records, device),
    }
    manifest = {
        "name": f"generated-{spec.key}", "format_version": FORMAT_VERSION, "num_classes": real["num_classes"],
        "class_names": list(real["class_names"]), "channels": real["channels"], "image_size": [size, size],
        "mean": mean.tolist(), "std": std.tolist(), "source": f"generator {spec.generator_key}",
        "split_rule": "generated: sample j has label j % num_classes (its conditioning class)",
        "splits": {"train": {"count": spec.total, "label_counts": label_counts,
                             "shards": [{k: r[k] for k in ("file", "count", "size", "sha256")} for r in records]}},
        "generated": {k: v for k, v in summary.items() if k != "settings"},
    }
    manifest["content_sha256"] = content_sha256(manifest)
    store = open_store(spec.results_dir)
    store.write_bytes(f"{spec.rel}/{SUMMARY}", json.dumps(summary, indent=1, sort_keys=True).encode())
    store.write_bytes(f"{spec.rel}/{MANIFEST}", (json.dumps(manifest, indent=2) + "\n").encode())  # LAST
    return manifest


def ensure_generated(spec: GenerationSpec, *, device: torch.device | str = "cpu",
                     log: Callable[[str], None] | None = None) -> str:
    """The artifact build: the set's location, generating what is missing (the generator too, if
    its own node has not run: `robustgrid run` of one cell)."""
    location = generated_location(spec.results_dir, spec.key)
    if open_store(spec.results_dir).exists(f"{spec.rel}/{MANIFEST}"):
        return location
    from harness.eval.analysis.aux_models import ensure_aux

    ensure_generator(spec.data_dir, spec.results_dir, spec.cfg.generator, spec.img_size, log=log, device=device)
    for role in ("oracle", "features") + (("filter",) if spec.cfg.min_confidence > 0 else ()):
        ensure_aux(role, Path(spec.data_dir), Path(spec.results_dir), spec.img_size, device=device)  # not in every task
    t0 = time.perf_counter()
    records = run_shards(spec, device, log)
    assemble(spec, records, torch.device("cpu"), time.perf_counter() - t0)  # small models, summed records: CPU
    return location
