"""Neural Cleanse (Wang et al., IEEE S&P 2019), as SCLBD/BackdoorBench defense/nc.py runs it.

Two train nodes of the plan (`Method.upstream`), both from the grid's backdoored ERM model:

1. `nc_trigger`: reverse-engineer, for every class k, the smallest trigger (mask m_k in [0,1]^{HxW},
   pattern p_k in [0,1]^{CxHxW}) that sends the defender's clean 5% to k: x' = (1 - m) x + m p,
   m = tanh(a) / (2 + 1e-7) + 0.5 (the same for p), loss CE(f(x'), k) + cost_k * ||m_k||_1; Adam lr
   0.1, betas (0.5, 0.9), batch 256, 80 epochs (`nc_epoch`), init a = b = 1; the classifier frozen
   in eval mode. At each epoch's end, per class (their `train_step`'s tail, the `Recorder`): keep
   the mask with the smallest mean L1 among epochs whose mean minibatch attack accuracy is >= 98%;
   the cost starts at 1e-3 and is multiplied by 2 after 5 epochs at >= 98%, divided by 2^1.5 after
   5 below (reset when 0); early stop after 25 epochs without a 1% better norm once the cost went
   both up and down. All classes are optimised side by side on the same batches (each class's
   loss touches only its own mask and pattern, and Adam is elementwise: as K separate runs on
   one batch order; theirs runs them one after another, each on its own shuffle).
2. `nc` (this cell): MAD outlier test on the K mask L1 norms (consistency 1.4826): anomaly index
   |min - median| / MAD; the classes below the median with |norm - median| / MAD > 2 are flagged
   (their `outlier_detection`). Unlearning: fine-tune on the clean subset with the flagged
   class's reversed trigger stamped on a share (`unlearning_ratio`, 20%) of the samples, which
   keep their true labels; BackdoorBench's trainer settings (100 epochs, batch 256, SGD 0.01,
   momentum 0.9, wd 5e-4, cosine). The anomaly index, flagged classes and norms are printed and
   logged in the training curve (`nc_anomaly_index`, `nc_flagged`).
Where we differ: theirs stamps a fixed last 20% of the clean subset (one stamped copy per flagged
class, on uint8 images through PNG files) and trains on the first 80% clean; ours stamps a random
20% of each batch (one flagged class drawn per stamped sample), in float. With no class flagged
theirs returns the model untouched, ours still fine-tunes it on the clean subset (the epochs are
fixed when the plan is made): the flag count is in the curve.

At scale: the reverse engineering is K forwards and backwards per clean batch for up to 80
epochs (CIFAR-10: 10 x 80 x 2,500 images, about 20 ERM epochs); its memory is K triggers.
"""
from __future__ import annotations

import math

from typing import Any, ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from architectures.classifier import Classifier
from harness.core.registry import METHODS
from harness.store.checkpoints import load_checkpoint
from methods.base import Method, TrainContext, Upstream
from methods.ft import FineTuning, load_weights, method_defaults

TANH_EPS = 1e-7  # their EPSILON
MAD_CONSISTENCY = 1.4826
# reverse-engineering settings (config/defense/nc/cifar10.yaml), passed to the nc_trigger node
TRIGGER_SETTINGS = ("clean_subset", "nc_epoch", "batch_size", "mask_lr", "init_cost", "atk_succ_threshold",
                    "early_stop", "early_stop_threshold", "early_stop_patience", "patience", "cost_multiplier")


def squash(raw: torch.Tensor) -> torch.Tensor:
    """tanh(raw) / (2 + 1e-7) + 0.5: their mask and pattern parametrisation, in (0, 1)."""
    return torch.tanh(raw) / (2 + TANH_EPS) + 0.5


def anomaly(norms: torch.Tensor, threshold: float = 2.0) -> tuple[float, list[int]]:
    """(anomaly index, flagged classes sorted by norm): MAD = 1.4826 * median|n - median|; index
    |min - median| / MAD; flagged: n <= median and |n - median| / MAD > threshold."""
    norms = norms.double()
    median = torch.median(norms)
    mad = MAD_CONSISTENCY * torch.median((norms - median).abs())
    index = float((norms.min() - median).abs() / mad)
    flagged = [k for k in range(len(norms)) if not norms[k] > median and float((norms[k] - median).abs() / mad) > threshold]
    return index, sorted(flagged, key=lambda k: float(norms[k]))


class Triggers(nn.Module):
    """A frozen classifier (always in eval mode) and one (mask, pattern) per class."""

    def __init__(self, classifier: Classifier, num_classes: int, channels: int, size: int) -> None:
        super().__init__()
        self.classifier = classifier
        for q in classifier.parameters():
            q.requires_grad_(False)
        self.mask_tanh = nn.Parameter(torch.ones(num_classes, 1, size, size))
        self.pattern_tanh = nn.Parameter(torch.ones(num_classes, channels, size, size))

    def train(self, mode: bool = True) -> "Triggers":
        super().train(mode)
        self.classifier.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(K, B, classes): the logits of x stamped with each class's trigger."""
        mask, pattern = squash(self.mask_tanh), squash(self.pattern_tanh)
        stamped = (1 - mask[:, None]) * x[None] + mask[:, None] * pattern[:, None]
        return self.classifier(stamped.flatten(0, 1)).view(mask.shape[0], x.shape[0], -1)


@METHODS.register("nc_trigger")
class NCTrigger(Method):
    """Neural Cleanse's reverse engineering (a train node of `nc`): every class's smallest trigger."""

    name = "nc_trigger"
    paper: ClassVar[dict[str, str]] = {"title": "Neural Cleanse: Identifying and Mitigating Backdoor Attacks in "
                                                "Neural Networks (trigger reverse engineering)",
                                       "venue": "IEEE S&P", "year": "2019"}

    def __init__(self, clean_subset: float = 0.05, nc_epoch: int = 80, batch_size: int = 256, mask_lr: float = 0.1,
                 init_cost: float = 1e-3, atk_succ_threshold: float = 98.0, early_stop: bool = True,
                 early_stop_threshold: float = 0.99, early_stop_patience: int = 25, patience: int = 5,
                 cost_multiplier: float = 2.0, backdoored_checkpoint: str | None = None) -> None:
        super().__init__()
        self.clean_subset, self.nc_epoch, self.batch_size = float(clean_subset), int(nc_epoch), int(batch_size)
        self.init_cost, self.threshold = float(init_cost), float(atk_succ_threshold)
        self.early_stop, self.stop_threshold = bool(early_stop), float(early_stop_threshold)
        self.stop_patience, self.patience = int(early_stop_patience), int(patience)
        self.up, self.down = float(cost_multiplier), float(cost_multiplier) ** 1.5
        self.backdoored_checkpoint = backdoored_checkpoint
        self.module: Triggers | None = None
        self.state: dict[str, Any] = {}
        self._sums: torch.Tensor | None = None  # per class: minibatch accuracy (%) sum, L1 sum; and the batch count

    @classmethod
    def upstream(cls, method_cfg: dict[str, Any], trainer_cfg: dict[str, Any]) -> list[Upstream]:
        return [Upstream("backdoored_checkpoint", {"name": "erm"})]

    @classmethod
    def runtime_trainer(cls, method_cfg: dict[str, Any], trainer_cfg: dict[str, Any]) -> dict[str, Any]:
        s = {**method_defaults(cls), **method_cfg}
        return {"epochs": int(s["nc_epoch"]), "batch_size": int(s["batch_size"]),
                "optimizer": {"name": "adam", "lr": float(s["mask_lr"]), "betas": [0.5, 0.9], "weight_decay": 0.0},
                "schedule": {"name": "constant", "granularity": "epoch", "warmup_epochs": 0}}

    def build(self, model: Classifier) -> nn.Module:
        load_weights(model, self.backdoored_checkpoint)
        channels = int(model.mean.shape[1])
        size = getattr(model, "input_size", None)
        if not size:
            raise ValueError("nc_trigger needs the classifier's input size (architectures.presets.build_classifier "
                             "sets `input_size`); build the model with build_classifier")
        self.module = Triggers(model, model.num_classes, channels, int(size))
        k = model.num_classes
        self.state = {"cost": torch.full((k,), self.init_cost, dtype=torch.float64),
                      "reg_best": torch.full((k,), float("inf"), dtype=torch.float64),
                      "stop_best": torch.full((k,), float("inf"), dtype=torch.float64),
                      "counters": torch.zeros(k, 4, dtype=torch.int64),  # set, up, down, early stop
                      "flags": torch.zeros(k, 2, dtype=torch.bool),  # cost went up, down
                      "done": torch.zeros(k, dtype=torch.bool),
                      "mask_best": squash(self.module.mask_tanh.detach()).clone(),
                      "pattern_best": squash(self.module.pattern_tanh.detach()).clone(),
                      "has_best": torch.zeros(k, dtype=torch.bool)}
        return self.module

    def eval_model(self, module: nn.Module) -> Classifier:
        return module.classifier

    def param_groups(self, module: nn.Module) -> list[dict[str, Any]]:
        return [{"params": [module.mask_tanh, module.pattern_tanh]}]

    def training_step(self, module: nn.Module, x: torch.Tensor, y: torch.Tensor,
                      ctx: TrainContext) -> dict[str, torch.Tensor]:
        raw = self.module
        assert raw is not None
        logits = module(x)  # (K, B, classes)
        k = logits.shape[0]
        targets = torch.arange(k, device=x.device)[:, None].expand(k, x.shape[0])
        ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(k, -1).mean(1)
        reg = squash(raw.mask_tanh).flatten(1).abs().sum(1)  # torch.norm(mask, 1)
        cost = self.state["cost"].to(x.device, reg.dtype)
        loss = (ce + cost * reg).sum()
        acc = (logits.argmax(2) == targets).float().mean(1) * 100.0
        batch = torch.cat([acc.detach(), reg.detach(), torch.ones(1, device=x.device)]).double().cpu()
        self._sums = batch if self._sums is None else self._sums + batch
        return {"loss": loss, "loss_ce": ce.detach().mean(), "mask_l1": reg.detach().mean(),
                "attack_acc": acc.detach().mean() / 100.0}

    def on_epoch_start(self, ctx: TrainContext) -> None:
        self._sums = None

    def on_epoch_end(self, ctx: TrainContext) -> None:
        """Their Recorder, per class, on the epoch's mean minibatch accuracy and mask L1 (all ranks)."""
        raw = self.module
        assert raw is not None and self._sums is not None
        sums = self._sums.clone()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            sums = sums.to(ctx.device)
            dist.all_reduce(sums)
            sums = sums.cpu()
        k = raw.mask_tanh.shape[0]
        acc, reg = sums[:k] / sums[-1], sums[k:2 * k] / sums[-1]
        self.record(acc, reg, squash(raw.mask_tanh.detach()).cpu(), squash(raw.pattern_tanh.detach()).cpu())

    def record(self, acc: torch.Tensor, reg: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor) -> None:
        """One epoch's end of their `train_step` for every class still running (`acc` in %)."""
        s = self.state
        for c in range(len(acc)):
            if bool(s["done"][c]):
                continue
            hit = float(acc[c]) >= self.threshold
            if hit and float(reg[c]) < float(s["reg_best"][c]):
                s["mask_best"][c], s["pattern_best"][c] = mask[c], pattern[c]
                s["reg_best"][c], s["has_best"][c] = float(reg[c]), True
            counters, flags = s["counters"][c], s["flags"][c]
            if self.early_stop:
                if float(s["reg_best"][c]) < float("inf"):
                    if float(s["reg_best"][c]) >= self.stop_threshold * float(s["stop_best"][c]):
                        counters[3] += 1
                    else:
                        counters[3] = 0
                s["stop_best"][c] = min(float(s["stop_best"][c]), float(s["reg_best"][c]))
                if bool(flags[0]) and bool(flags[1]) and int(counters[3]) >= self.stop_patience:
                    s["done"][c] = True
                    continue
            if float(s["cost"][c]) == 0 and hit:
                counters[0] += 1
                if int(counters[0]) >= self.patience:  # their reset_state
                    s["cost"][c] = self.init_cost
                    counters[1] = counters[2] = 0
                    flags[:] = False
            else:
                counters[0] = 0
            if hit:
                counters[1] += 1
                counters[2] = 0
            else:
                counters[1] = 0
                counters[2] += 1
            if int(counters[1]) >= self.patience:
                counters[1] = 0
                s["cost"][c] *= self.up
                flags[0] = True
            elif int(counters[2]) >= self.patience:
                counters[2] = 0
                s["cost"][c] /= self.down
                flags[1] = True
            if not bool(s["has_best"][c]):  # their "save the final version" while nothing qualified
                s["mask_best"][c], s["pattern_best"][c] = mask[c], pattern[c]

    def state_dict(self) -> dict[str, Any]:
        return {k: v.clone() for k, v in self.state.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state.update({k: v.clone() for k, v in state.items()})


def stamp(x: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """x * (1 - m) + m * p: a reversed trigger on images in [0, 1]."""
    return x * (1 - mask) + mask * pattern


@METHODS.register("nc")
class NeuralCleanse(FineTuning):
    """Neural Cleanse's detection (MAD on the reversed masks) and unlearning with the trigger."""

    name = "nc"
    backdoor_defense = True
    paper: ClassVar[dict[str, str]] = {"title": "Neural Cleanse: Identifying and Mitigating Backdoor Attacks in "
                                                "Neural Networks", "venue": "IEEE S&P", "year": "2019"}

    def __init__(self, clean_subset: float = 0.05, epochs: int = 100, batch_size: int = 256, lr: float = 0.01,
                 lr_schedule: str = "cosine", lr_milestones: list[int] = (), lr_gamma: float = 0.1,
                 momentum: float = 0.9, weight_decay: float = 5e-4, nesterov: bool = False,
                 unlearning_ratio: float = 0.2, anomaly_threshold: float = 2.0, nc_epoch: int = 80,
                 mask_lr: float = 0.1, init_cost: float = 1e-3, atk_succ_threshold: float = 98.0,
                 early_stop: bool = True, early_stop_threshold: float = 0.99, early_stop_patience: int = 25,
                 patience: int = 5, cost_multiplier: float = 2.0, backdoored_checkpoint: str | None = None,
                 trigger_checkpoint: str | None = None) -> None:
        super().__init__(clean_subset, epochs, batch_size, lr, lr_schedule, lr_milestones, lr_gamma, momentum,
                         weight_decay, nesterov, cutout_length=0, backdoored_checkpoint=backdoored_checkpoint)
        if not 0 <= float(unlearning_ratio) <= 1:
            raise ValueError(f"nc needs 0 <= unlearning_ratio <= 1, got {unlearning_ratio}")
        self.ratio, self.anomaly_threshold = float(unlearning_ratio), float(anomaly_threshold)
        self.trigger_checkpoint = trigger_checkpoint
        self.report: dict[str, Any] = {"anomaly_index": float("nan"), "flagged": [], "norms": []}
        self.masks: torch.Tensor | None = None
        self.patterns: torch.Tensor | None = None

    @classmethod
    def trigger_method(cls, method_cfg: dict[str, Any]) -> dict[str, Any]:
        s = {**method_defaults(cls), **method_cfg}
        return {"name": "nc_trigger", **{k: s[k] for k in TRIGGER_SETTINGS}}

    @classmethod
    def upstream(cls, method_cfg: dict[str, Any], trainer_cfg: dict[str, Any]) -> list[Upstream]:
        return [Upstream("backdoored_checkpoint", {"name": "erm"}),
                Upstream("trigger_checkpoint", cls.trigger_method(method_cfg))]

    def build(self, model: Classifier) -> nn.Module:
        module = super().build(model)
        if self.trigger_checkpoint:
            state = load_checkpoint(self.trigger_checkpoint)["method"]
            self.masks, self.patterns = state["mask_best"].float(), state["pattern_best"].float()
            norms = self.masks.flatten(1).abs().sum(1)
            index, flagged = anomaly(norms, self.anomaly_threshold)
            self.report = {"anomaly_index": index, "flagged": flagged, "norms": [round(float(n), 4) for n in norms]}
            print(f"nc: anomaly index {index:.3f}, flagged classes {flagged}, mask L1 norms {self.report['norms']}",
                  flush=True)
        return module

    def summary(self) -> dict[str, Any]:
        """The detection: anomaly index (null without a trigger node), flagged classes, mask norms."""
        index = self.report["anomaly_index"]
        return {**self.report, "anomaly_index": index if math.isfinite(index) else None}

    def training_step(self, module: nn.Module, x: torch.Tensor, y: torch.Tensor,
                      ctx: TrainContext) -> dict[str, torch.Tensor]:
        flagged = self.report["flagged"]
        if flagged and self.masks is not None and self.ratio > 0:
            share = torch.rand(x.shape[0], device=x.device) < self.ratio
            which = torch.as_tensor(flagged, device=x.device)[torch.randint(len(flagged), (x.shape[0],), device=x.device)]
            masks, patterns = self.masks.to(x.device)[which], self.patterns.to(x.device)[which]
            x = torch.where(share[:, None, None, None], stamp(x, masks, patterns), x)
        logs = super().training_step(module, x, y, ctx)
        if self.masks is not None:  # (the triggers read: the decision, in the training curve)
            logs["nc_anomaly_index"] = torch.tensor(self.report["anomaly_index"])
            logs["nc_flagged"] = torch.tensor(float(len(flagged)))
        return logs
