"""MultiKrum: the n − f updates with the best Krum scores, averaged by example count."""

from __future__ import annotations

from flwr.serverapp.strategy import MultiKrum

from server.strategy.byzantine import ByzantineTolerant


class RetuneMultiKrum(ByzantineTolerant, MultiKrum):
    """Flower's MultiKrum with the RE-tune containment (see :class:`ByzantineTolerant` for ``f``); it keeps all but
    ``f`` of the replies the round aggregates (Flower's fixed ``num_nodes_to_select`` is set per round)."""

    def prepare(self, replies: int) -> None:
        super().prepare(replies)
        self.num_nodes_to_select = max(1, replies - self.num_malicious_nodes)
