"""The GPU path in one command: trainer speed in each precision, MFU, AutoAttack time, device use.

    python benchmarks/gpu_check.py                   # on a GPU machine; fits 8 minutes on one H100
    python benchmarks/gpu_check.py --device cpu --tiny   # CI: the same code, tiny sizes, < 1 minute

Prints one JSON object. On synthetic CIFAR-shaped data (random 3x32x32 images as real shards,
read through the trainer's data path):
  * ResNet-18 PGD-10 adversarial training (methods/pgd_at.py through harness.train.trainer):
    images/s of the last epoch (the first warms up cuDNN, the allocator and the compiler) in
    fp32, bf16, and bf16 + channels_last + torch.compile;
  * MFU of that epoch: the trainer's FlopCounter count of one whole step (attack included) per
    image x images/s, over the device's datasheet peak for the precision (harness/eval/cost.py);
  * AutoAttack (standard: APGD-CE, APGD-T, FAB-T, Square) wall time on 1,000 points, labelled
    with the model's own predictions so that every point is attacked, on the BatchNorm-folded
    copy evaluation attacks (harness/eval/fold.py; the folding counted in the time), and each
    component's seconds;
  * proof that the model's parameters sat on the requested device whenever a module ran,
    during the eager trainings and while the attacks ran (a global forward pre-hook, off for the
    compiled run, which it would force to recompile; the check fails loudly).
  A model that flips no point (this one, trained on noise, predicts nearly one class) makes
  every point go through every component: the time is AutoAttack's worst case.
--tiny: test_resnet at 16x16, 32 training images, AutoAttack with 2 iterations / 10 queries on
8 points, and the aot_eager compile backend (inductor's C++ build alone exceeds CI's minute).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness.attacks.base import build_attack  # noqa: E402
from harness.core.config import compose_config, finalize  # noqa: E402
from harness.core.device import device_name  # noqa: E402
from harness.eval.cost import peak_flops  # noqa: E402
from harness.eval.fold import folded_for_attacks  # noqa: E402
from harness.attacks.autoattack import CLEAN  # noqa: E402
from harness.train.trainer import load_trained_classifier, train  # noqa: E402
from synthetic import synthetic_cifar  # noqa: E402

FULL = {"arch": "resnet18", "n_train": 10240, "batch": 256, "epochs": 2, "workers": 8, "threads": 4,
        "aa_points": 1000, "aa": {"name": "autoattack", "eps": 8 / 255}, "compile": "inductor"}
TINY = {"arch": "test_resnet", "n_train": 32, "batch": 16, "epochs": 2, "workers": 0, "threads": 1,
        "img_size": 16, "aa_points": 8, "aa": {"name": "autoattack", "eps": 8 / 255, "n_iter": 2, "n_queries": 10},
        "compile": "aot_eager"}
VARIANTS = {"fp32": [], "bf16": ["trainer.precision=bf16"],
            "bf16_channels_last_compile": ["trainer.precision=bf16", "trainer.channels_last=true"]}


class DeviceWatch:
    """Counts module calls, and those whose parameters or input were not on `device`."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.calls, self.off_device = device, 0, []
        self.handle = None
        self.resume()

    def resume(self) -> None:
        if self.handle is None:
            self.handle = nn.modules.module.register_module_forward_pre_hook(self._hook)

    def pause(self) -> None:
        """Off while a compiled model runs: dynamo would trace the hook and recompile on its counter."""
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    def _hook(self, module: nn.Module, args: tuple) -> None:
        param = next(module.parameters(recurse=False), None)
        if param is None:
            return
        self.calls += 1
        x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if param.device.type != self.device.type or (x is not None and x.device.type != self.device.type):
            self.off_device.append(f"{type(module).__name__}: params on {param.device}, "
                                   f"input on {None if x is None else x.device}")

    def close(self) -> None:
        self.pause()


def cell(root: Path, results: Path, sizes: dict, device: str, extra: list[str]) -> dict:
    return finalize(compose_config([
        f"data.root={root}", "data=cifar10", "data.augment=null", f"arch={sizes['arch']}", "method=pgd_at",
        "trainer=cifar_at", f"trainer.epochs={sizes['epochs']}", f"trainer.batch_size={sizes['batch']}",
        f"trainer.num_workers={sizes['workers']}", f"trainer.threads_per_rank={sizes['threads']}",
        "trainer.progress=false", f"trainer.device={device}", f"results_dir={results}",
        *([f"data.img_size={sizes['img_size']}"] if sizes.get("img_size") else []), *extra,
    ]))


def train_variant(cfg: dict, precision: str, device: torch.device) -> tuple[dict, Path]:
    work = Path(cfg["results_dir"]) / "work"
    shutil.rmtree(work, ignore_errors=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    summary = train(cfg, work)
    last = summary.curve[-1]
    ips = last["samples"] / last["seconds"]
    per_image = summary.train_flops / sum(summary.samples_per_epoch) if summary.train_flops else None
    peak = peak_flops(device_name(device), precision) if device.type == "cuda" else None
    return {"images_per_second": ips, "images_per_second_after_first_step": summary.images_per_second,
            "epoch_seconds": [c["seconds"] for c in summary.curve],
            "train_flops_per_image": per_image, "flops_per_image_forward": summary.flops_per_image,
            "mfu": per_image * ips / peak if peak and per_image else None, "peak_flops": peak,
            "peak_memory_bytes": summary.peak_memory_bytes, "compile": summary.compile,
            "device": summary.device}, work


def autoattack_time(cfg: dict, work: Path, sizes: dict, device: torch.device) -> dict:
    model = load_trained_classifier(cfg, work, device)
    gen = torch.Generator().manual_seed(0)
    size = sizes.get("img_size") or 32
    x = torch.rand((sizes["aa_points"], 3, size, size), generator=gen).to(device)
    with torch.no_grad():
        y = torch.cat([model(x[i:i + 500]).argmax(1) for i in range(0, len(x), 500)])  # every point "correct"
    attack = build_attack(sizes["aa"])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    net = folded_for_attacks(model, x[:16])  # as evaluation does, once per cell
    components: dict[str, float] = {}
    x_adv, broken_by = attack.perturb_with_log(net, x, y, seconds=components)  # run_attack's call, timed
    broken_by = [None if b == CLEAN else b for b in broken_by]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    assert next(model.parameters()).device.type == device.type == next(net.parameters()).device.type
    return {"points": len(x), "seconds": seconds, "component_seconds": components,
            "config": attack.describe(), "bn_folded": net is not model,
            "robust_fraction": sum(b is None for b in broken_by) / len(x),
            "broken_by": dict(Counter(b for b in broken_by if b is not None)),
            "x_adv_device": str(x_adv.device)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--tiny", action="store_true", help="CI sizes (seconds, any device)")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    sizes = TINY if args.tiny else FULL
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check: --device cuda but no CUDA device is visible (use --device cpu --tiny for the CPU check)")
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="rg-gpucheck-"))
    watch = DeviceWatch(device)
    report: dict = {"device": str(device), "device_name": device_name(device), "torch": torch.__version__,
                    "arch": sizes["arch"], "batch": sizes["batch"], "n_train": sizes["n_train"],
                    "method": "pgd_at (PGD-10, eps 8/255)", "tiny": args.tiny, "runs": {}}
    try:
        synthetic_cifar(tmp / "data", n_train=sizes["n_train"], n_test=64)
        work = None
        for name, extra in VARIANTS.items():
            if "compile" in name:
                extra = [*extra, f"trainer.compile={sizes['compile']}"]
            cfg = cell(tmp / "data", tmp / name, sizes, device.type, extra)
            precision = "bf16" if "trainer.precision=bf16" in extra else "fp32"
            print(f"gpu_check: training {name} ({time.perf_counter() - started:.0f}s)", file=sys.stderr, flush=True)
            if "compile" in name:
                watch.pause()
            try:
                report["runs"][name], run_work = train_variant(cfg, precision, device)
            except Exception as err:  # one failing variant must not hide the others' numbers
                report["runs"][name] = {"error": f"{type(err).__name__}: {err}"[:2000]}
                continue
            finally:
                watch.resume()
            if name == "bf16":
                aa_cfg, work = cfg, run_work
        if work is None:
            raise RuntimeError("the bf16 training run failed: no model for the AutoAttack timing")
        print(f"gpu_check: autoattack ({time.perf_counter() - started:.0f}s)", file=sys.stderr, flush=True)
        report["autoattack"] = autoattack_time(aa_cfg, work, sizes, device)
        report["module_calls_watched"] = watch.calls
        report["params_on_device_during_training_and_attacks"] = not watch.off_device
        if watch.off_device:
            report["off_device_calls"] = watch.off_device[:10]
        report["seconds_total"] = time.perf_counter() - started
        print(json.dumps(report, indent=1, default=str), flush=True)
        if args.out:
            args.out.write_text(json.dumps(report, indent=1, default=str))
        assert watch.calls > 0 and not watch.off_device, f"modules ran off {device}: {watch.off_device[:3]}"
        assert all("error" not in r for r in report["runs"].values()), "a training variant failed (see runs)"
    finally:
        watch.close()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
