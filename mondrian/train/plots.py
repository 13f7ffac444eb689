"""Loss curves as standalone SVG (no plotting library needed; opens in any browser)."""

from __future__ import annotations

from html import escape

_COLORS = {"train_loss": "#1f77b4", "val_loss": "#d62728"}


def loss_curve_svg(series: dict[str, list[tuple[int, float]]], title: str,
                   width: int = 640, height: int = 360) -> str:
    """One polyline per series (step, value); log-free linear axes with a few ticks."""
    pts = [p for s in series.values() for p in s]
    left, right, top, bottom = 60, 20, 36, 40
    w, h = width - left - right, height - top - bottom
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
           '<rect width="100%" height="100%" fill="white"/>',
           f'<text x="{width / 2}" y="20" text-anchor="middle" font-size="14">{escape(title)}</text>']
    if not pts:
        out.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle">no metrics yet</text>')
        return "\n".join(out + ["</svg>"]) + "\n"
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = 0.0, max(p[1] for p in pts) * 1.05 or 1.0
    x1 = x1 if x1 > x0 else x0 + 1

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * w

    def sy(y: float) -> float:
        return top + h - (y - y0) / (y1 - y0) * h

    out.append(f'<rect x="{left}" y="{top}" width="{w}" height="{h}" fill="none" stroke="#999"/>')
    for i in range(5):
        yv = y0 + (y1 - y0) * i / 4
        xv = x0 + (x1 - x0) * i / 4
        out.append(f'<text x="{left - 6}" y="{sy(yv) + 4:.1f}" text-anchor="end">{yv:.3g}</text>')
        out.append(f'<text x="{sx(xv):.1f}" y="{top + h + 16}" text-anchor="middle">{xv:.0f}</text>')
    out.append(f'<text x="{left + w / 2}" y="{height - 6}" text-anchor="middle">step</text>')
    for k, (name, s) in enumerate(sorted(series.items())):
        color = _COLORS.get(name, "#2ca02c")
        if s:
            coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in sorted(s))
            out.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{coords}"/>')
            for x, y in s if len(s) < 60 else []:
                out.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{color}"/>')
        out.append(f'<text x="{left + w - 8}" y="{top + 16 + 16 * k}" text-anchor="end" '
                   f'fill="{color}">{escape(name)}</text>')
    return "\n".join(out + ["</svg>"]) + "\n"
