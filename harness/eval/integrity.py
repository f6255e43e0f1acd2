"""Integrity flags: signs that a robustness evaluation only *looks* robust (gradient masking etc.).

Every evaluated model gets these checks; a fired flag is stored in the result rows' `flags`
column (the leaderboard ranks flagged rows last) with the measured evidence in `flag_details`
(a JSON object flag -> details). The checks follow Carlini et al. 2019 ("On evaluating
adversarial robustness"), Athalye et al. 2018 and the warnings of the AutoAttack reference:

model-level probes (on the first evaluated batch, every row of the cell gets them):
- `randomized_outputs`: repeated forwards of the same inputs in eval mode disagree (max L2
  distance of the L2-normalised outputs > 1e-4, or a different prediction): a randomised
  defense, for which a deterministic attack overstates robustness (use EOT).
- `outputs_are_probabilities`: every output is in [0,1] and rows sum to 1 (within 1e-5): the
  model returns softmax probabilities, not logits, which saturates the attacks' losses.
- `zero_input_gradients`: some probed point has an all-zero input gradient of the logit margin
  z_y - max_{j != y} z_j (the reference checks the same on its attacks' gradients).
- `saturated_softmax`: on at least 10% of the probe points the input gradient of the
  cross-entropy vanishes (its norm below 1e-20 x the margin gradient's: the softmax underflowed
  to one-hot in float32) while the margin gradient does not. Logits scaled up (x 1e4) do this:
  CE-based attacks (PGD, APGD-CE) see no gradient and overstate robustness, while margin-based
  ones (APGD-T, CW, FAB) still work; nothing else catches it reliably.
- `accuracy_not_falling_with_eps` / `accuracy_not_falling_with_steps`: PGD (10 steps of
  radius/4) on the probe points at eps, 2 eps, 4 eps and the saturation radius (L-inf 0.5, L2
  0.5 sqrt(d): the ball then holds the constant grey image, so a working attack leaves at most
  the most frequent class's share correct; more than that share + 10 points fires the flag),
  and at eps with 10 then 50 steps: accuracy rising by more than 2 points from one rung to the
  next fires it too. Rows of the cell that differ only in eps or only in their step/query
  budget are compared the same way (tolerance 0.5 points).

row-level checks:
- `square_beats_whitebox`: the black-box Square attack breaks more than 0.2% of the points
  (0.2 points of robust accuracy) that the white-box attacks left robust: inside AutoAttack
  (points first broken by Square), or a `square` row below every white-box row of the cell.
- `robust_above_clean`: a row's robust accuracy is above the cell's clean accuracy.
- `perturbation_out_of_bounds`: an attack returned points beyond eps or outside [0,1]. The
  evaluation does not fail: the points are projected back into the threat model (so the number
  is a valid robust accuracy) and the row is flagged with the largest violation.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from harness.attacks.base import Attack, project_linf
from harness.core.registry import ANALYSES
from harness.eval.stage import Analysis, EvalContext

FLAGS = (
    "randomized_outputs",
    "outputs_are_probabilities",
    "zero_input_gradients",
    "saturated_softmax",
    "square_beats_whitebox",
    "robust_above_clean",
    "accuracy_not_falling_with_eps",
    "accuracy_not_falling_with_steps",
    "perturbation_out_of_bounds",
    "eval_precision_bf16",  # evaluated under bf16 autocast (eval.precision=bf16, opt-in; harness/eval/evaluate.py)
)
WHITEBOX_COMPONENTS = ("apgd_ce", "apgd_t", "fab_t")
SQUARE_MARGIN = 0.002  # the reference's alpha in its Square check
PROBE_RISE_TOL = 0.02
SATURATION_SLACK = 0.1
ROW_RISE_TOL = 0.005
_BOUND_TOL = 1e-6
_BUDGET_KEYS = ("steps", "n_iter", "n_queries")
SATURATED_RATIO = 1e-20  # |grad CE| / |grad margin| ~ softmax of the runner-up: e^-46, float32 underflow
SATURATED_SHARE = 0.1    # of the probe points

Details = dict[str, dict[str, Any]]


# ------------------------------------------------------------------------------------------------
# Threat-model enforcement (per attack output)
# ------------------------------------------------------------------------------------------------

def enforce_threat_model(attack: Attack, x: torch.Tensor,
                         x_adv: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any] | None]:
    """(x_adv projected into the eps-ball and [0,1], violation details or None if none)."""
    if x_adv.shape != x.shape:
        raise RuntimeError(f"attack {attack.name} changed the input shape {tuple(x.shape)} -> {tuple(x_adv.shape)}")
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(1) if attack.norm == "linf" else delta.norm(dim=1)
    lo, hi = float(x_adv.min()) if x_adv.numel() else 0.0, float(x_adv.max()) if x_adv.numel() else 0.0
    over = float(size.max()) if size.numel() else 0.0
    if over <= attack.eps + _BOUND_TOL and lo >= -_BOUND_TOL and hi <= 1 + _BOUND_TOL:
        return x_adv, None
    detail = {"attack": attack.name, "eps": attack.eps, "max_size": over, "min_value": lo,
              "max_value": hi, "points": int(((size > attack.eps + _BOUND_TOL)
                                              | (x_adv.flatten(1).amin(1) < -_BOUND_TOL)
                                              | (x_adv.flatten(1).amax(1) > 1 + _BOUND_TOL)).sum())}
    if attack.norm == "linf":
        fixed = project_linf(x_adv.clone(), x, attack.eps)
    else:
        d = x_adv - x
        scale = (attack.eps / size.clamp(min=1e-12)).clamp(max=1.0).view(-1, *([1] * (x.dim() - 1)))
        fixed = (x + d * scale).clamp(0.0, 1.0)
    return fixed, detail


# ------------------------------------------------------------------------------------------------
# Model-level probes
# ------------------------------------------------------------------------------------------------

@torch.no_grad()
def check_randomized(model: nn.Module, x: torch.Tensor, repeats: int = 5, tol: float = 1e-4) -> dict | None:
    outs = [model(x) for _ in range(repeats)]
    normed = [o / (o.flatten(1).norm(dim=1, keepdim=True) + 1e-10) for o in outs]
    max_diff = max(float((normed[0] - o).flatten(1).norm(dim=1).max()) for o in normed[1:])
    preds_differ = any(not torch.equal(outs[0].argmax(1), o.argmax(1)) for o in outs[1:])
    if max_diff > tol or preds_differ:
        return {"max_normalised_output_diff": max_diff, "predictions_differ": preds_differ, "repeats": repeats}
    return None


@torch.no_grad()
def check_probabilities(model: nn.Module, x: torch.Tensor, tol: float = 1e-5) -> dict | None:
    out = model(x)
    row_sums = out.sum(1)
    if out.max() < 1 + tol and out.min() > -tol and bool(((row_sums - 1).abs() < tol).all()):
        return {"min_output": float(out.min()), "max_output": float(out.max()),
                "max_row_sum_error": float((row_sums - 1).abs().max())}
    return None


def check_zero_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict | None:
    xg = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        logits = model(xg)
        rows = torch.arange(len(y), device=x.device)
        others = logits.clone()
        others[rows, y] = -float("inf")
        margin = logits[rows, y] - others.max(1)[0]
        (grad,) = torch.autograd.grad(margin.sum(), xg)
    zero = grad.flatten(1).abs().sum(1) == 0
    if zero.any():
        return {"points_with_zero_gradient": int(zero.sum()), "probed_points": len(y)}
    return None


def check_saturated_softmax(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict | None:
    """Cross-entropy input gradients vanish (softmax underflow) on many probe points while the
    margin gradients do not: CE-driven attacks are blind there, margin-driven ones are not."""
    xg = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        logits = model(xg).float()
        rows = torch.arange(len(y), device=x.device)
        ce = torch.nn.functional.cross_entropy(logits, y, reduction="sum")
        (ce_grad,) = torch.autograd.grad(ce, xg, retain_graph=True)
        others = logits.clone()
        others[rows, y] = -float("inf")
        margin = logits[rows, y] - others.max(1)[0]
        (margin_grad,) = torch.autograd.grad(margin.sum(), xg)
    ce_norm = ce_grad.flatten(1).double().norm(dim=1)
    margin_norm = margin_grad.flatten(1).double().norm(dim=1)
    vanished = (margin_norm > 0) & (ce_norm <= SATURATED_RATIO * margin_norm)
    if len(y) and float(vanished.float().mean()) >= SATURATED_SHARE:
        return {"points_with_vanished_ce_gradient": int(vanished.sum()), "probed_points": len(y),
                "median_margin_gradient_norm": float(margin_norm[vanished].median()),
                "max_ce_gradient_norm_there": float(ce_norm[vanished].max())}
    return None


def _pgd_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack_norm: str, eps: float,
                  steps: int, seed: int) -> float:
    from harness.attacks.base import build_attack

    name = "pgd" if attack_norm == "linf" else "pgd_l2"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        x_adv = build_attack({"name": name, "eps": eps, "steps": steps})(model, x, y)
    with torch.no_grad():
        return float((model(x_adv).argmax(1) == y).float().mean())


def saturation_eps(norm: str, x: torch.Tensor) -> float:
    """A radius whose ball around any image in [0,1] holds the constant 0.5-grey image."""
    return 0.5 if norm == "linf" else 0.5 * float(x[0].numel()) ** 0.5


def check_monotonicity(model: nn.Module, x: torch.Tensor, y: torch.Tensor, norm: str, eps: float,
                       seed: int = 0) -> Details:
    """PGD accuracy on a ladder of eps (eps, 2eps, 4eps and the saturation radius; 10 steps) and
    of steps (10, 50 at eps)."""
    out: Details = {}
    if eps <= 0 or len(y) == 0:
        return out
    radii = [f * eps for f in (1, 2, 4)]
    sat = saturation_eps(norm, x)
    ladder = [(e, _pgd_accuracy(model, x, y, norm, e, 10, seed)) for e in radii + ([sat] if sat > radii[-1] else [])]
    rises = any(b > a + PROBE_RISE_TOL for (_, a), (_, b) in zip(ladder, ladder[1:]))
    # Inside the saturation ball every image can become the same grey image, so a working attack
    # leaves at most the share of the most frequent class (plus slack) correct.
    chance = float(torch.bincount(y).max()) / len(y) + SATURATION_SLACK
    stuck = ladder[-1][0] == sat and ladder[-1][1] > chance
    if rises or stuck:
        out["accuracy_not_falling_with_eps"] = {
            "source": "pgd probe", "norm": norm, "n": len(y), "chance": chance,
            "eps_accuracy": [[e, a] for e, a in ladder]}
    steps = [(s, _pgd_accuracy(model, x, y, norm, eps, s, seed)) for s in (10, 50)]
    if steps[1][1] > steps[0][1] + PROBE_RISE_TOL:
        out["accuracy_not_falling_with_steps"] = {
            "source": "pgd probe", "norm": norm, "eps": eps, "n": len(y),
            "steps_accuracy": [[s, a] for s, a in steps]}
    return out


def probe_model(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                threat_models: Iterable[tuple[str, float]], seed: int = 0) -> Details:
    """Model-level flags on probe points (x, y): randomness, probabilities, zero gradients and
    the eps/steps ladders for each (norm, eps) evaluated. Mode restored; RNG state untouched."""
    was_training = model.training
    model.eval()
    try:
        details: Details = {}
        with torch.random.fork_rng(devices=[]):
            for flag, check in (("randomized_outputs", lambda: check_randomized(model, x)),
                                ("outputs_are_probabilities", lambda: check_probabilities(model, x)),
                                ("zero_input_gradients", lambda: check_zero_gradients(model, x, y)),
                                ("saturated_softmax", lambda: check_saturated_softmax(model, x, y))):
                found = check()
                if found is not None:
                    details[flag] = found
            for norm, eps in sorted(set(threat_models)):
                for flag, found in check_monotonicity(model, x, y, norm, eps, seed).items():
                    details.setdefault(flag, found)
        return details
    finally:
        model.train(was_training)


# ------------------------------------------------------------------------------------------------
# Row-level checks (on the finished evaluation of one cell)
# ------------------------------------------------------------------------------------------------

def square_share_in_autoattack(broken_by: list[str | None]) -> float:
    """Fraction of all points that Square broke after the white-box components had failed."""
    return sum(b == "square" for b in broken_by) / len(broken_by) if broken_by else 0.0


def row_flags(clean_acc: float, rows: list[dict[str, Any]], model_details: Details) -> list[Details]:
    """Details per row. `rows`: dicts with name, norm, eps, config (describe()), robust_acc,
    broken_by (per-sample list or None) and out_of_bounds (details or None)."""
    per_row: list[Details] = [dict(model_details) for _ in rows]
    whitebox = [r["robust_acc"] for r in rows if r["name"] not in ("square",)]
    for details, row in zip(per_row, rows):
        if row.get("out_of_bounds"):
            details["perturbation_out_of_bounds"] = row["out_of_bounds"]
        if row["robust_acc"] > clean_acc + 1e-12:
            details["robust_above_clean"] = {"robust_acc": row["robust_acc"], "clean_acc": clean_acc}
        broken_by = row.get("broken_by")
        if row["name"] == "autoattack" and broken_by:
            share = square_share_in_autoattack(broken_by)
            if share > SQUARE_MARGIN:
                details["square_beats_whitebox"] = {"source": "autoattack", "square_share": share}
        if row["name"] == "square" and whitebox and row["robust_acc"] < min(whitebox) - SQUARE_MARGIN:
            details["square_beats_whitebox"] = {"source": "rows", "square_robust_acc": row["robust_acc"],
                                                "best_whitebox_robust_acc": min(whitebox)}
    _rows_monotonicity(rows, per_row)
    return per_row


def _rows_monotonicity(rows: list[dict[str, Any]], per_row: list[Details]) -> None:
    """Rows that differ only in eps (or only in the step/query budget) must not gain accuracy
    as eps (or the budget) grows."""
    for vary, flag in (("eps", "accuracy_not_falling_with_eps"), (None, "accuracy_not_falling_with_steps")):
        groups: dict[str, list[int]] = defaultdict(list)
        for i, row in enumerate(rows):
            cfg = dict(row["config"])
            if vary == "eps":
                cfg.pop("eps", None)
            else:
                for key in _BUDGET_KEYS:
                    cfg.pop(key, None)
            groups[json.dumps(cfg, sort_keys=True, default=str)].append(i)
        for members in groups.values():
            if len(members) < 2:
                continue
            measure = (lambda i: rows[i]["config"].get("eps", 0.0)) if vary == "eps" else \
                (lambda i: next((rows[i]["config"][k] for k in _BUDGET_KEYS if k in rows[i]["config"]), 0))
            ordered = sorted(members, key=measure)
            for a, b in zip(ordered, ordered[1:]):
                if measure(b) > measure(a) and rows[b]["robust_acc"] > rows[a]["robust_acc"] + ROW_RISE_TOL:
                    for i in (a, b):
                        per_row[i].setdefault(flag, {
                            "source": "rows", "attack": rows[i]["name"],
                            "budget_accuracy": [[measure(j), rows[j]["robust_acc"]] for j in ordered]})


def flag_list(details: Details) -> list[str]:
    """The fired flags, in the fixed order of FLAGS."""
    return [f for f in FLAGS if f in details]


# ------------------------------------------------------------------------------------------------
# The evaluation analysis: flags on every attack row of an evaluated cell
# ------------------------------------------------------------------------------------------------

def flag_result(model: nn.Module, result: Any, x: torch.Tensor, y: torch.Tensor, seed: int = 0) -> None:
    """Set `flags` and `flag_details` on each attack of an EvalResult (harness/eval/evaluate.py):
    model probes on the points (x, y) (none when x is empty), then the row-level checks."""
    model_details: Details = {}
    if len(x):
        model_details = probe_model(model, x, y, {(r.attack.norm, r.attack.eps) for r in result.attacks}, seed=seed)
    rows = [{"name": r.attack.name, "norm": r.attack.norm, "eps": r.attack.eps, "config": r.attack.describe(),
             "robust_acc": r.robust_acc, "broken_by": r.broken_by, "out_of_bounds": r.out_of_bounds}
            for r in result.attacks]
    for r, details in zip(result.attacks, row_flags(result.clean_acc, rows, model_details)):
        details = {**r.flag_details, **details}  # keeps what evaluation itself flagged (eval precision)
        r.flags, r.flag_details = flag_list(details), details


@ANALYSES.register("integrity")
class IntegrityFlags(Analysis):
    """AutoAttack-style integrity flags on every evaluated model (probes on `eval.integrity_points`
    test points, default 64; 0 skips the probes, the row-level checks still run)."""

    always = True
    order = 10

    def run(self, ctx: EvalContext) -> None:
        from harness.data.loader import make_loader

        cfg = ctx.cfg
        ecfg = cfg.get("eval") or {}
        points = int(ecfg.get("integrity_points", 64))
        if ecfg.get("limit") is not None:
            points = min(points, int(ecfg["limit"]))
        x = torch.empty(0)
        y = torch.empty(0, dtype=torch.long)
        if points > 0:
            batches = list(make_loader(Path(cfg["data"]["dir"]), "test", points, img_size=cfg["data"].get("img_size"),
                                       limit=points))
            x, y = batches[0][0].to(ctx.device), batches[0][1].to(ctx.device)
        flag_result(ctx.model, ctx.result, x, y, seed=int(cfg["seed"]))
