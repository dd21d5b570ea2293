"""Seeded delivery chaos: duplicates, reordering, delays, drops and endpoint outages.

Every decision for a message is drawn from a generator seeded by (seed, message sequence
number, endpoint index), never from a shared stream: the same seed and the same history give
the same plan whatever the thread timing, so a chaotic run can be reproduced and explained.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Outage:
    """An endpoint outage: attempts between ``start`` and ``end`` seconds after delivery started fail."""

    start: float
    end: float

    @classmethod
    def parse(cls, text: str) -> Outage:
        """``START:END`` in seconds, e.g. ``5:20``."""
        start_text, sep, end_text = text.partition(":")
        if not sep:
            raise ValueError(f"outage {text!r}: expected START:END in seconds")
        start, end = float(start_text), float(end_text)
        if not 0 <= start < end:
            raise ValueError(f"outage {text!r}: need 0 <= START < END")
        return cls(start, end)


@dataclass(frozen=True)
class ChaosConfig:
    """All off by default. Rates are probabilities per message and endpoint; times are seconds."""

    seed: int = 0
    duplicate_rate: float = 0.0
    reorder_window: float = 0.0
    delay_rate: float = 0.0
    max_delay: float = 0.0
    drop_rate: float = 0.0
    outages: tuple[Outage, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        for name in ("duplicate_rate", "delay_rate", "drop_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, not {value}")
        for name in ("reorder_window", "max_delay"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")

    @property
    def enabled(self) -> bool:
        return bool(
            self.duplicate_rate or self.reorder_window or self.delay_rate or self.drop_rate or self.outages
        )


@dataclass(frozen=True)
class Plan:
    """What happens to one message at one endpoint."""

    drop: bool
    first_delay: float
    duplicate_delay: float | None


class Chaos:
    def __init__(self, config: ChaosConfig) -> None:
        self.config = config

    def plan(self, seq: int, endpoint: int) -> Plan:
        cfg = self.config
        rng = random.Random(f"{cfg.seed}:{seq}:{endpoint}")
        # Draw every value unconditionally so that changing one knob leaves the others' draws alone.
        drop = rng.random() < cfg.drop_rate
        reorder = rng.uniform(0.0, cfg.reorder_window)
        delayed = rng.random() < cfg.delay_rate
        delay = rng.uniform(0.0, cfg.max_delay)
        duplicate = rng.random() < cfg.duplicate_rate
        duplicate_delay = rng.uniform(0.0, max(cfg.reorder_window, cfg.max_delay))
        first = reorder + (delay if delayed else 0.0)
        return Plan(drop=drop, first_delay=first, duplicate_delay=duplicate_delay if duplicate else None)

    def in_outage(self, elapsed: float) -> bool:
        return any(o.start <= elapsed < o.end for o in self.config.outages)
