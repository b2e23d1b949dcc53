"""The optional extras (``pip install 'hhrlhf[pm]'``) and the one-line error when one is missing.

The core install reads, audits, describes and exports; the heavy libraries come with an extra
and are imported only by the code that needs them. That code calls :func:`require` first, so a
missing extra is a one-line user error naming what to install instead of an ``ImportError``
traceback from deep inside a command.
"""

from __future__ import annotations

import importlib.util
import sys

from hhrlhf.errors import HHRLHFError

# extra -> the top-level modules it provides that hhrlhf imports (kept in step with pyproject.toml).
EXTRAS: dict[str, tuple[str, ...]] = {
    "pm": ("torch", "transformers", "accelerate", "sklearn"),
    "explorer": ("fastapi", "uvicorn"),
    "collect": ("psycopg",),  # only for a Postgres database
    "pandas": ("pandas",),
    "datasets": ("datasets",),
}


def is_importable(module: str) -> bool:
    """Whether ``import module`` can find it, without importing it (torch takes seconds)."""
    if module in sys.modules:
        return sys.modules[module] is not None
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def missing(extra: str) -> list[str]:
    """The modules of ``extra`` that cannot be imported."""
    return [m for m in EXTRAS[extra] if not is_importable(m)]


def require(extra: str, what: str) -> None:
    """Raise the one-line error naming ``extra`` unless all of its modules can be imported.

    ``what`` names the thing that needs it, as the user asked for it (``hhrlhf pm``).
    """
    if missing(extra):
        raise HHRLHFError(f"{what} needs the {extra!r} extra: pip install 'hhrlhf[{extra}]'")
