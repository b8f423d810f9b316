"""Progress reporting for :func:`fr.sweep <funcreg._sweep.sweep>`.

A tqdm bar when tqdm is installed (steps, best validation loss so far, diverged models), a
plain line on stderr at each evaluation otherwise, nothing with ``progress=False``. The
training loop calls :meth:`Progress.update` every step (cheap: no tensor is read) and
:meth:`Progress.status` only at evaluation points.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any

__all__ = ["Progress"]


class Progress:
    """``Progress(total, initial=0, enabled=True)``; use as a context manager."""

    def __init__(self, total: int, initial: int = 0, enabled: bool = True, desc: str = "sweep"):
        self.total, self.n, self.desc = total, initial, desc
        self._bar: Any = None
        self._plain = False
        self._t0 = time.perf_counter()
        if not enabled:
            return
        try:
            from tqdm.auto import tqdm
        except ImportError:
            self._plain = True
        else:
            self._bar = tqdm(total=total, initial=initial, desc=desc, unit="step", leave=True)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)

    def status(self, best: float | None, diverged: int, k: int) -> None:
        """Show the best validation value so far and the number of diverged models."""
        fields: dict[str, str] = {}
        if best is not None and math.isfinite(best):
            fields["best_val"] = f"{best:.4g}"
        fields["diverged"] = f"{diverged}/{k}"
        if self._bar is not None:
            self._bar.set_postfix(fields, refresh=False)
        elif self._plain:
            info = "  ".join(f"{key} {v}" for key, v in fields.items())
            elapsed = time.perf_counter() - self._t0
            print(
                f"{self.desc}: step {self.n}/{self.total}  {info}  ({elapsed:.1f} s)",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
