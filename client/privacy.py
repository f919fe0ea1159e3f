"""Differential privacy at the hospital: one object owns the accountant, the ε ledger and the budget.

The trainer asks :class:`HospitalPrivacy` for the noise of a round, trains, and commits what it spent. The ledger
lives on the hospital's own disk and persists across rounds, stages and runs; ε is always computed by an opacus
accountant (RDP or PRV) over the whole ledger. A round that would take ε past the hospital's budget is declined
before any data is touched.

**It cannot undercount.** A round holds the ledger exclusively (``fcntl`` lock on ``<ledger>.lock``) from re-reading
it, through the budget check and training, to the commit, which checks that the file did not change underneath and
replaces it atomically: two runs spending from one ledger at once add up exactly. **It is tamper-evident.** Every
entry carries ``prev`` and ``hash`` (sha256 of its canonical JSON), chained from :data:`GENESIS`; with an audit log
(node config ``audit-log``) every charge is also written there (event ``dp-charge`` with the entry's hash), and
on load the ledger must end at the last charge the audit log recorded. A changed, removed or reordered entry, or
entries cut off the end, stop the hospital's DP training with an error instead of a smaller ε.

**Nothing exact leaves.** A round's example count (FedAvg's weight, which counts labelled images and so depends on
labels: in a class-incremental stage, the positives of a disease) leaves with Gaussian noise too (node config
``dp-count-noise``), charged to the ledger beside the round's DP-SGD steps (:func:`count_spend`). No ε goes to the
server: the hospital's cumulative ε would tell it about the hospital's other federations.

**A resumed round is not charged twice.** A charge is keyed by the run's identity (its run config, not Flower's run
id), stage, round and the global adaptors received; the noisy update and count it paid for are kept beside the
ledger (``released/``). Asked for the same round with the same adaptors again (a server that restarted, a retried
round), the hospital sends that same update again: no new noise, no new ε, the same result as an uninterrupted run.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from opacus.accountants import create_accountant
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from client.audit import AuditLog, canonical_json
from shared.cache import atomic_write_text
from shared.errors import RetuneError

LEDGER_FORMAT = "retune-ledger/2"
GENESIS = "0" * 64
DP_CHARGE = "dp-charge"
RELEASED_DIR = "released"
#: Metadata key of a kept release's noisy example count.
EXAMPLES_KEY = "num-examples"


class BudgetExhausted(RetuneError):
    """The next round would exceed this hospital's privacy budget; the hospital declines it."""


class LedgerTampered(RetuneError):
    """The ε ledger does not verify: an entry was changed, removed or reordered, or it disagrees with the audit
    log. The hospital stops DP training until its IT has looked."""


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
    """One round of DP-SGD: what the accountant needs, and where it happened (``run``: the run's identity, see
    :func:`shared.config.run_identity`; ``key``: what the round was asked, see :func:`released_key`)."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    run: str
    stage: int
    round: int
    time: float
    key: str = ""


def entry_hash(entry: dict) -> str:
    """sha256 of a ledger entry's canonical JSON without its ``hash``."""
    return hashlib.sha256(canonical_json({k: v for k, v in entry.items() if k != "hash"})).hexdigest()


def released_key(run: str, stage: int, round_: int, incoming: str) -> str:
    """What identifies a DP round's release: the run's identity, stage, round, digest of the adaptors received."""
    return hashlib.sha256(json.dumps([run, stage, round_, incoming]).encode()).hexdigest()


class HospitalPrivacy:
    """The privacy object of one hospital (cf. opacus ``PrivacyEngine``): budget, accountant and ledger.

    ``audit``: the hospital's audit log, where every charge is written too and which the ledger is checked
    against (recommended; without it only the ledger's own hash chain is checked).
    """

    def __init__(self, ledger: Path, config: DPConfig, audit: AuditLog | None = None) -> None:
        self.path = Path(ledger)
        self.config = config
        self.audit = audit
        self.spent: list[Spend] = []
        self._chain: list[dict] = []
        self._loaded = b""
        self._load()

    def _load(self) -> None:
        """Read and verify the ledger (and its agreement with the audit log)."""
        self._loaded = self.path.read_bytes() if self.path.exists() else b""
        if not self._loaded:
            self.spent, self._chain = [], []
        else:
            saved = json.loads(self._loaded)
            if saved.get("format") != LEDGER_FORMAT:
                raise LedgerTampered(f"privacy ledger {self.path} is not a {LEDGER_FORMAT} ledger")
            if saved["delta"] != self.config.delta or saved["accountant"] != self.config.accountant:
                raise RetuneError(f"privacy ledger {self.path} was kept with δ={saved['delta']} and the "
                                  f"{saved['accountant']} accountant; use the same settings")
            prev = GENESIS
            for number, entry in enumerate(saved["entries"], start=1):
                if entry.get("prev") != prev or entry.get("hash") != entry_hash(entry):
                    raise LedgerTampered(f"privacy ledger {self.path}: entry {number} was changed, removed or "
                                         "moved (its hash chain breaks there)")
                prev = entry["hash"]
            self._chain = saved["entries"]
            self.spent = [Spend(**{k: v for k, v in e.items() if k not in ("prev", "hash")}) for e in self._chain]
        self._check_audit()

    @property
    def _name(self) -> str:
        """How the audit log names this ledger (its absolute path)."""
        return str(self.path.resolve())

    def _check_audit(self) -> None:
        if self.audit is None or not self.audit.path.exists():
            return
        charges = [e for e in self.audit.entries() if e.get("event") == DP_CHARGE and e.get("ledger") == self._name]
        head = self._chain[-1]["hash"] if self._chain else None
        if charges and charges[-1]["entry"] != head:
            raise LedgerTampered(f"privacy ledger {self.path} ends at {str(head)[:12]}…, but the audit log's last "
                                 f"charge is entry {charges[-1]['entry'][:12]}…: entries were removed")

    @contextmanager
    def round(self) -> Iterator[HospitalPrivacy]:
        """Hold the ledger exclusively for one round: re-read and verify it, let the caller check, train and
        :meth:`commit`, then release it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(f"{self.path}.lock", "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                self._load()
                yield self
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def epsilon(self, *extra: Spend) -> float:
        """ε spent over the whole ledger (plus ``extra``, to look ahead)."""
        entries = self.spent + list(extra)
        if not entries:
            return 0.0
        accountant = create_accountant(self.config.accountant)
        accountant.history = [(e.noise_multiplier, e.sample_rate, e.steps) for e in entries]
        return float(accountant.get_epsilon(delta=self.config.delta))

    def noise_for(self, sample_rate: float, steps: int, rounds_left: int, count_noise: float | None = None) -> float:
        """Noise multiplier of the next round: given directly, or the smallest σ with which the ledger plus the
        ``rounds_left`` planned rounds (this one included; each with its noisy example count when ``count_noise``
        is given, see :func:`count_spend`) stay within ``target_epsilon`` (default: the budget)."""
        if self.config.noise_multiplier is not None:
            return self.config.noise_multiplier
        target = self.config.target_epsilon or self.config.max_epsilon
        rounds = max(rounds_left, 1)
        counts = [] if count_noise is None else [Spend(count_noise, 1.0, rounds, "", 0, 0, 0.0)]

        def plan(sigma: float) -> float:
            return self.epsilon(Spend(sigma, sample_rate, steps * rounds, "", 0, 0, 0.0), *counts)

        low, high = 0.3, 2.0
        while plan(high) > target:
            low, high = high, high * 2
            if high > self.config.max_noise_multiplier:
                raise BudgetExhausted(self._declined(plan(self.config.max_noise_multiplier)))
        while high - low > 1e-3 * high:
            mid = (low + high) / 2
            low, high = (mid, high) if plan(mid) > target else (low, mid)
        return high

    def check(self, *spends: Spend) -> float:
        """ε after ``spends``; raises :class:`BudgetExhausted` if that exceeds the budget."""
        after = self.epsilon(*spends)
        if after > self.config.max_epsilon * (1 + 1e-6):
            raise BudgetExhausted(self._declined(after))
        return after

    def commit(self, *spends: Spend) -> float:
        """Record the releases of a round (its update, and its noisy example count, are leaving the hospital);
        returns ε so far. Call it inside :meth:`round`; refuses if the ledger changed on disk since it was read."""
        now = self.path.read_bytes() if self.path.exists() else b""
        if now != self._loaded:
            raise LedgerTampered(f"privacy ledger {self.path} changed while this round held it; not committing")
        entries, prev = [], self._chain[-1]["hash"] if self._chain else GENESIS
        for spent in spends:
            entry = {**asdict(spent), "prev": prev}
            entry["hash"] = prev = entry_hash(entry)
            entries.append(entry)
        text = json.dumps({"format": LEDGER_FORMAT, "delta": self.config.delta, "accountant": self.config.accountant,
                           "entries": [*self._chain, *entries]}, indent=1)
        atomic_write_text(self.path, text)
        self._loaded = text.encode()
        self._chain += entries
        self.spent += spends
        epsilon = self.epsilon()
        if self.audit is not None:
            for spent, entry in zip(spends, entries):
                self.audit.append({"event": DP_CHARGE, "ledger": self._name, "entry": entry["hash"],
                                   "run": spent.run, "stage": spent.stage, "round": spent.round,
                                   "noise_multiplier": spent.noise_multiplier, "sample_rate": spent.sample_rate,
                                   "steps": spent.steps, "epsilon": epsilon, "delta": self.config.delta,
                                   "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(spent.time))})
        return epsilon

    def released(self, key: str) -> tuple[dict[str, np.ndarray], int] | None:
        """The noisy adaptors and example count a committed round with this :func:`released_key` sent, if kept."""
        if not any(e.key == key for e in self.spent):
            return None
        path = self.path.parent / RELEASED_DIR / f"{key}.safetensors"
        try:
            with safe_open(path, framework="numpy") as f:
                examples = int((f.metadata() or {}).get(EXAMPLES_KEY, "0"))
                arrays = {name: f.get_tensor(name) for name in f.keys()}
        except (OSError, ValueError, SafetensorError):
            return None
        return (arrays, examples) if examples > 0 else None

    def keep_released(self, key: str, arrays: dict[str, np.ndarray], examples: int) -> None:
        """Keep what a committed round sends (adaptors and example count), so that the same round asked again gets
        the same answer."""
        folder = self.path.parent / RELEASED_DIR
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{key}.tmp"
        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, tmp, metadata={EXAMPLES_KEY: str(examples)})
        os.replace(tmp, folder / f"{key}.safetensors")

    def _declined(self, would_be: float) -> str:
        return (f"privacy budget: this round would bring ε to {would_be:.3g} > the hospital's maximum "
                f"{self.config.max_epsilon:g} (δ={self.config.delta:g}, ledger {self.path}); declining")


def spend(noise_multiplier: float, sample_rate: float, steps: int, run: str, stage: int, round_: int,
          key: str = "") -> Spend:
    """A ledger entry stamped with the current time."""
    return Spend(noise_multiplier, sample_rate, steps, run, stage, round_, time.time(), key)


def count_spend(count_noise: float, run: str, stage: int, round_: int, key: str = "") -> Spend:
    """The ledger entry of a noisy example count: a Gaussian of standard deviation ``count_noise`` on a count one
    sample changes by at most 1 (noise multiplier ``count_noise``, the whole data, one release)."""
    return spend(count_noise, 1.0, 1, run, stage, round_, key)
