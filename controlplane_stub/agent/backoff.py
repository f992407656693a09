"""The kubelet's crash-loop back-off, shared by the node agent (containers) and the cluster
supervisor (its components): the first restart at once, then `initial`, doubling up to `cap`;
a run that lasted `reset_after` seconds or more starts the sequence again (kubelet: 10 s, 5 min,
10 min). The constants are fields so that tests run the same code with short delays."""

from __future__ import annotations

from dataclasses import dataclass

INITIAL = 10.0
CAP = 300.0
RESET_AFTER = 600.0


@dataclass
class CrashLoopBackoff:
    initial: float = INITIAL
    cap: float = CAP
    reset_after: float = RESET_AFTER
    streak: int = 0  # exits since the last reset

    def __post_init__(self) -> None:
        if not (self.initial > 0 and self.cap >= self.initial and self.reset_after > 0):
            raise ValueError(
                f"back-off: need 0 < initial <= cap and reset_after > 0 "
                f"(initial={self.initial}, cap={self.cap}, reset_after={self.reset_after})"
            )

    def after_exit(self, ran_for: float) -> float:
        """Seconds to wait before the next start, for a process that ran `ran_for` seconds."""
        if ran_for >= self.reset_after:
            self.streak = 0
        delay = 0.0 if self.streak == 0 else min(self.initial * 2 ** min(self.streak - 1, 62), self.cap)
        self.streak += 1
        return delay
