"""Progress on stderr for the CLI (tqdm): count, rate, time left and failures, on a line of its own."""
from __future__ import annotations

import sys

from tqdm import tqdm


class _ThroughBar:
    """A text stream whose writes go through tqdm.write: the bar is cleared, the text printed, the
    bar redrawn, so result rows on a terminal never share a line with the bar."""

    def __init__(self, bar: tqdm, fp):
        self._bar, self._fp = bar, fp

    def write(self, text: str) -> int:
        self._bar.write(text, file=self._fp, end="")
        return len(text)

    def flush(self):
        self._fp.flush()


class Progress:
    """Counts finished inputs; draws a tqdm bar only when stderr is a terminal (or `enabled`).

    Args:
        total: number of inputs (None when unknown).
        enabled: force the bar on or off (default: on when stderr is a terminal).
    """

    def __init__(self, total: int | None, enabled: bool | None = None):
        self.total, self.n, self.failed = total, 0, 0
        enabled = sys.stderr.isatty() if enabled is None else enabled
        self._bar = tqdm(total=total, unit="img", file=sys.stderr, dynamic_ncols=True, leave=True,
                         bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}]{postfix}") \
            if enabled else None

    def wrap(self, fp):
        """`fp` itself, or a stream that prints through the bar when both go to the same terminal."""
        if self._bar is not None and getattr(fp, "isatty", lambda: False)():
            return _ThroughBar(self._bar, fp)
        return fp

    def update(self, ok: bool):
        """One more input finished (`ok`: classified; otherwise failed)."""
        self.n += 1
        self.failed += 0 if ok else 1
        if self._bar is not None:
            if not ok:
                self._bar.set_postfix_str(f"{self.failed} failed", refresh=False)
            self._bar.update(1)

    def close(self):
        """End the bar (leaves its last state on screen)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
