"""Figures written to files: matplotlib without a screen, and small PNGs for the plots that are committed."""

from __future__ import annotations

from pathlib import Path


def pyplot():
    """matplotlib.pyplot on the Agg backend: files only, on any machine (a cluster node has no screen)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_small_png(figure, path: Path) -> None:
    """A 256-colour PNG: plots committed beside results (bench/results) stay a few KB, and a line plot needs no more
    colours."""
    import io

    from PIL import Image

    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, dpi=72, format="png")
    pyplot().close(figure)
    Image.open(buffer).convert("RGB").quantize(colors=256).save(path, optimize=True)
