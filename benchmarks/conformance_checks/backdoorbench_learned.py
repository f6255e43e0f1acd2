"""LF, LC and TrojanNN beside SCLBD/BackdoorBench: the poisons whose trigger is computed first.

How the trigger is applied: its own pipeline, `bd_attack_img_trans_generate(args)`
(utils/aggregate_block/bd_attack_generate.py), builds the transforms its attack scripts apply
(PIL in: Resize, np.array, the trigger, np.clip(.., 0, 255).astype(uint8), PIL out); both sides get
the same uint8 images (seeded 32x32 RGB plus an all-0 and an all-255 image) and the same trigger
tensor, and the poisoned images are compared byte for byte (helpers of backdoorbench.py).
  lf   `attack=lowFrequency` with its own shipped resource/lowFrequency/cifar10_preactresnet18_0_255.npy
       (uint8 levels 0..51) as the trigger of both sides (ours loads it as its artifact arrays).
       Its SimpleAdditiveTrigger calls np.float, removed in numpy 1.24: this process sets
       np.float = float (what the alias was) while their transform runs; nothing of theirs is edited.
  lc   `attack=label_consistent`, reduced_amplitude 1 and 0.5; the train transform replaces each
       image by its adversarial image (SSBA_attack_replace_version reading an npy by sample index:
       ours by index from the artifact) and adds the corner trigger; the test transform adds the
       trigger only; at 32x32 and at 16x16 (their resize of the 32x32 mask by nearest neighbour).

How the trigger is computed, on the same weights (our test_resnet, seeded, 3 channels, 32x32):
  lf_gauss_smooth / lf_normalization  resource/lowFrequency/gauss_smooth.py on one seeded field
  lf_deepfool      their tar_deepfool (resource/lowFrequency/deepfool.py) vs ours from one image:
                   the step r_tot (float) and the iteration count (int); theirs backpropagates each
                   class's logit and subtracts, ours the difference once (float noise only)
  lf_uap_pass      their universal_perturbation (universal_pert.py) for one pass (max_iter_uni=1)
                   over 6 images, vs our `uap_pass` on the images in the order their in-place
                   np.random.shuffle left them: v after the pass (float)
  lc_pgd           the PGD class of resource/label-consistent/craft_adv_dataset.py (eps 8, alpha
                   1.5, 100 steps over 255, return type int) vs ours, uint8 images
  trojannn         attack/trojannn.py: its square.png resized (vs our procedural square), its
                   neuron choice on the head's weight, 50 steps of its masked trigger descent, and its
                   TrojanTrigger on the images with the same trigger image (bytes; np.float as for lf)
Not compared: BackdoorBench's clean and adversarially trained surrogate checkpoints (not shipped;
ours trains the cell's architecture clean, harness/backdoor/surrogate.py), its whole multi-pass UAP
run (the same pass repeated, with its fooling-rate stop rules: those rules are read, not run) and
its evaluation-image selection (np.array over a generator: it does not select as written).
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import numpy as np
import torch

from conformance_checks.backdoorbench import _byte_diff, _images, _ours, _their_generator, _theirs
from conformance_checks.common import Compared, import_file, max_abs, tiny_model

REPOSITORY = "SCLBD/BackdoorBench"


@contextlib.contextmanager
def _np_float() -> Iterator[None]:
    """np.float as it was before numpy 1.24 (the builtin float), for their SimpleAdditiveTrigger."""
    had = "float" in np.__dict__
    np.float = float  # type: ignore[attr-defined]
    try:
        yield
    finally:
        if not had:
            del np.float  # type: ignore[attr-defined]


def _lf_dir(reference: Path) -> Path:
    return reference / "resource" / "lowFrequency"


def _their_lf(reference: Path, name: str) -> Any:
    folder = _lf_dir(reference)
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))  # universal_pert.py imports `deepfool`, `gauss_smooth` by name
    return import_file(folder / f"{name}.py", search=reference)


def _lf_with(levels_hwc: np.ndarray) -> Any:
    from harness.backdoor.lf import LowFrequency

    ours = LowFrequency()
    ours.use_artifact({"trigger": np.ascontiguousarray(levels_hwc.transpose(2, 0, 1))})
    ours._loaded = "conformance"
    return ours


def check_lf(reference: Path) -> list[Compared]:
    from harness.backdoor import lf

    npy = _lf_dir(reference) / "cifar10_preactresnet18_0_255.npy"
    generate = _their_generator(reference)
    with _np_float():
        train_t, test_t = generate.bd_attack_img_trans_generate(
            SimpleNamespace(attack="lowFrequency", img_size=(32, 32, 3), lowFrequencyPatternPath=str(npy)))
        images = _images()
        theirs_train, theirs_test = _theirs(train_t, images), _theirs(test_t, images)
    mine = _ours(_lf_with(np.load(npy)), images)
    out = [Compared("lf_train_images", _byte_diff(theirs_train, mine), "image", "their shipped npy on both sides"),
           Compared("lf_test_images", _byte_diff(theirs_test, mine), "image")]

    smooth = _their_lf(reference, "gauss_smooth")
    field = np.random.default_rng(0).normal(size=(1, 32, 32, 3)).astype(np.float32)
    ours_smooth = lf.gauss_smooth(torch.from_numpy(field[0]).permute(2, 0, 1)).permute(1, 2, 0)
    out.append(Compared("lf_gauss_smooth", max_abs(smooth.gauss_smooth(field)[0], ours_smooth)))
    out.append(Compared("lf_normalization", max_abs(smooth.normalization(field),
                                                   lf.normalise(torch.from_numpy(field)))))

    model = tiny_model(in_chans=3, img_size=32).eval()
    x = torch.from_numpy(_images(4, seed=1)[:4]).permute(0, 3, 1, 2).float() / 255
    deepfool = _their_lf(reference, "deepfool")
    start = x[0]
    target = (int(model(start[None]).argmax(1)) + 1) % 10
    r_theirs, loops_theirs, _, _ = deepfool.tar_deepfool(start.clone(), model, target=target, num_classes=10,
                                                         overshoot=0.02, max_iter=200)
    r_ours, loops_ours = lf.targeted_deepfool(model, start, target, 0.02, 200)
    out.append(Compared("lf_deepfool_step", max_abs(r_theirs[0], r_ours.permute(1, 2, 0)), "float",
                        f"{loops_ours} iterations"))
    out.append(Compared("lf_deepfool_iterations", abs(loops_theirs - loops_ours), "int"))
    out.append(_uap_pass(reference, model, lf))
    return out


def _uap_pass(reference: Path, model: torch.nn.Module, lf: Any) -> Compared:
    """One pass of their universal_perturbation vs ours on the images in their shuffled order."""
    universal = _their_lf(reference, "universal_pert")
    data = (_images(6, seed=2)[:6].astype(np.float32) / 255)
    evaluation = [(torch.from_numpy(img).permute(2, 0, 1), 0) for img in (_images(10, seed=3)[:10].astype(np.float32) / 255)]
    shuffled = data.copy()
    with torch.no_grad():  # a target none of the images starts at: else their normalisation divides by 0 (NaN)
        seen = set(model(torch.from_numpy(data).permute(0, 3, 1, 2)).argmax(1).tolist())
    target = min(set(range(10)) - seen)
    np.random.seed(0)
    logging.disable(logging.INFO)
    try:
        with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(open(os.devnull, "w")):
            v_theirs = universal.universal_perturbation(shuffled, evaluation, model, target=target, max_iter_uni=1,
                                                        num_classes=10, overshoot=0.02, max_iter_df=200,
                                                        device="cpu", save_path_prefix=str(Path(tmp) / "lf"))
    finally:
        logging.disable(logging.NOTSET)
    ours = lf.LowFrequency(max_passes=1, target=target)
    v_ours = ours.uap_pass(model, torch.from_numpy(shuffled).permute(0, 3, 1, 2), torch.zeros(3, 32, 32))
    return Compared("lf_uap_pass", max_abs(np.asarray(v_theirs).reshape(32, 32, 3), v_ours.permute(1, 2, 0)), "float",
                    f"v after one pass over 6 images, target {target}")


def check_lc(reference: Path) -> list[Compared]:
    from harness.backdoor.lc import LabelConsistent, pgd

    generate = _their_generator(reference)
    out: list[Compared] = []
    images32 = _images()
    for size in (32, 16):
        images = images32 if size == 32 else np.ascontiguousarray(images32[:, ::2, ::2])
        adversarial = np.random.default_rng(size).integers(0, 256, images.shape, dtype=np.uint8)
        for amplitude in (1.0, 0.5):
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "adv.npy"
                np.save(path, adversarial)
                args = SimpleNamespace(attack="label_consistent", img_size=(size, size, 3),
                                       reduced_amplitude=amplitude, attack_train_replace_imgs_path=str(path))
                train_t, test_t = generate.bd_attack_img_trans_generate(args)
                theirs_train, theirs_test = _theirs(train_t, images), _theirs(test_t, images)
            ours = LabelConsistent(reduced_amplitude=amplitude)
            ours.use_artifact({"indices": np.arange(len(images)),
                               "images": np.ascontiguousarray(adversarial.transpose(0, 3, 1, 2))})
            ours._loaded = "conformance"
            x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
            mine_train = (ours.train_variant(x, np.arange(len(images))) * 255).round().to(torch.uint8)
            tag = f"lc_{size}px_a{amplitude:g}"
            out.append(Compared(f"{tag}_train_images",
                                _byte_diff(theirs_train, mine_train.permute(0, 2, 3, 1).numpy()), "image"))
            out.append(Compared(f"{tag}_test_images", _byte_diff(theirs_test, _ours(ours, images)), "image"))

    cwd = os.getcwd()
    craft = import_file(reference / "resource" / "label-consistent" / "craft_adv_dataset.py", search=reference)
    os.chdir(cwd)
    model = tiny_model(in_chans=3, img_size=32).eval()
    x = torch.from_numpy(_images(8, seed=4)[:8]).permute(0, 3, 1, 2).float() / 255
    y = torch.arange(8) % 10
    attacker = craft.PGD(model, eps=8 / 255, alpha=1.5 / 255, steps=100, device="cpu")
    attacker.set_return_type("int")
    theirs = attacker(x, y)
    mine = (pgd(model, x, y, 8 / 255, 1.5 / 255, 100) * 255).to(torch.uint8)
    out.append(Compared("lc_pgd_images", _byte_diff(theirs.numpy(), mine.numpy()), "image",
                        "eps 8/255, alpha 1.5/255, 100 steps, uint8"))
    return out


def check_trojannn(reference: Path) -> list[Compared]:
    from PIL import Image
    from torchvision import transforms

    from harness.backdoor import trojannn

    _their_generator(reference)
    theirs = import_file(reference / "attack" / "trojannn.py", search=reference)
    out: list[Compared] = []
    square = transforms.ToTensor()(transforms.Resize((32, 32))(Image.open(reference / "resource" / "trojannn" /
                                                                          "square.png")))
    out.append(Compared("trojannn_mask", max_abs(square, trojannn.square_mask(3, 32, 32)), "float",
                        "their square.png resized vs our procedural square"))

    model = tiny_model(in_chans=3, img_size=32).eval()
    layer = next(name for name, module in model.named_modules() if module is model.head)
    key = f"{layer}.weight"  # their `selected_layer_param_name` (linear.weight on PreActResNet-18)
    picked_theirs = theirs.get_most_connected_neuron_idxes(model, key, 2)
    picked_ours = trojannn.most_connected(model.head, 2)
    out.append(Compared("trojannn_neurons", float((picked_theirs != picked_ours).sum()), "int"))
    logging.disable(logging.INFO)
    try:
        with contextlib.redirect_stderr(open(os.devnull, "w")):
            image_theirs = theirs.pgd_with_mask_to_selected_neuron(model, square[None].clone(), layer, picked_theirs,
                                                                   [100.0, 100.0], iters=50, device=torch.device("cpu"))
    finally:
        logging.disable(logging.NOTSET)
    image_ours = trojannn.optimise_trigger(model, square[None].clone(), picked_ours, 100.0, 50, 0.3, 0.1, 1e-3)
    moved = max_abs(image_ours, square[None])
    out.append(Compared("trojannn_trigger_50_steps", max_abs(image_theirs, image_ours), "float",
                        f"eps 0.3, alpha 0.1, target 100, 50 of the 1000 steps (moved the mask by {moved:.2f})"))

    levels = (image_ours[0] * 255).to(torch.uint8)  # ToPILImage's bytes
    target_image = np.array(transforms.ToPILImage()(image_ours[0]))
    images = _images()
    with _np_float():
        trigger = theirs.TrojanTrigger(target_image)
        poisoned_theirs = np.stack([trigger(img.copy()) for img in images])
    for overflow in ("wrap",):
        ours = trojannn.TrojanNN(overflow=overflow)
        ours.use_artifact({"trigger": levels.numpy()})
        ours._loaded = "conformance"
        out.append(Compared(f"trojannn_images_{overflow}", _byte_diff(poisoned_theirs, _ours(ours, images)), "image",
                            "their TrojanTrigger (uint8 cast before the clip: wraps)"))
    return out


CHECKS = {"lf": check_lf, "lc": check_lc, "trojannn": check_trojannn}
