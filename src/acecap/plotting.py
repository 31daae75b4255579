"""matplotlib for acecap's report plots: files only (no display), and every label drawable."""

from __future__ import annotations

import functools


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend: reports are written on servers with no display."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    return pyplot


@functools.cache
def _drawable_codepoints() -> frozenset[int]:
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font

    return frozenset(FT2Font(font_manager.findfont(font_manager.FontProperties())).get_charmap())


def label(text: str) -> str:
    """`text` as the plot's font can draw it: a character it has no glyph for (CJK, emoji in a file name) is
    written as its code point, \\u66f2, instead of an empty box and a warning per glyph."""
    drawable = _drawable_codepoints()
    return "".join(ch if ord(ch) in drawable or ch.isspace() else ascii(ch)[1:-1] for ch in text)
