"""What every RE-tune strategy adds to its Flower parent: the wire-format check and a deterministic order."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord

from shared.wire import METRICS, ArraySpec, WireError, check_reply, site_of

log = logging.getLogger(__name__)


def reply_order(msg: Message) -> tuple[int, str, int]:
    """Sort key of a reply: simulated partition id when present, then the hospital's name, then the node id."""
    content = msg.content if not msg.has_error() else None
    metrics = content[METRICS] if content is not None and METRICS in content else {}
    site = site_of(content) if content is not None else None
    return int(metrics.get("partition-id", -1)), site[0] if site else "", int(msg.metadata.src_node_id)


class AdaptorStrategy:
    """Mixin placed before a Flower strategy: refuses replies that break the wire format, aggregates in a fixed
    order (so a resumed run reproduces an uninterrupted one), and exposes server optimiser state for resume.

    Parameters
    ----------
    spec : dict[str, ArraySpec]
        Names, shapes and dtypes of the adaptor arrays a hospital may send.
    """

    def __init__(self, *args, spec: dict[str, ArraySpec], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.spec = spec
        self.refused: list[tuple[int, str]] = []

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        accepted = []
        for msg in sorted(replies, key=reply_order):
            if not msg.has_error():
                try:
                    check_reply(msg.content, self.spec)
                except WireError as exc:
                    log.warning("round %d: refused reply of node %d: %s", server_round, msg.metadata.src_node_id, exc)
                    self.refused.append((msg.metadata.src_node_id, str(exc)))
                    continue
            accepted.append(msg)
        return self.aggregate_checked(server_round, accepted)

    def aggregate_checked(self, server_round: int, replies: Iterable[Message]
                          ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The parent strategy's aggregation of replies already checked (e.g. the server's own unmasked secure
        sum, which is no hospital's reply)."""
        return super().aggregate_train(server_round, replies)  # type: ignore[misc]

    def optimizer_state(self) -> dict[str, np.ndarray]:
        """Server-side optimiser state to persist with the global adaptors (none for plain averaging)."""
        return {}

    def load_optimizer_state(self, state: dict[str, np.ndarray]) -> None:
        """Restore what :meth:`optimizer_state` returned."""
