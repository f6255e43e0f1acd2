"""Display formatting and file names shared by pages, plots and exports.

Display convention: accuracies in %, 2 decimals, "mean ± std" over seeds (sample std); with one
seed the std is undefined and shows as "—". Raw floats travel beside the text (data-value
attributes, data.json), so nothing is ever sorted or checked by its formatted text.
"""
from __future__ import annotations

import hashlib
import re
from typing import Any

DASH = "—"
_SAFE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,80}")


def pct(value: float | None) -> str:
    """A fraction as a percentage with 2 decimals; '—' when missing."""
    return DASH if value is None else f"{100.0 * value:.2f}"


def mean_std(mean: float | None, std: float | None) -> str:
    """'mean ± std' in %; std of a single seed (None) shows as '—'."""
    if mean is None:
        return DASH
    return f"{pct(mean)} ± {pct(std)}"


def sig(value: float | None, digits: int = 3) -> str:
    """A positive quantity (hours, images/s) with a few significant digits; '—' when missing."""
    if value is None:
        return DASH
    if abs(value) >= 10 ** digits:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def raw(value: Any) -> str:
    """The exact value for a data-value attribute: repr of a float, '' when missing."""
    if value is None:
        return ""
    return repr(float(value)) if isinstance(value, (int, float)) else str(value)


def norm_label(norm: str | None) -> str:
    return {"linf": "L∞", "l2": "L2", "l1": "L1"}.get(norm or "", str(norm))


def eps_label(norm: str | None, eps: float | None) -> str:
    """Threat model text, e.g. 'L∞, ε = 0.1000 (25.5/255)' or 'L2, ε = 0.5000'."""
    name = norm_label(norm)
    if eps is None:
        return f"{name}, ε = ?"
    text = f"{name}, ε = {eps:.4f}"
    if norm == "linf":
        over255 = f"{eps * 255:.2f}".rstrip("0").rstrip(".")
        text += f" ({over255}/255)"
    return text


def cost_unit(device: str | None) -> str:
    """'GPU-h' for accelerators, 'CPU-h' for cpu: the unit a cell's cost is counted in."""
    name = (device or "").lower()
    if name.startswith("cpu"):
        return "CPU-h"
    if name.startswith(("cuda", "gpu", "mps", "xpu", "rocm", "hip")):
        return "GPU-h"
    return f"{device}-h" if device else "h"


def _digest(*parts: object) -> str:
    return hashlib.sha1("\x1f".join(map(str, parts)).encode("utf-8")).hexdigest()[:10]


def cell_file(key: str) -> str:
    """The cell page's file name: 'cells/<key>.html' for ordinary keys, a hashed name otherwise
    (a key from a foreign source could hold '/', '..' or markup)."""
    if _SAFE.fullmatch(key) and ".." not in key:
        return f"cells/{key}.html"
    stem = re.sub(r"[^A-Za-z0-9_-]+", "-", key).strip("-")[:40] or "cell"
    return f"cells/{stem}-{_digest(key)}.html"


def setting_file(track: str, *parts: object) -> str:
    """'settings/<track>-<parts>.html'; a hash is appended when a part needed cleaning."""
    text = [("" if p is None else (f"{p:.6g}" if isinstance(p, float) else str(p))) for p in parts]
    clean = [re.sub(r"[^A-Za-z0-9_.]+", "-", t).strip("-.") or "x" for t in text]
    stem = "-".join([track, *clean])[:120]
    if clean != text:
        stem += "-" + _digest(track, *parts)
    return f"settings/{stem}.html"
