"""Lazy exports: a package's public names, imported from their modules on first use (PEP 562).

``import bbert`` and ``bbert finetune --help`` stay quick this way: torch, transformers and
scikit-learn load only when a name that needs them is used. See ``bbert/__init__.py``.
"""
from __future__ import annotations

import importlib
import sys


def lazy_exports(package: str, exports: dict[str, str]):
    """A package's ``__getattr__`` and ``__dir__`` (PEP 562) that import each public name from
    its module (``exports``: name -> module) on first use, so that importing the package is quick."""
    def __getattr__(name: str):
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__():
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return __getattr__, __dir__
