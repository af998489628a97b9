"""Human size strings ("64M", "1G", "4096") to bytes and back, for command-line options."""

from __future__ import annotations

from vstore.blocks.errors import TricopyError

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str | int) -> int:
    """'64M' -> 67108864. Accepts K/M/G/T with optional 'iB'/'B' suffix; raises TricopyError."""
    if isinstance(text, int):
        return text
    s = text.strip().upper().removesuffix("IB").removesuffix("B") if text.strip() else ""
    num = s.rstrip("KMGT")
    unit = s[len(num):]
    try:
        value = int(num)
    except ValueError:
        raise TricopyError(
            f"cannot read size {text!r}: use a number with an optional K, M, G or T suffix, e.g. 64M"
        ) from None
    if unit not in _UNITS or value <= 0:
        raise TricopyError(f"cannot read size {text!r}: use a positive number with K, M, G or T, e.g. 64M")
    return value * _UNITS[unit]


def format_size(n: int) -> str:
    """67108864 -> '64.0 MiB'."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"
