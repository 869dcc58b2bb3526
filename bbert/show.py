"""Code on the page: show the live source of a package object inside a chapter.

The chapters explain the package by showing its code, as the d2l book does, but they never
copy it: ``show_source(bbert.model.BertLayer.forward)`` prints the source that is installed
right now, so the page and the package cannot drift apart.

Chapter: ``notebooks/03_model.ipynb``.
"""
from __future__ import annotations

import inspect
import textwrap


def source_of(obj) -> str:
    """The dedented source of a module, class, function or method, headed by its qualified name."""
    try:
        code = textwrap.dedent(inspect.getsource(obj))
    except (TypeError, OSError) as e:
        raise ValueError(f"no source for {obj!r} ({e}): pass a Python function, method, class or module") from None
    module = getattr(obj, "__module__", None) or getattr(obj, "__name__", "")
    name = getattr(obj, "__qualname__", None)
    header = f"# {module}.{name}" if name and module and not inspect.ismodule(obj) else f"# {module}"
    return f"{header}\n{code.rstrip()}\n"


def show_source(obj) -> None:
    """Display ``obj``'s live source: syntax-highlighted in a notebook, plain text elsewhere.

    Displayed, not returned, so that several calls in one cell all show.
    """
    text = source_of(obj)
    try:
        from IPython import get_ipython  # deferred: IPython is only there when a notebook runs
        from IPython.display import Markdown, display
    except ImportError:
        get_ipython = None
    if get_ipython is not None and get_ipython() is not None:
        display(Markdown(f"```python\n{text}```"))
    else:
        print(text, end="")
