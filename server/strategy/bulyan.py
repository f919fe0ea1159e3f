"""Bulyan: MultiKrum selects n − 2f updates, then each coordinate averages the n − 4f closest to their median.
It needs at least 4f + 3 replies; with fewer the round does not count."""

from __future__ import annotations

from flwr.serverapp.strategy import Bulyan

from server.strategy.byzantine import ByzantineTolerant


class RetuneBulyan(ByzantineTolerant, Bulyan):
    """Flower's Bulyan with the RE-tune containment (see :class:`ByzantineTolerant` for ``f``)."""

    replies_per_byzantine = 4
