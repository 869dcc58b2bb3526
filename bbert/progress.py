"""Progress: a bar on a terminal or in a notebook, plain lines in a log (``bbert prepare``,
``bbert finetune``).

In a notebook the bar is a tqdm widget: the kernel's stderr would put every line on the page
as a red stderr block. Without ipywidgets a notebook shows nothing.

Chapter: ``notebooks/02_data.ipynb`` (preparing the data shows it first).
"""
from __future__ import annotations

import importlib.util
import sys
import time


def in_notebook() -> bool:
    """True inside a Jupyter kernel (a notebook, nbmake, the book's execution)."""
    shell = sys.modules.get("IPython") and sys.modules["IPython"].get_ipython()
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


def has_widgets() -> bool:
    return importlib.util.find_spec("ipywidgets") is not None


class Progress:
    """A tqdm bar on a terminal or in a notebook; in a file or a pipe, one plain line every
    ``every`` of the work (when ``total`` is known) or every ``seconds``, whichever comes first:
    a bar's ``\r`` updates would flood a log. ``info`` given to :meth:`update` is shown beside
    the count. ``stream`` (default stderr) is where the bar or the lines go, outside a notebook."""

    def __init__(self, total: int | None, desc: str, enabled: bool = True, unit: str = "steps",
                 every: float = 0.1, seconds: float = 30.0, stream=None):
        self.total, self.desc, self.unit = total, desc, unit
        self.every, self.seconds = every, seconds
        self.stream = stream or sys.stderr
        widget = stream is None and in_notebook()
        if widget and not has_widgets():
            enabled = False  # no widget to draw: stay silent rather than fill the page with lines
        self.enabled = enabled
        if widget:
            from tqdm.notebook import tqdm
            self.bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=total is None, disable=not enabled)
        else:
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=total is None, file=self.stream,
                            disable=not (enabled and self.stream.isatty()))
        self.lines = enabled and self.bar.disable  # a file or a pipe: plain lines instead of a bar
        self.done, self.last_fraction, self.last_time = 0, 0.0, time.monotonic()

    def update(self, n: int = 1, **info) -> None:
        self.done += n
        self.bar.update(n)
        if info:
            self.bar.set_postfix(info, refresh=False)
        if not self.lines:
            return
        now = time.monotonic()
        fraction = self.done / max(self.total, 1) if self.total else 0.0
        if (self.total and (fraction - self.last_fraction >= self.every or self.done == self.total)) \
                or now - self.last_time >= self.seconds:
            count = f"{self.done}/{self.total} {self.unit} ({fraction:.0%})" if self.total else f"{self.done:,} {self.unit}"
            extra = "".join(f", {k} {v}" for k, v in info.items())
            print(f"{self.desc}: {count}{extra}", file=self.stream, flush=True)
            self.last_fraction, self.last_time = fraction, now

    def close(self) -> None:
        self.bar.close()
