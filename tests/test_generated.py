"""Generated training data (issue 28): the class-conditional generator, its sharded generation on
Ray (records per shard, manifest last, resumable), the real + generated mix of the loader, the
refusals before work, and a grid cell training PGD-AT with generated data and EMA."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from harness.core.errors import DataError
from harness.data.generated import check_generated_set, mix_sizes, mixed_batches, mixed_steps
from harness.data.loader import make_loader
from harness.data.shards import MANIFEST, load_manifest, shard_name
from harness.eval.analysis.diffusion import DDPMConfig
from harness.generate.generation import GenerationConfig, ensure_generated, plan_spec, write_shard
from harness.generate.generator import ensure_generator, load_generator, sample

TINY_NET = {"channels": [16, 32], "attention": False, "batch_size": 32, "train_steps": 20}
TRAINED_NET = {**TINY_NET, "batch_size": 64, "train_steps": 200}  # ~25 s: classes a classifier tells apart
TINY_SET = {"per_class": 6, "samples_per_shard": 16, "sample_steps": 4, "generator": TINY_NET}  # 60 images, 4 shards


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, digits_dir: Path) -> Path:
    """One results store for the module: its helper classifiers and tiny generator trained once."""
    from harness.eval.analysis.aux_models import ensure_aux

    root = tmp_path_factory.mktemp("generated-store")
    for role in ("oracle", "features", "filter"):
        ensure_aux(role, digits_dir, root)
    ensure_generator(str(digits_dir), str(root), DDPMConfig.from_dict(TINY_NET))
    ensure_generator(str(digits_dir), str(root), DDPMConfig.from_dict(TRAINED_NET))
    return root


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_generator_trains_samples_given_classes_and_is_cached(digits_dir: Path, tmp_path: Path) -> None:
    cfg = DDPMConfig.from_dict(TINY_NET)
    key = ensure_generator(str(digits_dir), str(tmp_path), cfg)
    folder = tmp_path / "artifacts" / "generator" / key
    weights = (folder / "generator.pt").stat().st_mtime_ns
    assert ensure_generator(str(digits_dir), str(tmp_path), cfg) == key
    assert (folder / "generator.pt").stat().st_mtime_ns == weights, "a cached generator is not trained again"
    gen = load_generator(str(tmp_path), key)
    assert gen.num_classes == 10 and gen.shape == (1, 8, 8)
    assert gen.unet.config.num_class_embeds == 10
    labels = torch.tensor([0, 3, 9, 9])
    x = sample(gen, labels, steps=3, seed=5)
    assert x.shape == (4, 1, 8, 8) and 0 <= float(x.min()) and float(x.max()) <= 1
    assert torch.equal(x, sample(gen, labels, steps=3, seed=5)), "same seed, same images"
    # the class embedding conditions the network: other labels, same noise -> other images
    assert not torch.equal(x, sample(gen, torch.tensor([1, 2, 4, 5]), steps=3, seed=5))
    with pytest.raises(ValueError, match="labels must lie in"):
        sample(gen, torch.tensor([10]))
    with pytest.raises(FileNotFoundError, match="Fix: run the grid with data.generated"):
        load_generator(str(tmp_path), "0" * 20)


@pytest.mark.slow
def test_a_trained_generator_draws_its_conditioning_class(digits_dir: Path, tmp_path: Path) -> None:
    """600 steps (~70 s on one core): a held-out classifier recognises most samples as their class."""
    from harness.eval.analysis.aux_models import ensure_aux

    cfg = DDPMConfig.from_dict({**TINY_NET, "batch_size": 64, "train_steps": 600})
    gen = load_generator(str(tmp_path), ensure_generator(str(digits_dir), str(tmp_path), cfg))
    oracle, _ = ensure_aux("oracle", digits_dir, tmp_path)
    labels = torch.arange(200) % 10
    acc = float((oracle(sample(gen, labels, steps=20)).argmax(1) == labels).float().mean())
    assert acc > 0.6, acc  # measured 0.85; chance is 0.1


@pytest.mark.slow  # the module's store: three helper classifiers and a generator trained (~65 s)
def test_generation_on_ray_writes_shards_then_manifest_and_resumes(digits_dir: Path, store: Path,
                                                                  ray_session) -> None:
    tmp_path = store
    spec = plan_spec(str(digits_dir), str(tmp_path), None, GenerationConfig.from_dict({**TINY_SET, "seed": 1}))
    assert spec.n_shards == 4 and spec.total == 60
    folder = tmp_path / "artifacts" / "generated" / spec.key
    # a run killed after two shards: their tars and records are there, no manifest
    ensure_generator(spec.data_dir, spec.results_dir, spec.cfg.generator)
    for index in (0, 2):
        write_shard(spec, index)
    assert not (folder / MANIFEST).exists()
    with pytest.raises(DataError):  # a set without its manifest is never read
        make_loader(str(folder), "train", 8)
    with pytest.raises(DataError, match="Fix: pass data.generated=<settings>"):
        check_generated_set(str(folder), load_manifest(digits_dir))
    kept = {name: (folder / name).read_bytes() for name in (shard_name("train", 0), shard_name("train", 2))}

    location = ensure_generated(spec)  # on Ray (the session's): the missing shards only
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["resumed_shards"] == 2 and summary["shards"] == 4 and summary["images"] == 60
    assert all((folder / name).read_bytes() == data for name, data in kept.items())
    manifest = load_manifest(location)
    assert manifest["splits"]["train"]["label_counts"] == [6] * 10
    assert manifest["num_classes"] == 10 and manifest["image_size"] == [8, 8]
    quality = manifest["generated"]
    assert len(quality["oracle_acc_per_class"]) == 10 and 0 <= quality["oracle_acc"] <= 1
    assert quality["fid_local"] > 0 and "NOT comparable with Inception FID" in quality["fid_note"]
    record = json.loads((folder / (shard_name("train", 0) + ".json")).read_text())
    assert len(record["feature_sum"]) == 64, "the feature extractor's penultimate features, not its logits"
    # labels are the conditioning classes: sample j has class j % 10, streamed by the ordinary loader
    seen = [(k, int(y)) for x, y, keys in make_loader(location, "train", 16, return_keys=True) for k, y in zip(keys, y)]
    assert sorted(seen) == [(f"{j:06d}", j % 10) for j in range(60)]

    # a lost shard (and the manifest) is regenerated alone, bit for bit
    before = _tree(folder)
    for name in (shard_name("train", 1), shard_name("train", 1) + ".json", MANIFEST):
        (folder / name).unlink()
    ensure_generated(spec)
    assert json.loads((folder / "summary.json").read_text())["resumed_shards"] == 3
    after = _tree(folder)
    assert after[shard_name("train", 1)] == before[shard_name("train", 1)]
    # a finished set is not generated again
    ensure_generated(spec)
    assert _tree(folder) == after


@pytest.mark.slow  # the module's store: three helper classifiers and a generator trained (~65 s)
def test_the_filter_keeps_confident_images_only(digits_dir: Path, store: Path) -> None:
    from harness.eval.analysis.aux_models import ensure_aux

    tmp_path = store
    spec = plan_spec(str(digits_dir), str(tmp_path), None,
                     GenerationConfig.from_dict({**TINY_SET, "per_class": 2, "min_confidence": 0.3,
                                                                "generator": TRAINED_NET}))
    ensure_generator(spec.data_dir, spec.results_dir, spec.cfg.generator)
    record = write_shard(spec, 0)
    assert record["drawn"] > record["count"] == 16, "some candidates are dropped"
    filt, _ = ensure_aux("filter", digits_dir, tmp_path)
    x, y = next(iter(make_loader_of_shard(tmp_path, spec, record)))
    prob = filt(x).softmax(1)[torch.arange(len(y)), y]
    assert bool((prob >= 0.3 - 1e-4).all()), prob


def make_loader_of_shard(results: Path, spec, record: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One shard's images and labels, read back from its tar."""
    import io
    import tarfile

    from harness.data.shards import decode_png

    xs, ys = [], []
    with tarfile.open(results / "artifacts" / "generated" / spec.key / record["file"]) as tar:
        for member in tar.getmembers():
            data = tar.extractfile(member).read()
            if member.name.endswith(".png"):
                xs.append(torch.from_numpy(decode_png(data)).float()[None] / 255)
            else:
                ys.append(int(data))
    return [(torch.stack(xs), torch.tensor(ys))]


# ------------------------------------------------------------------------------------------- mixing


def _tagged(tag: float, n: int = 1000) -> callable:
    """A stream whose pass e yields batches of `tag`-valued images labelled with their pass."""
    def make_pass(e: int):
        rng = np.random.default_rng(e)
        for start in range(0, n, 7):
            b = min(7, n - start)
            yield torch.full((b, 1, 2, 2), tag) + torch.from_numpy(rng.random((b, 1, 1, 1))).float() * 0.01, \
                torch.full((b,), e % 10)
    return make_pass


def test_mixed_batches_hold_the_ratio_and_are_deterministic() -> None:
    n_real, n_gen = mix_sizes(64, 0.7)
    assert (n_real, n_gen) == (20, 44)  # int(64 * 0.7) generated, as DM-Improves-AT's sampler
    assert mix_sizes(64, 0.0) == (64, 0)
    assert mixed_steps(1437, 128) == 12
    assert mixed_steps(1437, 128, drop_last=True) == 11  # trainer.drop_last: full batches only
    with pytest.raises(ValueError, match="drop_last"):
        mixed_steps(100, 128, drop_last=True)
    batches = list(mixed_batches(_tagged(0.0, 50), _tagged(1.0), 5, n_real, n_gen, seed=3, epoch=2, rank=0))
    assert len(batches) == 5
    for x, y in batches:
        generated = (x[:, 0, 0, 0] > 0.5).sum().item()
        assert len(y) == 64 and generated == 44
    again = list(mixed_batches(_tagged(0.0, 50), _tagged(1.0), 5, n_real, n_gen, seed=3, epoch=2, rank=0))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again))
    other = list(mixed_batches(_tagged(0.0, 50), _tagged(1.0), 5, n_real, n_gen, seed=3, epoch=3, rank=0))
    assert not torch.equal(batches[0][0], other[0][0]), "another epoch, other batches"
    # the real stream (50 images) runs out after 2.5 steps: its next pass starts, seeded by the pass
    passes = {int(v) for _, y in batches for v in y.tolist()}
    assert len(passes) >= 2


@pytest.mark.slow  # the module's store: three helper classifiers and a generator trained (~65 s)
def test_each_rank_streams_its_own_generated_shards(digits_dir: Path, store: Path) -> None:
    spec = plan_spec(str(digits_dir), str(store), None, GenerationConfig.from_dict({**TINY_SET, "seed": 2}))
    location = ensure_generated(spec)
    keys = [{k for _, _, ks in make_loader(location, "train", 8, rank=r, world_size=2, shuffle=True, seed=1,
                                           return_keys=True) for k in ks} for r in (0, 1)]
    assert keys[0].isdisjoint(keys[1]) and len(keys[0] | keys[1]) == 60


# ------------------------------------------------------------------------------------ refusals


def _cell(tiny: list[str], *extra: str) -> dict:
    from harness.core.config import compose_config, finalize

    return finalize(compose_config(tiny + ["method=pgd_at", *extra]))


@pytest.mark.parametrize("ratio", ["1.0", "-0.1", "1.5"])
def test_a_ratio_outside_0_1_is_refused_before_work(tiny, ratio) -> None:
    from harness.run.grid import validate_cell

    cfg = _cell(tiny, "data.generated={per_class:5}", f"data.generated_ratio={ratio}")
    with pytest.raises(ValueError, match=r"generated_ratio must be in \[0, 1\).*Fix: data.generated_ratio=0.7"):
        validate_cell(cfg)


def test_unknown_generation_settings_are_refused(tiny) -> None:
    from harness.run.grid import validate_cell

    with pytest.raises(ValueError, match="unknown data.generated settings"):
        validate_cell(_cell(tiny, "data.generated={per_clas:5}"))


def test_a_missing_generated_key_is_refused_before_work(tiny) -> None:
    from harness.run.grid import preflight_grid

    cfg = _cell(tiny, "data.generated=0123456789abcdef0123")
    with pytest.raises(DataError, match="cannot be read.*Fix: pass data.generated=<settings>"):
        preflight_grid([cfg], prepare=True, leaderboard=False)


def test_a_generated_set_of_other_classes_is_refused(tiny, tmp_path: Path) -> None:
    from harness.data.shards import write_dataset
    from harness.run.grid import preflight_grid

    cfg = _cell(tiny, "data.generated=other3classes")
    samples = lambda: ((np.full((8, 8), 9 * i, dtype=np.uint8), i % 3) for i in range(12))
    write_dataset(Path(cfg["results_dir"]) / "artifacts" / "generated", "other3classes", {"train": samples},
                  {"num_classes": 3, "class_names": ["a", "b", "c"], "channels": 1, "image_size": [8, 8],
                   "source": "test", "split_rule": "test"}, 4)
    with pytest.raises(DataError, match="has 3 classes, the real dataset digits has 10"):
        preflight_grid([cfg], prepare=True, leaderboard=False)


def test_the_plan_builds_the_generated_set_once_before_training(tiny) -> None:
    from harness.run.plan import build_plan

    settings = "data.generated={per_class:6,samples_per_shard:16,sample_steps:4,generator:{train_steps:20}}"
    cells = [_cell(tiny, settings, f"seed={s}") for s in (0, 1)]
    plan = build_plan(cells)
    generated = [n for n in plan.of_kind("artifact") if n.id.startswith("artifact/generated/")]
    generators = [n for n in plan.of_kind("artifact") if n.id.startswith("artifact/generator/")]
    assert len(generated) == 1 and len(generators) == 1, "one set and one generator for every cell"
    assert generators[0].id in generated[0].inputs
    for node in plan.of_kind("train"):
        assert node.inputs == (generated[0].id,)
    order = list(plan.nodes)
    assert order.index(generators[0].id) < order.index(generated[0].id) < order.index(plan.of_kind("train")[0].id)
    # the set's node only orchestrates: it holds no GPU, its shard tasks take the cell's GPU share
    from harness.run.grid import node_options

    assert node_options(generated[0])["num_gpus"] == 0
    gpu_cell = _cell(tiny, settings, "resources.gpus=0.5")
    set_node = [n for n in build_plan([gpu_cell]).of_kind("artifact") if n.id.startswith("artifact/generated/")][0]
    assert set_node.id == generated[0].id, "resources are not part of the set's key"
    assert set_node.artifact.build.args[0].gpus == 0.5


def test_the_generator_and_set_builds_report_progress(tiny, capsys: pytest.CaptureFixture) -> None:
    """Training a generator takes minutes to hours: its artifact build logs its steps to stderr
    (which Ray forwards to the driver), as does the set's generation."""
    from harness.generate.artifacts import data_artifacts, progress

    arts = {a.key.split("/")[0]: a for a in data_artifacts(_cell(tiny, "data.generated={per_class:6}"))}
    assert arts["generator"].build.keywords["log"] is progress and arts["generated"].build.keywords["log"] is progress
    progress("generator step 1/4000 loss 0.5000 1s")
    assert "generator step 1/4000" in capsys.readouterr().err


# ----------------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_a_grid_cell_trains_pgd_at_with_generated_data_and_ema(tiny, ray_session) -> None:
    """One command: the grid generates the set (on Ray), trains PGD-AT on the 0.7 / 0.3 mix with weight EMA,
    evaluates and commits; the key is in the provenance."""
    from harness.run.grid import expand_grid, run_grid
    from harness.store.index import read_results

    gen = "data.generated={per_class:6,samples_per_shard:16,sample_steps:4,generator:{channels:[16,32],attention:false,train_steps:20,batch_size:32}}"
    cells = expand_grid(["grid=demo", "grid.axes.arch=[test_resnet]", "grid.axes.method=[pgd_at]", gen,
                         "trainer.ema=0.995"] + tiny)
    report = run_grid(cells)
    assert [o.status for o in report.outcomes] == ["ok"], [o.error for o in report.outcomes]
    row = read_results(cells[0]["results_dir"]).to_pylist()[0]
    generated_dir = json.loads(row["config_json"])["data"]["generated_dir"]
    assert "/artifacts/generated/" in generated_dir and load_manifest(generated_dir)["num_classes"] == 10
    from harness.run.nodes import trained_summary

    summary = trained_summary(cells[0])
    assert summary.generated["ratio"] == 0.7 and summary.generated["generated_per_rank_batch"] == 44
    assert summary.generated["steps_per_epoch"] == 4  # ceil(256 real / 64)
    assert summary.samples_per_epoch == [256, 256] and summary.ema["decay"] == 0.995
