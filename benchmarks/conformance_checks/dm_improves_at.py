"""Weight EMA beside wzekai99/DM-Improves-AT (Wang et al. 2023; the averaging of Gowal et al. 2021
it reproduces): `gowal21uncovering/utils/watrain.py`'s `ema_update` after every optimiser step
and `update_bn` after every epoch, against harness/train/ema.py's WeightAverage.

One live model (our tiny test_resnet) takes 3 epochs x 12 SGD steps on seeded CIFAR-shaped
batches; the official average and ours follow it, each updated by its own code with the official
`global_step` ((epoch - 1) x steps per epoch + the 1-based step) and warm-up (0.025 x epochs x
steps per epoch: a fractional 0.9 step here), at tau 0.995 (train-wa.py's default) and at 0.9
(where the decay reaches its cap within the run):
  recipe numbers      train-wa.py's --tau default and WATrainer's warm-up fraction against our defaults
  average             parameters of the two averages after every epoch
  batchnorm           running statistics of the two averages after every epoch (theirs: update_bn)
  smoothed CE         the recipe's other piece: their SmoothCrossEntropyLoss (core/utils/utils.py)
                      at trades_loss's label_smoothing default against our TRADES natural term
"""
from __future__ import annotations

import ast
import copy
from pathlib import Path

import torch

from conformance_checks.common import Compared, load_functions, max_param_diff, tiny_batch, tiny_model

REPOSITORY = "wzekai99/DM-Improves-AT"
EPOCHS, STEPS = 3, 12


def _tau_default(script: Path) -> float:
    """train-wa.py's `--tau` default, read from its parser call (the script trains at import)."""
    for node in ast.walk(ast.parse(script.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument" and node.args \
                and isinstance(node.args[0], ast.Constant) and node.args[0].value == "--tau":
            return float(next(k.value.value for k in node.keywords if k.arg == "default"))
    raise ValueError(f"{script} has no --tau argument")


def _warmup_fraction(watrain: Path) -> float:
    """WATrainer's `self.warmup_steps = <fraction> * num_adv_epochs * update_steps`: the fraction."""
    for node in ast.walk(ast.parse(watrain.read_text())):
        if isinstance(node, ast.Assign) and ast.unparse(node.targets[0]) == "self.warmup_steps":
            return float(node.value.left.left.value)  # type: ignore[attr-defined]
    raise ValueError(f"{watrain} sets no self.warmup_steps")


def _run(official: dict, tau: float, warmup_fraction: float) -> tuple[float, float]:
    from harness.train.ema import EmaSettings, WeightAverage

    live = tiny_model()
    theirs = copy.deepcopy(live)  # WATrainer: wa_model = deepcopy(model)
    ours = WeightAverage(live, EmaSettings(tau, warmup_fraction, True), EPOCHS * STEPS, torch.device("cpu"))
    optimizer = torch.optim.SGD(live.parameters(), lr=0.05, momentum=0.9)
    params, buffers = 0.0, 0.0
    for epoch in range(1, EPOCHS + 1):
        for update_iter in range(1, STEPS + 1):
            x, y = tiny_batch(16, seed=epoch * 100 + update_iter)
            live.train()
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(live(x), y).backward()
            optimizer.step()
            global_step = (epoch - 1) * STEPS + update_iter
            official["ema_update"](theirs, live, global_step, decay_rate=tau,
                                   warmup_steps=warmup_fraction * EPOCHS * STEPS, dynamic_decay=True)
            ours.update(live, global_step)
        official["update_bn"](theirs, live)
        params = max(params, max_param_diff(theirs, ours.module))
        buffers = max(buffers, max_param_diff(theirs, ours.module, buffers=True))
    return params, buffers


def check_ema(reference: Path) -> list[Compared]:
    from harness.train.ema import EmaSettings

    watrain = reference / "gowal21uncovering" / "utils" / "watrain.py"
    official = load_functions(watrain, ["ema_update", "update_bn"], {"torch": torch})
    tau, fraction = _tau_default(reference / "train-wa.py"), _warmup_fraction(watrain)
    ours = EmaSettings(0.995)
    out = [Compared("recipe_tau", abs(tau - 0.995), note="ours: trainer.ema=0.995 (off unless set)"),
           Compared("recipe_warmup_fraction", abs(fraction - ours.warmup), note="trainer.ema_warmup default")]
    for decay in (tau, 0.9):
        params, buffers = _run(official, decay, fraction)
        out += [Compared(f"average_tau_{decay}", params), Compared(f"batchnorm_tau_{decay}", buffers)]
    return out + _smoothed_ce(reference)


def _smoothed_ce(reference: Path) -> list[Compared]:
    """Their label-smoothed CE at their trades_loss default, beside our TRADES natural term."""
    from methods.trades import trades_loss

    smooth = load_functions(reference / "core" / "utils" / "utils.py", ["SmoothCrossEntropyLoss"],
                            {"torch": torch})["SmoothCrossEntropyLoss"]
    default = _trades_smoothing_default(reference)
    x, y = tiny_batch(16)
    logits = tiny_model()(x)
    theirs = smooth(smoothing=default, reduction="mean")(logits, y)
    ours = trades_loss(logits, logits, y, 6.0, label_smoothing=default)[1]
    return [Compared("recipe_label_smoothing", abs(default - 0.1), note="ours: method.label_smoothing=0.1 (off unless set)"),
            Compared("smoothed_natural_ce", float((theirs - ours).abs().detach()))]


def _trades_smoothing_default(reference: Path) -> float:
    """`label_smoothing=` default of gowal21uncovering/utils/trades.py's `trades_loss`."""
    tree = ast.parse((reference / "gowal21uncovering" / "utils" / "trades.py").read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "trades_loss")
    names = [a.arg for a in fn.args.args]
    defaults = dict(zip(names[len(names) - len(fn.args.defaults):], fn.args.defaults))
    return float(defaults["label_smoothing"].value)  # type: ignore[attr-defined]


CHECKS = {"ema": check_ema}
