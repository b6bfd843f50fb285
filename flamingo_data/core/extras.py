"""The optional extras (``pip install 'flamingo-data[NAME]'``) and the one error for a missing one.

Presence is checked with ``importlib.util.find_spec``, which does not import the package, so a
command can refuse before it writes anything and without paying for the import.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from typing import Any

from flamingo_data.errors import MissingExtra

# extra name -> the top-level module whose presence means the extra is installed
EXTRA_MODULES: dict[str, str] = {
    "download": "img2dataset",
    "train": "torch",
    "hf": "transformers",
    "openclip": "open_clip",
    "plot": "matplotlib",
    "jpegli": "pyjpegli",
    "spark": "pyspark",
    "ray": "ray",
}


def is_installed(extra: str) -> bool:
    """Whether ``extra``'s package can be imported here (found on the path; not imported)."""
    try:
        return importlib.util.find_spec(EXTRA_MODULES[extra]) is not None
    except (ImportError, ValueError):  # a module set to None in sys.modules, or without a spec
        return False


def require_extra(extra: str, needed_by: str, hint: str = "") -> None:
    """Raise MissingExtra naming ``needed_by`` (a parameter or command) unless ``extra`` is installed."""
    if extra not in EXTRA_MODULES:
        raise ValueError(f"extra must be one of {sorted(EXTRA_MODULES)}, not {extra!r}")
    if not is_installed(extra):
        raise MissingExtra(needed_by, EXTRA_MODULES[extra], extra, hint)


def import_feature(module_name: str, needed_by: str):
    """Import ``module_name``; when it fails because an extra's package is absent, raise
    MissingExtra naming ``needed_by`` instead of the bare ModuleNotFoundError."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        extra = _extra_of(exc.name or "")
        if extra is None:
            raise
        raise MissingExtra(needed_by, EXTRA_MODULES[extra], extra) from exc


def _extra_of(module_name: str) -> str | None:
    top_level = module_name.partition(".")[0]
    return next((extra for extra, mod in EXTRA_MODULES.items() if mod == top_level), None)


def lazy_exports(
    package: str, exports: dict[str, str], namespace: dict[str, Any]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """A package's PEP 562 ``__getattr__`` and ``__dir__`` for ``exports`` (public name -> module
    defining it): a name's module is imported on first use and the value cached in ``namespace``;
    one whose extra is absent raises MissingExtra."""

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(import_feature(exports[name], f"{package}.{name}"), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *exports})

    return __getattr__, __dir__
