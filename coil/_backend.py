"""Choice between a Cython extension and its pure-Python twin.

``COIL_PURE_PYTHON=1`` forces the fallback everywhere; otherwise the
extension is used when it was built, else the fallback.
"""

from __future__ import annotations

import importlib
import os


def pure_python_forced() -> bool:
    return os.environ.get("COIL_PURE_PYTHON", "") not in ("", "0")


def load(fast: str, pure: str):
    """Import and return ``(module, "cython"|"python")``."""
    if not pure_python_forced():
        try:
            return importlib.import_module(fast), "cython"
        except ImportError:
            pass
    return importlib.import_module(pure), "python"
