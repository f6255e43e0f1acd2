"""A cell's generated training data as plan artifacts, and its checks before any work.

`data.generated` is one of
  null                 no generated data (the default);
  {settings}           a generated set made from these settings (GenerationConfig; `{}`: defaults):
                       the plan holds its artifact nodes, built once per key however many cells
                       need it: the helper classifiers (aux/<key>: the held-out judge, the feature
                       extractor, the filter), the generator (generator/<key>), the set (generated/<key>);
  "<key>"              a set generated before into this results_dir (artifacts/generated/<key>), or
  "<folder or URI>"    (a value holding '/') any complete generated set.
`data.generated_ratio` (default 0.7) is the generated share of each batch (harness/data/generated.py).
"""
from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any

from harness.core.errors import DataError
from harness.data.generated import check_generated_set, generated_location, generated_ratio, shard_readers
from harness.data.shards import load_manifest
from harness.eval.analysis.aux_models import aux_folder, ensure_aux
from harness.core.artifact import Artifact
from harness.generate.generation import GenerationConfig, GenerationSpec, ensure_generated, plan_spec
from harness.generate.generator import ensure_generator


def generated_setting(dcfg: dict[str, Any]) -> str | dict[str, Any] | None:
    """`data.generated` checked for its kind (ValueError naming the fix)."""
    value = dcfg.get("generated")
    if value is None or isinstance(value, dict) or (isinstance(value, str) and value.strip()):
        return value
    raise ValueError(f"data.generated must be null, a settings block ({{per_class: 1000, ...}}) or the key of a "
                     f"generated set, got {value!r}. Fix: data.generated=null or data.generated={{per_class:1000}}")


def generation_spec(cfg: dict[str, Any]) -> GenerationSpec | None:
    """The spec of the cell's set when `data.generated` holds settings (reads the real manifest)."""
    value = generated_setting(cfg["data"])
    if not isinstance(value, dict):
        return None
    return plan_spec(cfg["data"]["dir"], cfg["results_dir"], cfg["data"].get("img_size"),
                     GenerationConfig.from_dict(value), float((cfg.get("resources") or {}).get("gpus") or 0))


def generated_dir(cfg: dict[str, Any]) -> str | None:
    """Where the cell's generated set is (None: no generated data)."""
    value = generated_setting(cfg["data"])
    if value is None:
        return None
    if isinstance(value, dict):
        return generated_location(cfg["results_dir"], generation_spec(cfg).key)
    return value if "/" in value else generated_location(cfg["results_dir"], value)


def progress(message: str) -> None:
    """An artifact's progress line (the generator trains for minutes to hours): on stderr, flushed,
    which Ray forwards to the driver's console."""
    print(message, file=sys.stderr, flush=True)


def data_artifacts(cfg: dict[str, Any]) -> list[Artifact]:
    """The artifacts the cell's training data needs, in build order (none without generated settings)."""
    spec = generation_spec(cfg)
    if spec is None:
        return []
    data_dir, results_dir, img_size = Path(spec.data_dir), Path(spec.results_dir), spec.img_size
    roles = ("oracle", "features") + (("filter",) if spec.cfg.min_confidence > 0 else ())
    out = [Artifact(f"aux/{aux_folder(role, data_dir, results_dir, img_size).name}", f"{role} classifier",
                    functools.partial(ensure_aux, role, data_dir, results_dir, img_size)) for role in roles]
    generator = Artifact(f"generator/{spec.generator_key}", "class-conditional generator",
                         functools.partial(ensure_generator, spec.data_dir, spec.results_dir, spec.cfg.generator,
                                           img_size, log=progress))
    generated = Artifact(f"generated/{spec.key}", f"generated set ({spec.total} images, {spec.n_shards} shards)",
                         functools.partial(ensure_generated, spec, log=progress),
                         inputs=tuple(a.key for a in out) + (generator.key,), options={"num_cpus": 1, "num_gpus": 0})
    return out + [generator, generated]


def check_generated_settings(cfg: dict[str, Any]) -> None:
    """The settings alone (no data read): kind, ratio, known keys and ranges."""
    value = generated_setting(cfg["data"])
    if value is None:
        return
    generated_ratio(cfg["data"])
    if isinstance(value, dict):
        GenerationConfig.from_dict(value)


def check_generated(cfg: dict[str, Any]) -> None:
    """Against the data (after it is prepared): a set named by key must be complete in the store and
    match the real dataset's classes and image shape; a set from settings is built by the plan."""
    value = generated_setting(cfg["data"])
    if value is None:
        return
    try:
        real = load_manifest(cfg["data"]["dir"])
    except DataError:
        return  # not prepared yet (a dry run): the trainer checks again before its first step
    tcfg = cfg.get("trainer") or {}
    readers = shard_readers(tcfg.get("world_size", 1), tcfg.get("num_workers"))
    if isinstance(value, dict):
        spec = generation_spec(cfg)
        if spec.n_shards < readers:
            raise ValueError(f"data.generated makes {spec.n_shards} shard(s), fewer than the {readers} readers "
                             f"(ranks x loader workers). Fix: a smaller data.generated.samples_per_shard, "
                             f"more data.generated.per_class, or lower trainer.num_workers")
        return
    check_generated_set(generated_dir(cfg), real, readers, cfg["data"].get("img_size"))
