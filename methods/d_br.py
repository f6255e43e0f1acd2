"""D-BR: sample distinguishment by feature consistency towards transformations, then backdoor
removal (Chen, Wu, Wang; NeurIPS 2022), as SCLBD/BackdoorBench runs it (defense/d-br.py,
utils/defense_utils/dbr/sd.py and dataloader_bd.py, config/defense/d-br/cifar10.yaml).

A training-time defense on the poisoned training split; three train nodes:
1. `d_br_sd` (their `train_attack_noTrans`, an upstream of this cell): a model trained FROM SCRATCH
   on the poisoned split without augmentation (their transform1: Resize + ToTensor), CE for
   `sd_epochs` 2, then `intra_epochs` 10 more with their L_intra on the pooled features (head
   dropped: `drop_linear`): the mean over the (classes in the batch)^2 cosine similarities of the
   class centres, diagonal set to 0. One SGD through both (lr 0.01, momentum 0.9, wd 5e-4), batch
   128, shuffled, BatchNorm in train mode.
2. FCT (`fct_scores`, their `calculate_consistency`): per training sample, under that model in
   eval mode, the mean over feature dimensions of (f(x) - f(T(x)))^2, T their transform3:
   RandomRotation(180) then RandomAffine(translate 0.2, 0.2) (trans1 rotate, trans2 affine;
   nearest, fill 0). Thresholds (`calculate_gamma`): gamma_c = the sorted scores at
   floor(n * clean_ratio) (0.2), gamma_p at n - floor(n * poison_ratio) (0.05). Separation
   (`separate_samples`): a SECOND pass with fresh transforms; score <= gamma_c: clean D_c,
   >= gamma_p: poisoned D_p, the rest left out (the paper's observation: a poisoned sample's
   features move MORE under T than a clean one's, so D_p is the high end).
3. `d_br` (this cell, `unlearn_relearn`): from the grid's backdoored ERM (their attack's model),
   20 epochs, each one pass over D_p with -CE (the trainer's pre-pass, `pre_pass_samples`, stepped
   by the trainer's optimiser: `pre_pass_steps_trainer`) and then one pass over D_c with CE (the
   training pass): ONE SGD, lr 1e-4 constant, momentum 0.9, wd 5e-4, batch 128, BatchNorm in
   train mode, both sets with their transform_finetuning (RandomCrop pad 4, flip on CIFAR-10:
   here the cell's augmentation).

Where we depart from BackdoorBench's code:
- the SD model's lr: theirs is CosineAnnealingLR(T_max=100) stepped per epoch through its 12
  epochs (factor 1.0 down to 0.970); ours is constant (the trainer's cosine spans the run);
- T is drawn per sample from a generator seeded by `seed` (theirs: the global RNG through PIL
  transforms), and applied to tensors by torchvision's functional rotate / affine (theirs: PIL);
  the conformance check feeds both sides the same transformed images;
- their data loaders shuffle the passes; ours score in index order (no effect on the scores);
- each pass's batches are cut to near-equal sizes (the trainer's even batches, for DDP);
- only their default transformation pair (rotate, affine) is implemented; other `trans1` /
  `trans2` values are refused.
D-BR reads no clean data (their yaml's `ratio: 0.05` is unused by d-br.py).

At scale: two FCT passes over the split (two forwards each, plus a per-sample rotate and
translate: ImageNet's 1.28 M images, about two epochs of inference), one float per sample gathered.
"""
from __future__ import annotations

import copy
import math
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from architectures.classifier import Classifier
from harness.core.registry import METHODS
from methods.base import Method, TrainContext, TrainSamples, Upstream
from methods.ft import load_weights, method_defaults

SD = {"sd_epochs": 2, "intra_epochs": 10, "sd_lr": 0.01, "sd_momentum": 0.9, "sd_weight_decay": 5e-4,
      "sd_batch_size": 128}  # set_new_args('train_notrans' / 'finetune_notrans'), cifar10.yaml
TRANSFORMS = ("rotate", "affine")  # their defaults trans1, trans2: the only pair implemented


def random_transform(x: torch.Tensor, generator: torch.Generator, degrees: float = 180.0,
                     translate: float = 0.2) -> torch.Tensor:
    """Their transform3 on a batch in [0, 1]: per sample, RandomRotation(degrees) then
    RandomAffine(degrees=0, translate=(translate, translate)); nearest, fill 0. The draws follow
    torchvision's get_params: angle ~ U(-degrees, degrees); tx = round(U(-t W, t W)), ty alike."""
    h, w = x.shape[-2:]
    out = torch.empty_like(x)
    for i in range(x.shape[0]):
        angle = float(torch.empty(1).uniform_(-degrees, degrees, generator=generator))
        tx = int(round(float(torch.empty(1).uniform_(-translate * w, translate * w, generator=generator))))
        ty = int(round(float(torch.empty(1).uniform_(-translate * h, translate * h, generator=generator))))
        out[i] = transform_one(x[i], angle, tx, ty)
    return out


def transform_one(image: torch.Tensor, angle: float, tx: int, ty: int) -> torch.Tensor:
    """One image rotated by `angle` (counter-clockwise, about its centre) then shifted by (tx, ty)."""
    rotated = TF.rotate(image, angle, interpolation=InterpolationMode.NEAREST, fill=0.0)
    return TF.affine(rotated, angle=0.0, translate=[tx, ty], scale=1.0, shear=[0.0, 0.0],
                     interpolation=InterpolationMode.NEAREST, fill=0.0)


def fct(model: Classifier, x: torch.Tensor, x_transformed: torch.Tensor) -> torch.Tensor:
    """Feature consistency towards transformations: mean over dims of (f(x) - f(T x))^2 (B,)."""
    f1, f2 = model.features(x)[0].flatten(1), model.features(x_transformed)[0].flatten(1)
    return ((f1 - f2) ** 2).mean(1)


def thresholds(scores: np.ndarray, clean_ratio: float, poison_ratio: float) -> tuple[float, float]:
    """(gamma_c, gamma_p) as their calculate_gamma: the ascending scores at floor(n clean_ratio)
    and at n - floor(n poison_ratio)."""
    n = len(scores)
    clean_size, poison_size = int(n * clean_ratio), int(n * poison_ratio)
    if poison_size < 1 or clean_size >= n:
        raise ValueError(f"d_br: poison_ratio={poison_ratio} and clean_ratio={clean_ratio} of {n} training samples "
                         f"select {poison_size} suspected poisoned and threshold at rank {clean_size}; "
                         f"raise poison_ratio (or use more data)")
    ordered = np.sort(scores)
    return float(ordered[clean_size]), float(ordered[n - poison_size])


def intra_loss(features: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Their L_intra: the mean of the cosine-similarity matrix of the batch's class centres (the
    classes present), its diagonal set to 0."""
    centers = [features[y == j].mean(0) for j in range(num_classes) if bool((y == j).any())]
    c = F.normalize(torch.stack(centers), dim=1)
    sim = c @ c.T
    sim = sim.masked_fill(torch.eye(len(centers), dtype=torch.bool, device=sim.device), 0.0)
    return sim.mean()


def check_ratios(clean_ratio: float, poison_ratio: float) -> tuple[float, float]:
    c, p = float(clean_ratio), float(poison_ratio)
    if not (0 < c < 1 and 0 < p < 1 and c + p <= 1):
        raise ValueError(f"d_br needs 0 < clean_ratio, 0 < poison_ratio and clean_ratio + poison_ratio <= 1 "
                         f"(BackdoorBench: 0.2 and 0.05), got {clean_ratio} and {poison_ratio}")
    return c, p


class _FeaturesAndLogits(nn.Module):
    """The classifier whose forward returns (pooled features, logits), so the L_intra epochs
    backpropagate through DDP; its state dict is the classifier's under `classifier.`."""

    def __init__(self, classifier: Classifier) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.classifier.features(x)


@METHODS.register("d_br_sd")
class DBRSeparationModel(Method):
    """D-BR's sample-distinguishment model: CE from scratch, then L_intra on the features."""

    name = "d_br_sd"
    find_unused_parameters = True  # the L_intra epochs leave the head without a gradient
    paper: ClassVar[dict[str, str]] = {"title": "Effective Backdoor Defense by Exploiting Sensitivity of Poisoned "
                                                "Samples (the FCT model)", "venue": "NeurIPS", "year": "2022"}

    def __init__(self, sd_epochs: int = 2, intra_epochs: int = 10, sd_lr: float = 0.01, sd_momentum: float = 0.9,
                 sd_weight_decay: float = 5e-4, sd_batch_size: int = 128) -> None:
        super().__init__()
        if int(sd_epochs) < 0 or int(intra_epochs) < 0 or int(sd_epochs) + int(intra_epochs) < 1:
            raise ValueError(f"d_br_sd needs sd_epochs, intra_epochs >= 0 and at least one epoch, got "
                             f"{sd_epochs}, {intra_epochs}")
        self.sd_epochs = int(sd_epochs)
        self.num_classes = 0

    @classmethod
    def runtime_trainer(cls, method_cfg: dict[str, Any], trainer_cfg: dict[str, Any]) -> dict[str, Any]:
        s = {**SD, **method_cfg}
        return {"epochs": int(s["sd_epochs"]) + int(s["intra_epochs"]), "batch_size": int(s["sd_batch_size"]),
                "optimizer": {"name": "sgd", "lr": float(s["sd_lr"]), "momentum": float(s["sd_momentum"]),
                              "weight_decay": float(s["sd_weight_decay"]), "nesterov": False},
                "schedule": {"name": "constant", "granularity": "epoch", "warmup_epochs": 0}}

    @classmethod
    def runtime_data(cls, method_cfg: dict[str, Any], data_cfg: dict[str, Any]) -> dict[str, Any]:
        return {"augment": {}}  # their transform1: Resize + ToTensor

    def build(self, model: Classifier) -> nn.Module:
        self.num_classes = int(model.head.out_features) if isinstance(model.head, nn.Linear) else 0
        return _FeaturesAndLogits(model)

    def eval_model(self, module: nn.Module) -> Classifier:
        return module.classifier  # type: ignore[return-value]

    def training_step(self, module: nn.Module, x: torch.Tensor, y: torch.Tensor,
                      ctx: TrainContext) -> dict[str, torch.Tensor]:
        features, logits = module(x)
        if ctx.epoch < self.sd_epochs:
            return {"loss": F.cross_entropy(logits, y), "train_acc": (logits.argmax(1) == y).float().mean()}
        num_classes = self.num_classes or int(logits.shape[1])
        return {"loss": intra_loss(features.flatten(1), y, num_classes)}


@METHODS.register("d_br")
class DBR(Method):
    """D-BR's backdoor removal: unlearn D_p, relearn D_c, every epoch, from the backdoored model."""

    name = "d_br"
    backdoor_defense = True
    pre_pass_steps_trainer = True
    paper: ClassVar[dict[str, str]] = {"title": "Effective Backdoor Defense by Exploiting Sensitivity of Poisoned "
                                                "Samples", "venue": "NeurIPS", "year": "2022"}

    def __init__(self, clean_ratio: float = 0.2, poison_ratio: float = 0.05, trans1: str = "rotate",
                 trans2: str = "affine", sd_epochs: int = 2, intra_epochs: int = 10, sd_lr: float = 0.01,
                 sd_momentum: float = 0.9, sd_weight_decay: float = 5e-4, sd_batch_size: int = 128,
                 epochs: int = 20, batch_size: int = 128, lr: float = 1e-4, momentum: float = 0.9,
                 weight_decay: float = 5e-4, seed: int = 0, backdoored_checkpoint: str | None = None,
                 sd_checkpoint: str | None = None) -> None:
        super().__init__()
        self.clean_ratio, self.poison_ratio = check_ratios(clean_ratio, poison_ratio)
        if (trans1, trans2) != TRANSFORMS:
            raise ValueError(f"d_br: only BackdoorBench's default transformations trans1=rotate, trans2=affine are "
                             f"implemented, got {trans1}, {trans2}")
        if int(epochs) < 1 or float(lr) <= 0:
            raise ValueError(f"d_br needs epochs >= 1 and lr > 0, got {epochs}, {lr}")
        self.seed = int(seed)
        self.backdoored_checkpoint, self.sd_checkpoint = backdoored_checkpoint, sd_checkpoint
        self.scorer: Classifier | None = None
        self.suspected: np.ndarray | None = None
        self.stats: dict[str, float] = {}

    @staticmethod
    def sd_config(method_cfg: dict[str, Any]) -> dict[str, Any]:
        """The method config of the FCT model's node."""
        s = {**SD, **{k: v for k, v in method_cfg.items() if k in SD}}
        return {"name": "d_br_sd", **{k: (float(v) if "lr" in k or "momentum" in k or "decay" in k else int(v))
                                      for k, v in s.items()}}

    @classmethod
    def upstream(cls, method_cfg: dict[str, Any], trainer_cfg: dict[str, Any]) -> list[Upstream]:
        return [Upstream("backdoored_checkpoint", {"name": "erm"}), Upstream("sd_checkpoint", cls.sd_config(method_cfg))]

    @classmethod
    def runtime_trainer(cls, method_cfg: dict[str, Any], trainer_cfg: dict[str, Any]) -> dict[str, Any]:
        s = {**method_defaults(cls), **method_cfg}
        return {"epochs": int(s["epochs"]), "batch_size": int(s["batch_size"]),
                "optimizer": {"name": "sgd", "lr": float(s["lr"]), "momentum": float(s["momentum"]),
                              "weight_decay": float(s["weight_decay"]), "nesterov": False},
                "schedule": {"name": "constant", "granularity": "epoch", "warmup_epochs": 0}}

    def build(self, model: Classifier) -> nn.Module:
        """Train the backdoored model; keep the FCT model (the d_br_sd node's classifier) aside."""
        if self.sd_checkpoint:
            holder = _FeaturesAndLogits(copy.deepcopy(model))
            try:
                load_weights(holder, self.sd_checkpoint)
            except RuntimeError:  # a plain classifier's checkpoint (the tests' upstream ERM)
                load_weights(holder.classifier, self.sd_checkpoint)
            self.scorer = holder.classifier
        return load_weights(model, self.backdoored_checkpoint)

    def separate(self, samples: TrainSamples) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(D_c, D_p, the scores of the separating pass): thresholds from one FCT pass, the split
        by a second with fresh transforms, as their calculate_gamma then separate_samples."""
        model = self.scorer
        if model is None:
            raise ValueError("d_br scores the training split with its FCT model: it needs method.sd_checkpoint "
                             "(the plan sets it from its d_br_sd upstream)")
        model = model.to(samples.device).eval()
        passes = []
        for k in range(2):
            gen = torch.Generator().manual_seed(self.seed * 2 + k)
            passes.append(samples.score(lambda x, y: fct(model, x, random_transform(x.cpu(), gen).to(x.device))))
        (indices, first), (_, second) = passes
        gamma_c, gamma_p = thresholds(first, self.clean_ratio, self.poison_ratio)
        clean, poisoned = indices[second <= gamma_c], indices[second >= gamma_p]
        if not len(clean) or not len(poisoned):
            raise ValueError(f"d_br separated {len(clean)} clean and {len(poisoned)} poisoned samples; raise "
                             f"clean_ratio / poison_ratio")
        self.stats = {"gamma_c": gamma_c, "gamma_p": gamma_p, "clean_share": len(clean) / len(indices),
                      "poison_share": len(poisoned) / len(indices)}
        if len(samples.poisoned):
            self.stats["poison_precision"] = float(np.isin(poisoned, samples.poisoned).mean())
            self.stats["clean_precision"] = float(1.0 - np.isin(clean, samples.poisoned).mean())
        return clean, poisoned, second

    def select_train_samples(self, samples: TrainSamples) -> np.ndarray:
        clean, poisoned, _ = self.separate(samples)
        self.scorer = None  # needed once per run
        self.suspected = poisoned
        return clean

    def summary(self) -> dict[str, Any]:
        """The FCT separation: thresholds, the shares unlearned / relearned, their precision where
        the poisoned indices are known."""
        return {k: float(v) if math.isfinite(v) else None for k, v in self.stats.items()}

    def pre_pass(self, ctx: TrainContext) -> bool:
        return True  # unlearning first, every epoch

    def pre_pass_samples(self) -> np.ndarray | None:
        assert self.suspected is not None, "select_train_samples() comes first"
        return self.suspected

    def pre_pass_step(self, module: nn.Module, x: torch.Tensor, y: torch.Tensor,
                      ctx: TrainContext) -> dict[str, torch.Tensor]:
        ce = F.cross_entropy(module(x), y)
        return {"loss": -ce, "unlearn_ce": ce.detach()}

    def training_step(self, module: nn.Module, x: torch.Tensor, y: torch.Tensor,
                      ctx: TrainContext) -> dict[str, torch.Tensor]:
        logits = module(x)
        logs = {"loss": F.cross_entropy(logits, y), "train_acc": (logits.argmax(1) == y).float().mean()}
        return logs | {k: torch.tensor(v, device=x.device) for k, v in self.stats.items() if math.isfinite(v)}
