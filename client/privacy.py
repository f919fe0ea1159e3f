"""Differential privacy at the hospital: one object owns the accountant, the ε ledger and the budget.

The trainer asks :class:`HospitalPrivacy` for the noise of a round, trains with opacus, and commits what it
spent. The ledger lives on the hospital's own disk and persists across rounds, stages and runs; ε is always
computed by an opacus accountant (RDP or PRV) over the whole ledger. A round that would take ε past the
hospital's budget is declined before any data is touched.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from opacus.accountants import create_accountant

from shared.cache import atomic_write_text
from shared.errors import RetuneError


class BudgetExhausted(RetuneError):
    """The next round would exceed this hospital's privacy budget; the hospital declines it."""


@dataclass(frozen=True)
class DPConfig:
    """A hospital's DP-SGD settings.

    Parameters
    ----------
    max_epsilon : float
        The budget: ε this hospital will never exceed over everything in its ledger.
    delta : float
        δ of every (ε, δ) statement (default 1e-5).
    target_epsilon : float | None
        Set the noise so the planned rounds spend this ε (default: the whole budget).
    noise_multiplier : float | None
        Or give the noise directly (overrides ``target_epsilon``).
    max_grad_norm : float
        Per-sample clipping bound (default 1.0).
    accountant : {"rdp", "prv"}
        Opacus accountant (default "prv": its upper bound on ε is tighter than RDP's, so the same budget buys about
        6% less noise; "rdp" computes faster).
    max_noise_multiplier : float
        Decline rather than train when what is left of the budget needs more noise than this (default 20).
    """

    max_epsilon: float
    delta: float = 1e-5
    target_epsilon: float | None = None
    noise_multiplier: float | None = None
    max_grad_norm: float = 1.0
    accountant: Literal["rdp", "prv"] = "prv"
    max_noise_multiplier: float = 20.0

    def __post_init__(self) -> None:
        if not self.max_epsilon > 0 or not 0 < self.delta < 1:
            raise RetuneError(f"a DP budget needs ε > 0 and 0 < δ < 1 (got ε={self.max_epsilon}, δ={self.delta})")


@dataclass(frozen=True)
class Spend:
    """One round of DP-SGD: what the accountant needs, and where it happened."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    run: str
    stage: int
    round: int
    time: float


class HospitalPrivacy:
    """The privacy object of one hospital (cf. opacus ``PrivacyEngine``): budget, accountant and ledger."""

    def __init__(self, ledger: Path, config: DPConfig) -> None:
        self.path = Path(ledger)
        self.config = config
        self.spent: list[Spend] = []
        if self.path.exists():
            saved = json.loads(self.path.read_text())
            if saved["delta"] != config.delta or saved["accountant"] != config.accountant:
                raise RetuneError(f"privacy ledger {self.path} was kept with δ={saved['delta']} and the "
                                  f"{saved['accountant']} accountant; use the same settings")
            self.spent = [Spend(**entry) for entry in saved["entries"]]

    def epsilon(self, extra: Spend | None = None) -> float:
        """ε spent over the whole ledger (plus ``extra``, to look ahead)."""
        entries = self.spent + ([extra] if extra else [])
        if not entries:
            return 0.0
        accountant = create_accountant(self.config.accountant)
        accountant.history = [(e.noise_multiplier, e.sample_rate, e.steps) for e in entries]
        return float(accountant.get_epsilon(delta=self.config.delta))

    def noise_for(self, sample_rate: float, steps: int, rounds_left: int) -> float:
        """Noise multiplier of the next round: given directly, or the smallest σ with which the ledger plus the
        ``rounds_left`` planned rounds (this one included) stay within ``target_epsilon`` (default: the budget)."""
        if self.config.noise_multiplier is not None:
            return self.config.noise_multiplier
        target = self.config.target_epsilon or self.config.max_epsilon
        plan = lambda sigma: self.epsilon(Spend(sigma, sample_rate, steps * max(rounds_left, 1), "", 0, 0, 0.0))  # noqa: E731
        low, high = 0.3, 2.0
        while plan(high) > target:
            low, high = high, high * 2
            if high > self.config.max_noise_multiplier:
                raise BudgetExhausted(self._declined(plan(self.config.max_noise_multiplier)))
        while high - low > 1e-3 * high:
            mid = (low + high) / 2
            low, high = (mid, high) if plan(mid) > target else (low, mid)
        return high

    def check(self, spend: Spend) -> float:
        """ε after ``spend``; raises :class:`BudgetExhausted` if that exceeds the budget."""
        after = self.epsilon(spend)
        if after > self.config.max_epsilon * (1 + 1e-6):
            raise BudgetExhausted(self._declined(after))
        return after

    def commit(self, spend: Spend) -> float:
        """Record a round that was trained (its update is leaving the hospital); returns ε so far."""
        self.spent.append(spend)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, json.dumps({
            "delta": self.config.delta, "accountant": self.config.accountant,
            "entries": [asdict(e) for e in self.spent]}, indent=1))
        return self.epsilon()

    def _declined(self, would_be: float) -> str:
        return (f"privacy budget: this round would bring ε to {would_be:.3g} > the hospital's maximum "
                f"{self.config.max_epsilon:g} (δ={self.config.delta:g}, ledger {self.path}); declining")


def spend(noise_multiplier: float, sample_rate: float, steps: int, run: str, stage: int, round_: int) -> Spend:
    """A ledger entry stamped with the current time."""
    return Spend(noise_multiplier, sample_rate, steps, run, stage, round_, time.time())
