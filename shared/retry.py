"""The one retry policy: the delay tiers, the jitter and the attempt limit.

The bus uses it for messages (one TTL queue per tier, so a message's delay is the tier
itself), the job workers for jobs (the tier with "equal jitter", so jobs that failed
together do not come back together). Nothing else decides when to try again.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from shared.settings import Settings


@dataclass(frozen=True)
class RetryPolicy:
    delays: tuple[float, ...]
    max_attempts: int

    def __post_init__(self) -> None:
        if not self.delays or any(d < 0 for d in self.delays):
            raise ValueError(f"retry delays must be a non-empty list of seconds >= 0, "
                             f"got {self.delays!r}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {self.max_attempts}")

    @classmethod
    def from_settings(cls, settings: Settings) -> RetryPolicy:
        """FERRY_RETRY_DELAYS and FERRY_MAX_ATTEMPTS: messages and most jobs."""
        return cls(tuple(settings.retry_delays), settings.max_attempts)

    @classmethod
    def exponential(cls, base: float, cap: float, max_attempts: int) -> RetryPolicy:
        """base·2^(n-1) seconds after the n-th failed attempt, at most `cap`."""
        return cls(tuple(min(cap, base * 2 ** n) for n in range(max_attempts)), max_attempts)

    def tier(self, attempts: int) -> float:
        """The delay after `attempts` failed attempts (1 = the first failed), unjittered."""
        return self.delays[min(max(attempts, 1) - 1, len(self.delays) - 1)]

    def delay(self, attempts: int) -> float:
        """The tier with equal jitter: half of it fixed, half random."""
        step = self.tier(attempts)
        return float(step / 2 + secrets.SystemRandom().random() * step / 2)

    def exhausted(self, attempts: int) -> bool:
        """True when `attempts` failed attempts are all there may be."""
        return attempts >= self.max_attempts
