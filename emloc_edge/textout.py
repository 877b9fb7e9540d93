"""Small output helpers shared by the CLI and the eval report (no torch)."""
from __future__ import annotations

import math


def finite(x):
    """Strict JSON: infinite or NaN floats (delta = inf) become strings ("inf", "-inf"), recursively."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite(v) for v in x]
    return x


def human_size(n: float) -> str:
    """Bytes as '512 B', '1.5 KB', '2.3 MB', '1.1 GB'."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def comma_list(values: tuple | list) -> str:
    """Values as a user types them in an option: (0.1, 0.2, 0.5) -> "0.1,0.2,0.5"."""
    return ",".join(map(str, values))
