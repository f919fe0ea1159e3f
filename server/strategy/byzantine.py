"""What Krum, MultiKrum and Bulyan share: the number ``f`` of Byzantine hospitals they are built to withstand."""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, Message, MetricRecord

from server.strategy.adaptor_strategy import AdaptorStrategy


class ByzantineTolerant(AdaptorStrategy):
    """Placed before :class:`AdaptorStrategy`: with ``auto_byzantine``, each round assumes the most Byzantine
    hospitals the rule withstands among the replies it aggregates, ⌊(n − 3)/``replies_per_byzantine``⌋; otherwise
    Flower's fixed ``num_malicious_nodes``."""

    replies_per_byzantine = 2

    def __init__(self, *args, auto_byzantine: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.auto_byzantine = auto_byzantine

    def aggregate_checked(self, server_round: int, replies: Iterable[Message]
                          ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        self.prepare(len(replies))
        return super().aggregate_checked(server_round, replies)

    def prepare(self, replies: int) -> None:
        """Set up the rule for a round that aggregates ``replies`` replies."""
        if self.auto_byzantine:
            self.num_malicious_nodes = max(0, (replies - 3) // self.replies_per_byzantine)
