"""Plain-text formatting shared by the report tables (``python -m bench``)."""

from __future__ import annotations

__all__ = ["duration", "rate", "ratio", "table"]


def duration(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.3f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.0f} us"


def rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def ratio(reference: float | None, median: float | None) -> float | None:
    """How many times faster than ``reference`` (its median / this median)."""
    if reference is None or median is None or median <= 0:
        return None
    return reference / median


def table(header: list[str], rows: list[list[str]], note: bool) -> str:
    """First column (and the last when ``note``) left-aligned, numbers right-aligned."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    last = len(header) - 1

    def line(cells: list[str]) -> str:
        out = [c.ljust(w) if i == 0 or (note and i == last) else c.rjust(w)
               for i, (c, w) in enumerate(zip(cells, widths, strict=True))]
        return "  ".join(out).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(r) for r in rows)])
