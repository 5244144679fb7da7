"""One budget definition for every method.

Budget ``b`` = the share of the context's keys, outside the sinks and the local window, that a method
selects for full precision. Sinks and window are given to every method alike, so a method keeps
``sinks + window + ceil(b * (L - sinks - window))`` context keys in total; kvpress presses are set to
keep exactly that many. At 1K-2K tokens sinks + window are a large share of the total, which is why
results report the total kept too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Budget:
    """``share`` of eligible context keys, on top of ``sinks`` first and ``window`` most recent keys."""

    share: float
    sinks: int = 4
    window: int = 64

    def __post_init__(self) -> None:
        if not 0.0 < self.share <= 1.0:
            raise ValueError(f"share={self.share!r} is not allowed; a budget must be in (0, 1]")
        if self.sinks < 0 or self.window < 1:
            raise ValueError(f"sinks={self.sinks!r}, window={self.window!r}: need sinks >= 0 and window >= 1")

    def selected(self, length: int) -> int:
        """Keys chosen by the method among the ``length - sinks - window`` eligible ones."""
        eligible = max(0, length - self.sinks - self.window)
        return min(eligible, math.ceil(eligible * self.share - 1e-9))

    def kept(self, length: int) -> int:
        """Total context keys kept at full precision: sinks + window + selected."""
        return min(length, self.sinks + self.window + self.selected(length))
