"""The ACE gallery page: for every cell with an ACE analysis, its metrics and its counterfactuals.

Reads each cell's `analysis_json` column (the summary) and its artifact
`<results_dir>/analysis/<key>/<label>/counterfactuals.npz` (the images). Images are embedded as
PNG data URIs, so the page is one self-contained file that works from any folder or file://.
Names and numbers pass through Jinja's autoescape; only the data URIs (base64, built here) are
marked safe.
"""
from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from markupsafe import Markup

from harness.store.storage import Store, open_store
from leaderboard.cells import Cell

ACE_PAGE = "ace.html"
N_SHOWN = 12
# (summary key, column title, format): ACE and plain-PGD side by side.
METRICS = [
    ("flip_rate", "flip rate", "pct"), ("l1", "L1", "sig"), ("l2", "L2", "sig"),
    ("hf_share", "HF share", "sig"), ("hf_share_0.375", "HF share >0.375", "sig"),
    ("hf_energy", "HF energy", "sig"),
    ("oracle_flip_rate", "oracle agrees", "pct"), ("cout", "COUT", "sig"), ("fid_local", "FID (local)", "sig"),
]


@dataclass
class Explained:
    """One explained cell: its labels, ACE summary, and rows of images for the gallery."""

    key: str
    label: str
    model: str
    summary: dict[str, Any]
    setting: str = ""   # which refinement ran and the settings departing from the official ACE
    samples: list[dict[str, Any]] = field(default_factory=list)
    png_error: str | None = None


def ace_analyses(cell: Cell) -> dict[str, dict[str, Any]]:
    """{label: summary} of the cell's ACE analyses ({} when none or malformed)."""
    try:
        blob = json.loads(cell.first("analysis_json") or "{}")
    except ValueError:
        return {}
    if not isinstance(blob, dict):
        return {}
    return {k: v for k, v in blob.items() if isinstance(v, dict) and v.get("analysis") == "ace"}


def setting_text(summary: dict[str, Any]) -> str:
    """'refine=repaint; official' or 'refine=paired; early_stop=true eta=0 ...' from the summary.
    Summaries written before the official algorithm became the default (no `ace_departures`) say so."""
    if "ace_departures" in summary:
        return f"refine={summary.get('ace_refine', '?')}; {summary['ace_departures']}"
    config = summary.get("ace_config") if isinstance(summary.get("ace_config"), dict) else {}
    return f"refine={config.get('refine', '?')}; measured before the official algorithm (early stop, filtered x')"


def png_uri(image: np.ndarray, scale: int = 8) -> Markup:
    """A (C, H, W) float image in [0, 1] as a nearest-neighbour upscaled PNG data URI."""
    from PIL import Image

    gray = np.clip(image.mean(0) if image.shape[0] != 3 else image.transpose(1, 2, 0), 0, 1)
    img = Image.fromarray((gray * 255).round().astype(np.uint8))
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return Markup("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii"))


def _samples(store: Store, rel: str, class_names: list[str], n: int) -> list[dict[str, Any]]:
    raw = store.read_bytes(rel)
    if raw is None:
        raise FileNotFoundError("no such file")
    with np.load(io.BytesIO(raw)) as z:  # arrays only: np.load refuses pickled objects by default
        x, y, t, cf, pgd = z["x"], z["y"], z["target"], z["ace_cf"], z["pgd_cf"]
        extra = {k: z[k] for k in ("ace_flip", "pgd_flip", "oracle_ace", "oracle_pgd") if k in z.files}
    name = lambda i: class_names[int(i)] if 0 <= int(i) < len(class_names) else str(int(i))
    out = []
    for i in range(min(n, len(x))):
        out.append({
            "label": name(y[i]), "target": name(t[i]),
            **{k: (bool(v[i]) if "flip" in k else name(v[i])) for k, v in extra.items()},
            "x": png_uri(x[i]), "ace": png_uri(cf[i]), "ace_diff": png_uri((cf[i] - x[i] + 1) / 2),
            "pgd": png_uri(pgd[i]), "pgd_diff": png_uri((pgd[i] - x[i] + 1) / 2),
        })
    return out


def collect(cells: dict[str, Cell], results_dir: str | Path, n_shown: int = N_SHOWN) -> list[Explained]:
    """Every ACE analysis of every cell, with its gallery images when the artifact exists (in a
    local folder or any store URI)."""
    store = open_store(results_dir)
    out = []
    for cell in cells.values():
        for label, summary in ace_analyses(cell).items():
            model = f"{cell.first('arch') or '?'} / {cell.first('method') or '?'} / seed {cell.first('seed')}"
            item = Explained(cell.key, label, model, summary, setting_text(summary))
            rel = f"analysis/{cell.key}/{label}/counterfactuals.npz"
            try:
                item.samples = _samples(store, rel, list(cell.first("class_names") or []), n_shown)
            except (OSError, KeyError, ValueError) as err:
                item.png_error = f"counterfactual images not readable at {store.uri(rel)}: {err}"
            out.append(item)
    return out
