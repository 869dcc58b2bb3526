"""Progress: a bar on a terminal, plain lines in a log (``bbert prepare``, ``bbert finetune``).

Chapter: ``notebooks/02_data.ipynb`` (preparing the data shows it first).
"""
from __future__ import annotations

import sys
import time


class Progress:
    """A tqdm bar on a terminal; in a file or a pipe, one plain line every ``every`` of the work
    (when ``total`` is known) or every ``seconds``, whichever comes first: a bar's ``\r``
    updates would flood a log. ``info`` given to :meth:`update` is shown beside the count."""

    def __init__(self, total: int | None, desc: str, enabled: bool = True, unit: str = "steps",
                 every: float = 0.1, seconds: float = 30.0, stream=None):
        from tqdm.auto import tqdm  # deferred: tqdm.auto pulls in IPython, which data and glue need not load

        self.total, self.desc, self.enabled, self.unit = total, desc, enabled, unit
        self.every, self.seconds = every, seconds
        self.stream = stream or sys.stderr
        self.bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=total is None, file=self.stream,
                        disable=not (enabled and self.stream.isatty()))
        self.done, self.last_fraction, self.last_time = 0, 0.0, time.monotonic()

    def update(self, n: int = 1, **info) -> None:
        self.done += n
        self.bar.update(n)
        if info:
            self.bar.set_postfix(info, refresh=False)
        if not self.enabled or not self.bar.disable:
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
