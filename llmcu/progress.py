"""A minimal dependency-free progress indicator.

On a terminal: one line redrawn in place with \\r. Elsewhere (a pipe, a log
file, CI): a plain line at most every `every_s` seconds and at the end, so
logs stay readable.
"""

from __future__ import annotations

import sys
import time


class Progress:
    """Progress(total, desc).update(n) ... .close(); also a context manager.

    total: the amount of work (None: unknown); unit: what is counted.
    stream: default sys.stdout; tty: force the terminal/plain behaviour
    (default: stream.isatty(), and only when `log` is None or print).
    log: a callable taking one line, for the plain lines (a caller's logger);
    default: print to stream. extra: a callable returning more text for the
    line (e.g. a second count), or None.
    """

    def __init__(self, total=None, desc: str = "", unit: str = "it", stream=None,
                 tty: bool | None = None, every_s: float = 10.0, log=None, extra=None):
        self.total, self.desc, self.unit, self.extra = total, desc, unit, extra
        self.stream = stream if stream is not None else sys.stdout
        if tty is None:
            isatty = getattr(self.stream, "isatty", None)
            tty = bool(isatty and isatty()) and log in (None, print)
        self._log = log if log not in (None, print) else self._print
        self.tty, self.every_s = tty, every_s
        self.n = 0
        self.start = self._last = time.monotonic()
        self._closed = False
        if self.tty:
            self._draw()

    def _text(self) -> str:
        elapsed = time.monotonic() - self.start
        rate = self.n / elapsed if elapsed > 0 else 0.0
        if self.total:
            frac = min(1.0, self.n / self.total)
            bar = "#" * int(20 * frac)
            body = f"[{bar:<20}] {frac * 100:5.1f}% {self.n:,}/{self.total:,} {self.unit}"
        else:
            body = f"{self.n:,} {self.unit}"
        more = f" | {self.extra()}" if self.extra is not None else ""
        return f"{self.desc}: {body}{more} | {elapsed:.1f}s, {rate:,.0f} {self.unit}/s"

    def _draw(self) -> None:
        self.stream.write("\r" + self._text() + "\x1b[K")
        self.stream.flush()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if self.tty:
            if now - self._last >= 0.1:
                self._last = now
                self._draw()
        elif now - self._last >= self.every_s:
            self._last = now
            self._log(self._text())

    def _print(self, line: str) -> None:
        print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.tty:
            self._draw()
            self.stream.write("\n")
            self.stream.flush()
        else:
            self._log(self._text())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
