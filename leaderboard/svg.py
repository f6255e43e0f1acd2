"""Inline SVG plots generated in Python: scatter, heatmap, line chart. No JavaScript, no fonts
or files to fetch, so they render offline and in any static host.

Every piece of text that reaches the SVG goes through `esc` (names come from configs/plugins),
and the result is returned as markupsafe.Markup so Jinja inserts it without escaping it again.
Sizes are in CSS pixels; the SVG scales down with its container (viewBox, max-width).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from html import escape

from markupsafe import Markup

FONT = 'font-family="system-ui, -apple-system, Segoe UI, sans-serif"'
# Tableau 10: distinguishable and colour-blind friendlier than the default matplotlib cycle.
PALETTE = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2",
           "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac"]
SHAPES = ["circle", "square", "triangle", "diamond", "triangle-down", "cross"]
FLAG_COLOR = "#c0392b"
MAX_LABELS = 8  # a scatter with more points labels only its Pareto front and flagged points
CHAR_W = 6.6  # rough width of a 12px sans-serif character, for layout only


def esc(text: object) -> str:
    return escape(str(text), quote=True)


def short(text: object, limit: int = 28) -> str:
    text = str(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About n round tick values covering [lo, hi]."""
    if hi <= lo:
        hi = lo + 1.0
    raw_step = (hi - lo) / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw_step))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw_step)
    start = math.ceil(lo / step - 1e-9) * step
    ticks, t = [], start
    while t <= hi + 1e-9 * step:
        ticks.append(round(t, 12))
        t += step
    return ticks


def tick_text(value: float) -> str:
    return f"{value:.6g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.1e}"


def _svg(width: float, height: float, body: list[str], label: str) -> Markup:
    return Markup(
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width:.0f} {height:.0f}" '
        f'width="{width:.0f}" style="max-width:100%;height:auto" role="img" aria-label="{esc(label)}" '
        f'{FONT} font-size="12">' + "".join(body) + "</svg>"
    )


def marker(shape: str, x: float, y: float, r: float, fill: str, stroke: str, width: float = 1.2) -> str:
    """One marker of a given shape centred at (x, y)."""
    style = f'fill="{fill}" stroke="{stroke}" stroke-width="{width}"'
    if shape == "circle":
        return f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{r:.1f}" {style}/>'
    if shape == "square":
        return f'<rect x="{x - r:.1f}" y="{y - r:.1f}" width="{2 * r:.1f}" height="{2 * r:.1f}" {style}/>'
    if shape == "cross":
        a = r * 0.45
        pts = [(-a, -r), (a, -r), (a, -a), (r, -a), (r, a), (a, a), (a, r), (-a, r), (-a, a), (-r, a), (-r, -a), (-a, -a)]
    else:
        pts = {
            "triangle": [(0, -1.2 * r), (1.1 * r, 0.8 * r), (-1.1 * r, 0.8 * r)],
            "triangle-down": [(0, 1.2 * r), (1.1 * r, -0.8 * r), (-1.1 * r, -0.8 * r)],
            "diamond": [(0, -1.3 * r), (1.3 * r, 0), (0, 1.3 * r), (-1.3 * r, 0)],
        }[shape]
    path = " ".join(f"{x + dx:.1f},{y + dy:.1f}" for dx, dy in pts)
    return f'<polygon points="{path}" {style}/>'


@dataclass
class Axes:
    """A linear x/y mapping from data to pixels inside a plot rectangle."""

    left: float
    top: float
    width: float
    height: float
    x0: float
    x1: float
    y0: float
    y1: float

    def x(self, v: float) -> float:
        return self.left + (v - self.x0) / (self.x1 - self.x0) * self.width

    def y(self, v: float) -> float:
        return self.top + self.height - (v - self.y0) / (self.y1 - self.y0) * self.height

    def frame(self, x_label: str, y_label: str, xticks: list[float], yticks: list[float],
              x_text: Callable[[float], str] | None = None) -> list[str]:
        """Grid lines, tick labels, axis box and axis titles."""
        x_text = x_text or tick_text
        out = []
        for t in xticks:
            px = self.x(t)
            out.append(f'<line x1="{px:.1f}" y1="{self.top}" x2="{px:.1f}" y2="{self.top + self.height}" stroke="#e6e6e6"/>')
            out.append(f'<text x="{px:.1f}" y="{self.top + self.height + 16}" text-anchor="middle" fill="#333">{esc(x_text(t))}</text>')
        for t in yticks:
            py = self.y(t)
            out.append(f'<line x1="{self.left}" y1="{py:.1f}" x2="{self.left + self.width}" y2="{py:.1f}" stroke="#e6e6e6"/>')
            out.append(f'<text x="{self.left - 6}" y="{py + 4:.1f}" text-anchor="end" fill="#333">{esc(tick_text(t))}</text>')
        out.append(f'<rect x="{self.left}" y="{self.top}" width="{self.width}" height="{self.height}" fill="none" stroke="#888"/>')
        out.append(f'<text x="{self.left + self.width / 2:.1f}" y="{self.top + self.height + 36}" text-anchor="middle" '
                   f'font-size="13" fill="#111">{esc(x_label)}</text>')
        cy = self.top + self.height / 2
        out.append(f'<text x="16" y="{cy:.1f}" transform="rotate(-90 16 {cy:.1f})" text-anchor="middle" '
                   f'font-size="13" fill="#111">{esc(y_label)}</text>')
        return out


def _range(values: Sequence[float], floor: float | None = None, ceil: float | None = None) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    pad = max((hi - lo) * 0.08, 1.0 if floor is not None else abs(hi) * 0.05 or 1e-3)
    lo, hi = lo - pad, hi + pad
    if floor is not None:
        lo = max(lo, floor)
    if ceil is not None:
        hi = min(hi, ceil)
    return lo, hi


@dataclass
class Point:
    """One scatter point: position, optional std whiskers, colour group, shape group, flagged."""

    x: float
    y: float
    color_key: str
    shape_key: str
    x_err: float | None = None
    y_err: float | None = None
    flagged: bool = False
    tooltip: str = ""
    label: str = ""


def unique_styles(groups: list[tuple[str, str]]) -> dict[tuple[str, str], tuple[str, str]]:
    """(colour, shape) per (color_key, shape_key) group, never the same pair twice in one plot.

    A group gets its colour key's colour and its shape key's shape when that pair is free; a
    palette that wraps (more than 10 colour keys) would repeat pairs, so a taken pair moves on to
    the next shape, then the next colour. Unique for up to len(PALETTE) * len(SHAPES) groups."""
    colour_of = {k: i for i, k in enumerate(sorted({c for c, _ in groups}))}
    shape_of = {k: i for i, k in enumerate(sorted({s for _, s in groups}))}
    used: set[tuple[int, int]] = set()
    out = {}
    total = len(PALETTE) * len(SHAPES)
    for group in sorted(set(groups)):
        c, s = colour_of[group[0]] % len(PALETTE), shape_of[group[1]] % len(SHAPES)
        for step in range(total):
            pair = ((c + step // len(SHAPES)) % len(PALETTE), (s + step) % len(SHAPES))
            if pair not in used:
                break
        used.add(pair)
        out[group] = (PALETTE[pair[0]], SHAPES[pair[1]])
    return out


def pareto_front(points: list[Point]) -> list[Point]:
    """Points no other point beats on both x and y (higher is better), by increasing x."""
    front = [p for p in points if not any(q.x >= p.x and q.y >= p.y and (q.x > p.x or q.y > p.y) for q in points)]
    return sorted(front, key=lambda p: (p.x, -p.y))


def scatter(points: list[Point], x_label: str, y_label: str, color_title: str, shape_title: str,
            diagonal: bool = True, pareto: bool = True, x_range: tuple[float, float] | None = (0.0, 100.0),
            y_range: tuple[float, float] = (0.0, 100.0), log_x: bool = False) -> Markup:
    """Scatter with every point labelled and whiskers = ± std; hollow red-outlined markers for
    flagged points. Percent axes run 0-100 (gaps are never exaggerated by zooming), the robust =
    clean line is drawn corner to corner, and the Pareto front (best trade-offs) is a solid line.
    Each (colour key, shape key) group has its own colour + shape pair (unique_styles), listed in
    the legend. With log_x the x axis is log10 (compute spans orders of magnitude)."""
    points = [p for p in points if _finite(p.x) and _finite(p.y) and (not log_x or p.x > 0)]
    if not points:
        return _svg(320, 40, ['<text x="8" y="24">no points to draw</text>'], "empty plot")
    tx = (lambda v: math.log10(v)) if log_x else (lambda v: v)
    if x_range is None:
        x0, x1 = _range([tx(p.x) for p in points])
        if log_x:
            x0, x1 = math.floor(x0), math.ceil(x1 + 1e-9)
        elif min(p.x for p in points) >= 0:
            x0 = 0.0  # amounts (hours, FLOPs) start at 0
    else:
        x0, x1 = x_range
    styles = unique_styles([(p.color_key, p.shape_key) for p in points])
    legend = {f"{c} / {s}" if s else c: (c, s) for c, s in sorted(styles)}
    legend_w = 40 + CHAR_W * max([len(short(k, 34)) for k in legend] + [len(color_title), 12])
    side = (440, 440) if (x0, x1) == tuple(y_range) else (440, 340)  # same units: a square, y = x at 45°
    ax = Axes(64, 16, *side, x0, x1, *y_range)
    xticks = [float(t) for t in range(int(x0), int(x1) + 1)] if log_x else nice_ticks(x0, x1)
    body = ax.frame(x_label, y_label, xticks, nice_ticks(*y_range),
                    x_text=(lambda t: f"1e{t:.0f}") if log_x else tick_text)
    if diagonal:  # robust accuracy can't exceed clean accuracy: points sit below this line
        lo, hi = max(ax.x0, ax.y0), min(ax.x1, ax.y1)
        body.append(f'<line class="diagonal" x1="{ax.x(lo):.1f}" y1="{ax.y(lo):.1f}" x2="{ax.x(hi):.1f}" y2="{ax.y(hi):.1f}" '
                    f'stroke="#888" stroke-dasharray="5 4"><title>robust = clean</title></line>')
        body.append(f'<text x="{ax.x(hi) - 4:.1f}" y="{ax.y(hi) + 14:.1f}" text-anchor="end" fill="#888" font-size="11">robust = clean</text>')
    front = pareto_front(points) if len(points) > 1 else list(points)
    # Labels: every point when few; else the Pareto front and flagged points (the legend and each
    # point's tooltip name the rest), so a crowded cluster never turns into unreadable text.
    labelled = {id(p) for p in points} if len(points) <= MAX_LABELS else {id(p) for p in front} | {
        id(p) for p in points if p.flagged}
    if pareto and len(points) > 1:
        path = " ".join(f"{ax.x(tx(p.x)):.1f},{ax.y(p.y):.1f}" for p in front)
        body.append(f'<polyline class="pareto" points="{path}" fill="none" stroke="#555" stroke-width="1.5">'
                    f'<title>Pareto front: no other model is better on both axes</title></polyline>')
    placed: list[tuple[float, float, float, float]] = []  # label boxes drawn so far
    for p in points:
        px, py = ax.x(tx(p.x)), ax.y(p.y)
        color, shape = styles[(p.color_key, p.shape_key)]
        g = [f'<g class="point"><title>{esc(p.tooltip)}</title>']
        if p.x_err and not log_x:
            g.append(f'<line x1="{ax.x(max(x0, p.x - p.x_err)):.1f}" y1="{py:.1f}" x2="{ax.x(min(x1, p.x + p.x_err)):.1f}" y2="{py:.1f}" stroke="{color}"/>')
        if p.y_err:
            g.append(f'<line x1="{px:.1f}" y1="{ax.y(max(y_range[0], p.y - p.y_err)):.1f}" x2="{px:.1f}" y2="{ax.y(min(y_range[1], p.y + p.y_err)):.1f}" stroke="{color}"/>')
        if p.flagged:
            g.append(marker(shape, px, py, 7, "#fff", FLAG_COLOR, 2.2))
            g.append(marker(shape, px, py, 3.5, color, color))
        else:
            g.append(marker(shape, px, py, 6, color, "#222", 0.8))
        if p.label and id(p) in labelled:
            spot = _free_spot(px, py, short(p.label, 24), placed,
                              (ax.left + 2, ax.top + 2, ax.left + ax.width - 2, ax.top + ax.height - 2))
            if spot is not None:  # no free spot: the tooltip and legend still name the point
                lx_, ly_, anchor = spot
                g.append(f'<text class="label" x="{lx_:.1f}" y="{ly_:.1f}" text-anchor="{anchor}" font-size="10.5" '
                         f'fill="#333">{esc(short(p.label, 24))}</text>')
        g.append("</g>")
        body.append("".join(g))
    # Legend: one entry per group, with its own colour + shape.
    lx, ly = ax.left + ax.width + 24, ax.top + 6
    body.append(f'<text x="{lx}" y="{ly + 4}" font-weight="600">{esc(short(color_title + (" / " + shape_title if shape_title else ""), 40))}</text>')
    for name, group in legend.items():
        ly += 20
        color, shape = styles[group]
        body.append(marker(shape, lx + 6, ly, 6, color, "#222", 0.8))
        body.append(f'<text x="{lx + 18}" y="{ly + 4}"><title>{esc(name)}</title>{esc(short(name, 34))}</text>')
    if any(p.flagged for p in points):
        ly += 30
        body.append(marker("circle", lx + 6, ly, 7, "#fff", FLAG_COLOR, 2.2))
        body.append(f'<text x="{lx + 18}" y="{ly + 4}" fill="{FLAG_COLOR}">flagged (untrustworthy)</text>')
    height = max(ax.top + ax.height + 48, ly + 16)
    return _svg(lx + legend_w, height, body, f"{y_label} against {x_label}")


def _free_spot(px: float, py: float, text: str, placed: list[tuple[float, float, float, float]],
               bounds: tuple[float, float, float, float] | None = None) -> tuple[float, float, str] | None:
    """A label position beside (px, py) whose box stays inside `bounds` (the plot area) and
    overlaps no placed label (then it is taken)."""
    w, h = len(text) * 5.9, 11.0
    for dx, dy, anchor in ((9, -6, "start"), (-9, -6, "end"), (9, 14, "start"), (-9, 14, "end"),
                           (0, -12, "middle"), (0, 22, "middle")):
        x0 = px + dx - (w if anchor == "end" else w / 2 if anchor == "middle" else 0)
        box = (x0, py + dy - h + 2, x0 + w, py + dy + 2)
        inside = bounds is None or (box[0] >= bounds[0] and box[2] <= bounds[2] and box[1] >= bounds[1] and box[3] <= bounds[3])
        if inside and all(box[2] < b[0] or box[0] > b[2] or box[3] < b[1] or box[1] > b[3] for b in placed):
            placed.append(box)
            return px + dx, py + dy, anchor
    return None


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _blend(value: float) -> str:
    """White -> dark blue for value in [0, 1] (grey for anything not finite)."""
    if not _finite(value):
        return "#eee"
    v = min(max(value, 0.0), 1.0)
    lo, hi = (247, 251, 255), (8, 69, 148)
    r, g, b = (round(a + (c - a) * v) for a, c in zip(lo, hi))
    return f"#{r:02x}{g:02x}{b:02x}"


def heatmap(row_labels: list[str], col_labels: list[str], values: list[list[float | None]],
            value_label: str, col_title: str = "class") -> Markup:
    """Rows x columns of fractions in [0, 1], coloured white -> blue, each cell printed in %
    when there are few enough columns to fit the number; a colour bar explains the scale."""
    values = [[v if _finite(v) else None for v in row] for row in values]
    n_cols = len(col_labels)
    cell_w = 44 if n_cols <= 12 else 34 if n_cols <= 20 else max(10, 720 // max(n_cols, 1))
    cell_h = 26
    show_numbers = cell_w >= 34
    left = 12 + CHAR_W * max([len(short(r, 36)) for r in row_labels] + [4])
    longest = max([len(short(c, 16)) for c in col_labels] + [1])
    rotate = longest * CHAR_W > cell_w - 4
    top = 28 + (longest * CHAR_W * 0.72 if rotate else 14)
    body = [f'<text x="{left + n_cols * cell_w / 2:.1f}" y="14" text-anchor="middle" font-size="13">{esc(col_title)}</text>']
    for j, name in enumerate(col_labels):
        cx = left + (j + 0.5) * cell_w
        if rotate:
            body.append(f'<text x="{cx:.1f}" y="{top - 6:.1f}" transform="rotate(-45 {cx:.1f} {top - 6:.1f})">'
                        f'<title>{esc(name)}</title>{esc(short(name, 16))}</text>')
        else:
            body.append(f'<text x="{cx:.1f}" y="{top - 6:.1f}" text-anchor="middle"><title>{esc(name)}</title>{esc(name)}</text>')
    for i, (name, row) in enumerate(zip(row_labels, values)):
        y = top + i * cell_h
        body.append(f'<text x="{left - 8:.1f}" y="{y + cell_h / 2 + 4:.1f}" text-anchor="end"><title>{esc(name)}</title>{esc(short(name, 36))}</text>')
        for j, v in enumerate(row):
            x = left + j * cell_w
            col = col_labels[j] if j < len(col_labels) else j
            tip = f"{name} · {col}: " + ("no value" if v is None else f"{100 * v:.2f}%")
            fill = "#eee" if v is None else _blend(v)
            body.append(f'<g><title>{esc(tip)}</title><rect x="{x:.1f}" y="{y:.1f}" width="{cell_w}" height="{cell_h}" '
                        f'fill="{fill}" stroke="#fff"/>')
            if show_numbers:
                text = "—" if v is None else f"{100 * v:.0f}"
                ink = "#fff" if v is not None and v > 0.55 else "#111"
                body.append(f'<text x="{x + cell_w / 2:.1f}" y="{y + cell_h / 2 + 4:.1f}" text-anchor="middle" '
                            f'fill="{ink}" font-size="11">{text}</text>')
            body.append("</g>")
    # Colour bar.
    bar_y = top + len(row_labels) * cell_h + 14
    bar_w = 200
    for k in range(20):
        body.append(f'<rect x="{left + k * bar_w / 20:.1f}" y="{bar_y}" width="{bar_w / 20 + 0.5:.1f}" height="10" fill="{_blend((k + 0.5) / 20)}"/>')
    body.append(f'<rect x="{left}" y="{bar_y}" width="{bar_w}" height="10" fill="none" stroke="#888"/>')
    body.append(f'<text x="{left}" y="{bar_y + 24}" text-anchor="start">0%</text>')
    body.append(f'<text x="{left + bar_w}" y="{bar_y + 24}" text-anchor="end">100%</text>')
    body.append(f'<text x="{left + bar_w + 12}" y="{bar_y + 9}">{esc(value_label)}</text>')
    width = max(left + n_cols * cell_w + 16, left + bar_w + 12 + CHAR_W * len(value_label) + 8)
    return _svg(width, bar_y + 34, body, f"heatmap of {value_label}")


DASHES = ["", "6 3", "2 3", "8 3 2 3"]


def line_chart(series: dict[str, list[tuple[float, float]]], x_label: str, y_label: str,
               width: float = 400, height: float = 250, y_range: tuple[float, float] | None = None,
               events: Sequence[tuple[float, str, bool]] = ()) -> Markup:
    """Lines with point markers, legend above the plot. Series i gets colour i mod 10 and, past
    the 10th, a dash pattern and marker shape of its own, so no two series look alike. `events`
    (x, label, alarm) draw a labelled vertical line at x (red when `alarm`: a flag fired there)."""
    series = {k: [(x, y) for x, y in pts if _finite(x) and _finite(y)] for k, pts in series.items()}
    series = {k: pts for k, pts in series.items() if pts}
    if not series:
        return _svg(320, 40, ['<text x="8" y="24">no points to draw</text>'], "empty plot")
    xs = [x for pts in series.values() for x, _ in pts]
    ys = [y for pts in series.values() for _, y in pts]
    legend_rows = math.ceil(len(series) / 2)
    top = 14 + 18 * legend_rows
    height = max(height, top + 150)
    x0, x1 = (min(xs), max(xs)) if max(xs) > min(xs) else (min(xs) - 1, max(xs) + 1)
    if y_range is not None:
        y0, y1 = y_range
    else:
        y0, y1 = _range(ys)
        if min(ys) >= 0:
            y0 = max(y0, 0.0)
    ax = Axes(64, top, width - 80, height - top - 46, x0, x1, y0, y1)
    body = ax.frame(x_label, y_label, nice_ticks(x0, x1, 6), nice_ticks(y0, y1, 4))
    for i, (name, pts) in enumerate(series.items()):
        color, dash = PALETTE[i % len(PALETTE)], DASHES[(i // len(PALETTE)) % len(DASHES)]
        shape = SHAPES[(i // len(PALETTE)) % len(SHAPES)]
        dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
        path = " ".join(f"{ax.x(x):.1f},{ax.y(y):.1f}" for x, y in sorted(pts))
        body.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"{dash_attr}/>')
        title = f"{esc(name)} at {esc(x_label)}"  # escaped once per series; numbers need none
        for x, y in pts:
            body.append(f'<g><title>{title} {tick_text(x)}: {y:.4g}</title>'
                        + marker(shape, ax.x(x), ax.y(y), 3, color, color) + "</g>")
        lx = ax.left + (i % 2) * (ax.width / 2)
        ly = 14 + 18 * (i // 2)
        body.append(f'<line x1="{lx:.1f}" y1="{ly - 4}" x2="{lx + 18:.1f}" y2="{ly - 4}" stroke="{color}" stroke-width="3"{dash_attr}/>')
        body.append(f'<text x="{lx + 24:.1f}" y="{ly}"><title>{esc(name)}</title>{esc(short(name, 26))}</text>')
    for k, (x, label, alarm) in enumerate(e for e in events if _finite(e[0]) and x0 <= e[0] <= x1):
        color = FLAG_COLOR if alarm else "#555"
        px = ax.x(x)
        body.append(f'<g class="event"><title>{esc(label)} at {esc(x_label)} {esc(tick_text(x))}</title>'
                    f'<line x1="{px:.1f}" y1="{ax.top:.1f}" x2="{px:.1f}" y2="{ax.top + ax.height:.1f}" '
                    f'stroke="{color}" stroke-width="1.5" stroke-dasharray="4 3"/>'
                    f'<text x="{px + 3:.1f}" y="{ax.top + 12 + 12 * (k % 4):.1f}" fill="{color}" font-size="10.5">'
                    f'{esc(short(label, 24))}</text></g>')
    return _svg(width, height, body, f"{y_label} per {x_label}")
