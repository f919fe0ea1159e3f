"""Running the red team: build the bench once, run each attack on it, collect the outcomes."""

from __future__ import annotations

import logging
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from deploy.redteam import ATTACKS, Outcome
from deploy.redteam.bench import Bench
from shared.errors import RetuneError

#: The attack modules (each registers its attacks on import).
MODULES = ("deploy.redteam.attacks_rounds", "deploy.redteam.attacks_eval", "deploy.redteam.attacks_secagg",
           "deploy.redteam.attacks_session", "deploy.redteam.attacks_operator")


def known_attacks() -> dict:
    import importlib

    for module in MODULES:
        importlib.import_module(module)
    return ATTACKS


@contextmanager
def _quiet() -> Iterator[None]:
    """The hospitals log every refusal they make (that is the point here), and the accountants warn about their
    numerics: keep the report readable."""
    loggers = [logging.getLogger(name) for name in ("client", "server", "flwr")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def run_attacks(names: list[str] | None, backbone: str, images: int, workdir: Path | None = None,
                on_outcome: Callable[[Outcome], None] | None = None, floor: dict | None = None) -> list[Outcome]:
    """Run the attacks ``names`` (None: all) against a bench of 5 phantom hospitals of ``images`` images each, whose
    node config holds ``floor`` (a privacy officer's own floor keys; where and what a hospital reads are the
    bench's)."""
    attacks = known_attacks()
    unknown = sorted(set(names or []) - set(attacks))
    if unknown:
        raise RetuneError(f"unknown attack(s) {', '.join(unknown)}; known: {', '.join(sorted(attacks))}")
    root = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="retune-redteam-"))
    outcomes = []
    with _quiet():
        bench = Bench.build(root, backbone, hospitals=5, images=images)
        bench.floor = dict(floor or {})
        for name in names or list(attacks):
            try:
                outcome = attacks[name].run(bench)
            except Exception as exc:  # noqa: BLE001  an attack that breaks is reported, and fails the run
                outcome = Outcome(name, False, f"the attack itself failed ({type(exc).__name__}: {exc}): "
                                               "no verdict")
            outcomes.append(outcome)
            if on_outcome is not None:
                on_outcome(outcome)
    return outcomes
