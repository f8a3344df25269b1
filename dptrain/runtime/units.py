"""Sizes as people read them."""

from __future__ import annotations


def format_bytes(n: float) -> str:
    """e.g. "8 B", "300.3 KB", "1.5 MB", "72.8 GB" (powers of 1024)."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"
