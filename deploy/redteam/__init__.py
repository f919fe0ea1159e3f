"""``retune redteam``: every known attack of a malicious server, a colluding peer or a tampering operator, run
against the installed hospital code (:mod:`deploy.redteam.bench`), each judged held or FAILED by what the attacker
obtained. A hospital's privacy officer runs it before joining a consortium; CI runs it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from deploy.redteam.bench import Bench


@dataclass(frozen=True)
class Outcome:
    """One attack's result: ``held`` when the defences stopped it; ``obtained``: what the attacker got."""

    attack: str
    held: bool
    obtained: str

    def line(self) -> str:
        return f"{'held  ' if self.held else 'FAILED'}  {self.attack}: {self.obtained}"


@dataclass(frozen=True)
class Attack:
    """An attack: its name, who plays it (server, peer, operator), what it tries, and how to run it on a bench."""

    name: str
    attacker: str
    tries: str
    run: Callable[[Bench], Outcome]


ATTACKS: dict[str, Attack] = {}


def attack(name: str, attacker: str, tries: str) -> Callable[[Callable[[Bench], tuple[bool, str]]], Attack]:
    """Register ``fn(bench) -> (held, obtained)`` as the attack ``name``."""

    def register(fn: Callable[[Bench], tuple[bool, str]]) -> Attack:
        def run(bench: Bench) -> Outcome:
            held, obtained = fn(bench)
            return Outcome(name, held, obtained)

        ATTACKS[name] = Attack(name, attacker, tries, run)
        return ATTACKS[name]

    return register
