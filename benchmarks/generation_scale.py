"""What generating a set costs on a multi-node Ray cluster, measured: images/s per worker, the
scaling from 1 to 2 workers, the per-task and per-shard overheads, the bytes per shard, FLOPs.

    python -m benchmarks.generation_scale [--per-class 60] [--reps 2] [--steps 20]

A local multi-node cluster (ray.cluster_utils.Cluster: 2 nodes of 1 CPU each, as separate raylets)
runs the harness's own generation (harness/generate/generation.py: shard tasks writing whole
WebDataset shards and their records, the manifest last). One generator (ACE's default network:
channels 32/64, attention at 4x4, trained 50 steps: throughput does not depend on its quality) is
trained once; every run samples a fresh set (its own seed: nothing is reused), so:

  1 worker:   all shards in one task (shards_per_task = all): one CPU of the cluster works;
  2 workers:  two tasks of half the shards each, one per node (each node has one CPU);
after one untimed warm-up run (workers started, models loaded), timing the shard tasks alone (the
driver's quality pass and manifest, `assemble_s`, are reported apart), paired and interleaved
(1, 2, 1, 2, ...) so the machine's other load hits both alike, and the
ratio printed per pair. Then, on 2 workers:
  per-shard overhead: the same images in shards of 16 and of 64: (T16 - T64) / (n16 - n64);
  per-task overhead:  tasks over shards already written (each returns its record at once).
FLOPs per image: torch's FlopCounterMode on one UNet forward, x sampling steps (+ the quality
classifiers' forwards, small). Each shard also records its process's CPU seconds: on a machine
other jobs load, wall-clock scaling measures the load as much as the code, while images per
CPU-second per worker (equal in the 1- and 2-worker runs when nothing is serialised) does not.
Prints one JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--per-class", type=int, default=60)
    parser.add_argument("--samples-per-shard", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--reps", type=int, default=2)
    args = parser.parse_args()

    import ray
    import torch
    from ray.cluster_utils import Cluster

    from harness.data.prepare import prepare_digits
    from harness.eval.analysis.aux_models import ensure_aux
    from harness.generate.generation import GenerationConfig, assemble, plan_spec, run_shards
    from harness.generate.generator import ensure_generator, load_generator

    torch.set_num_threads(1)
    uptime_before = _uptime_text()
    work = Path(tempfile.mkdtemp(prefix="generation-scale-"))
    data = prepare_digits(work / "data")
    results = str(work / "results")
    net = {"train_steps": 50, "batch_size": 64}
    t0 = time.perf_counter()
    gkey = ensure_generator(str(data), results, GenerationConfig.from_dict({"generator": net}).generator)
    for role in ("oracle", "features"):
        ensure_aux(role, Path(data), Path(results))
    setup_s = time.perf_counter() - t0

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
    nodes = [n for n in ray.nodes() if n["Alive"]]

    def run(workers: int, seed: int, per_shard: int) -> dict:
        cfg = {"per_class": args.per_class, "samples_per_shard": per_shard, "sample_steps": args.steps,
               "seed": seed, "generator": net}
        spec = plan_spec(str(data), results, None, GenerationConfig.from_dict(cfg))
        per_task = spec.n_shards if workers == 1 else -(-spec.n_shards // workers)
        spec = plan_spec(str(data), results, None, GenerationConfig.from_dict({**cfg, "shards_per_task": per_task}))
        start = time.perf_counter()
        records = run_shards(spec)  # the sharded work alone (the tasks, their shards and records)
        wall = time.perf_counter() - start
        start = time.perf_counter()
        assemble(spec, records, torch.device("cpu"), wall)  # quality + summary + manifest, in the driver
        assemble_s = time.perf_counter() - start
        return {"workers": workers, "images": spec.total, "shards": spec.n_shards, "wall_s": wall,
                "images_per_s": spec.total / wall, "shard_seconds_total": sum(r["seconds"] for r in records),
                "shard_cpu_seconds_total": sum(r["cpu_seconds"] for r in records),
                "cpu_images_per_s_per_worker": spec.total / sum(r["cpu_seconds"] for r in records),
                "assemble_s": assemble_s, "worker_pids": len({r["pid"] for r in records}),
                "concurrent_s": _overlap(records), "bytes_per_shard": sum(r["size"] for r in records) / len(records),
                "spec": spec}

    run(2, 1, args.samples_per_shard)  # warm-up: both workers started, their models loaded (not timed)

    pairs = []
    seed = 100
    for rep in range(args.reps):
        one = run(1, seed, args.samples_per_shard)
        two = run(2, seed + 1, args.samples_per_shard)
        seed += 2
        pairs.append({"one": {k: v for k, v in one.items() if k != "spec"},
                      "two": {k: v for k, v in two.items() if k != "spec"},
                      "speedup": one["wall_s"] / two["wall_s"]})

    # per-shard overhead: the same images in small and large shards, 2 workers, interleaved twice
    small, large = [], []
    for _ in range(2):
        small.append(run(2, seed, 16))
        large.append(run(2, seed + 1, 64))
        seed += 2
    t_small = statistics.mean(r["wall_s"] for r in small)
    t_large = statistics.mean(r["wall_s"] for r in large)
    per_shard_s = (t_small - t_large) / (small[0]["shards"] - large[0]["shards"])
    c_small = statistics.mean(r["shard_cpu_seconds_total"] for r in small)
    c_large = statistics.mean(r["shard_cpu_seconds_total"] for r in large)
    per_shard_cpu_s = (c_small - c_large) / (small[0]["shards"] - large[0]["shards"])

    # per-task overhead: tasks over shards already written (each returns its stored record)
    done = small[0]["spec"]
    from dataclasses import replace

    one_per_task = replace(done, cfg=replace(done.cfg, shards_per_task=1))
    start = time.perf_counter()
    records = run_shards(one_per_task)
    per_task_s = (time.perf_counter() - start) / len(records)
    assert all(r["resumed"] for r in records)

    # FLOPs per image: one UNet forward per sampling step
    from torch.utils.flop_counter import FlopCounterMode

    gen = load_generator(results, gkey)
    x = torch.zeros((1, *gen.shape))
    with FlopCounterMode(display=False) as counter:
        gen.unet(x, torch.tensor([10]), class_labels=torch.tensor([0]))
    unet_flops = counter.get_total_flops()

    speedups = [p["speedup"] for p in pairs]
    out = {
        "machine": {"nproc": os.cpu_count(), "uptime_before": uptime_before,
                    "cluster_nodes": len(nodes), "cpus_per_node": 1},
        "settings": {"per_class": args.per_class, "samples_per_shard": args.samples_per_shard,
                     "sample_steps": args.steps, "sampler": "sde-dpmsolver++", "image": list(gen.shape),
                     "unet_params": sum(p.numel() for p in gen.unet.parameters())},
        "setup_seconds": setup_s,
        "pairs": pairs,
        "images_per_s_1_worker": statistics.mean(p["one"]["images_per_s"] for p in pairs),
        "images_per_s_2_workers": statistics.mean(p["two"]["images_per_s"] for p in pairs),
        "speedup_1_to_2": statistics.mean(speedups),
        "scaling_efficiency": statistics.mean(speedups) / 2,
        "per_shard_overhead_s": per_shard_s,
        "per_shard_overhead_cpu_s": per_shard_cpu_s,
        "cpu_images_per_s_per_worker_1": statistics.mean(p["one"]["cpu_images_per_s_per_worker"] for p in pairs),
        "cpu_images_per_s_per_worker_2": statistics.mean(p["two"]["cpu_images_per_s_per_worker"] for p in pairs),
        "per_task_overhead_s": per_task_s,
        "shard_runs": {"16": [r["wall_s"] for r in small], "64": [r["wall_s"] for r in large],
                       "shards_16": small[0]["shards"], "shards_64": large[0]["shards"]},
        "bytes_per_shard": pairs[0]["one"]["bytes_per_shard"],
        "bytes_per_image": pairs[0]["one"]["bytes_per_shard"] / args.samples_per_shard,
        "unet_forward_flops": unet_flops,
        "sampling_flops_per_image": unet_flops * args.steps,
        "images_total": sum(p["one"]["images"] + p["two"]["images"] for p in pairs)
                        + sum(r["images"] for r in small + large),
        "uptime_after": _uptime_text(),
    }
    print(json.dumps(out, indent=1, default=str))
    ray.shutdown()
    cluster.shutdown()


def _overlap(records: list[dict]) -> float:
    """Seconds during which shards of two different worker processes were being made at once."""
    by_pid: dict[int, list[tuple[float, float]]] = {}
    for r in records:
        by_pid.setdefault(r["pid"], []).append((r["started"], r["ended"]))
    if len(by_pid) < 2:
        return 0.0
    a, b = list(by_pid.values())[:2]
    return sum(max(0.0, min(e1, e2) - max(s1, s2)) for s1, e1 in a for s2, e2 in b)


def _uptime_text() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


if __name__ == "__main__":
    main()
