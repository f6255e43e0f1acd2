"""Display formatting and file names shared by pages, plots and exports.

Display convention: accuracies in %, 2 decimals, "mean ± std" over seeds (sample std); with one
seed there is no std and only the mean shows. Beside it, the Wilson 95% interval from the
test-set size, 1 decimal. Raw floats travel beside the text (data-value attributes, data.json),
so nothing is ever sorted or checked by its formatted text; anything missing or non-finite is "—".
"""
from __future__ import annotations

import hashlib
import math
import re
from typing import Any

DASH = "—"
_SAFE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,80}")


Z95 = 1.959963984540054  # two-sided 95% normal quantile


def finite(value: Any) -> float | None:
    """A finite float, or None for None/NaN/inf/anything not a number."""
    if value is None or isinstance(value, bool):
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def wilson(p: float | None, n: int | float | None, z: float = Z95) -> list[float] | None:
    """Wilson score interval [lo, hi] of a proportion p measured on n images; None when unknown.
    Unlike p ± z*sqrt(p(1-p)/n) it stays inside [0, 1] and is honest at p = 0 or 1."""
    p, n = finite(p), finite(n)
    if p is None or n is None or n < 1:
        return None
    p = min(max(p, 0.0), 1.0)
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return [0.0 if p == 0.0 else max(0.0, centre - half), 1.0 if p == 1.0 else min(1.0, centre + half)]


def pct(value: float | None) -> str:
    """A fraction as a percentage with 2 decimals; '—' when missing or not finite."""
    value = finite(value)
    return DASH if value is None else f"{100.0 * value:.2f}"


def mean_std(mean: float | None, std: float | None) -> str:
    """'mean ± std' in %; with one seed (std None) just the mean."""
    if finite(mean) is None:
        return DASH
    return pct(mean) if finite(std) is None else f"{pct(mean)} ± {pct(std)}"


def ci_text(ci: list[float] | None) -> str:
    """A [lo, hi] fraction interval as '70.1–78.9' (in %, 1 decimal); '' when unknown."""
    if not ci:
        return ""
    return f"{100.0 * ci[0]:.1f}–{100.0 * ci[1]:.1f}"


def sig(value: float | None, digits: int = 3) -> str:
    """A positive quantity (hours, images/s) with a few significant digits; '—' when missing."""
    value = finite(value)
    if value is None:
        return DASH
    if abs(value) >= 10 ** digits:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def raw(value: Any) -> str:
    """The exact value for a data-value attribute: repr of a float, '' when missing or not finite."""
    if value is None:
        return ""
    if isinstance(value, (int, float)):
        return "" if finite(value) is None else repr(float(value))
    return str(value)


def display(value: Any) -> str:
    """Any provenance value for reading: floats rounded to 4 significant digits, the rest as is."""
    if value is None:
        return DASH
    if isinstance(value, float):
        return DASH if finite(value) is None else f"{value:.4g}" if abs(value) < 1e6 else f"{value:.4e}"
    return str(value)


def si(value: float | None, unit: str = "") -> str:
    """Large counts (FLOPs, bytes) with an SI prefix: 1.23 T; '—' when missing."""
    value = finite(value)
    if value is None:
        return DASH
    for factor, prefix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}".rstrip()


def norm_label(norm: str | None) -> str:
    return {"linf": "L∞", "l2": "L2", "l1": "L1"}.get(norm or "", str(norm))


def eps_label(norm: str | None, eps: float | None) -> str:
    """Threat model text, e.g. 'L∞, ε = 0.1000 (25.5/255)' or 'L2, ε = 0.5000'."""
    name = norm_label(norm)
    if finite(eps) is None:
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


def base_method(method: str | None) -> str:
    """The registry id of a row's method: 'erm [data.img_size=16]' or 'erm @badnets' -> 'erm'."""
    return str(method).split(" [", 1)[0].split(" @", 1)[0]


def method_file(method: str | None) -> str:
    """'methods/<id>.html': one page per registered method (all its setups and settings)."""
    return setting_file("method", base_method(method)).replace("settings/method-", "methods/", 1)
