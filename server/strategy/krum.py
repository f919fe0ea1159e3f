"""Krum: the one hospital update closest to its n − f − 2 nearest others becomes the aggregate."""

from __future__ import annotations

from flwr.serverapp.strategy import Krum

from server.strategy.byzantine import ByzantineTolerant


class RetuneKrum(ByzantineTolerant, Krum):
    """Flower's Krum with the RE-tune containment (see :class:`ByzantineTolerant` for ``f``)."""
