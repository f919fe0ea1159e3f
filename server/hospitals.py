"""Who the hospitals of a run are: their names, and the one backbone their adaptors must have been trained on.

Every hospital reply carries a ``site`` record (:mod:`shared.wire`): the name its node config gives it and the
identity of its frozen backbone (weights hash + preprocessing). Adaptors trained on different backbones do not
average into anything meaningful, so the server admits a reply only when its identity is the run's: the run config's
``backbone-identity`` when set, else the identity most hospitals report in the first round with replies (a tie
stops the run: it cannot tell which side is right). The identity is persisted with the run and written into the
checkpoint; refused hospitals are named in the round's record.
"""

from __future__ import annotations

import logging
from collections import Counter

from flwr.app import Message

from shared.errors import RetuneError
from shared.wire import site_of

log = logging.getLogger(__name__)


class FederationError(RetuneError):
    """The run cannot go on (too few hospitals, disagreeing backbones): the ServerApp stops with this error."""


class Hospitals:
    """Names by node id, learnt from replies, and the run's backbone identity (None until the first replies)."""

    def __init__(self, identity: str | None = None, names: dict[int, str] | None = None) -> None:
        self.identity = identity or None
        self.names: dict[int, str] = dict(names or {})

    def name(self, msg: Message) -> str:
        """The replying hospital's own name (learnt from its ``site`` record); see :meth:`name_of`."""
        site = None if msg.has_error() else site_of(msg.content)
        if site is not None:
            self.names[msg.metadata.src_node_id] = site[0]
        return self.name_of(msg.metadata.src_node_id)

    def name_of(self, node: int) -> str:
        """A hospital's name; ``node-<id>`` for one that never sent a valid reply (e.g. refused every run)."""
        name = self.names.get(node, f"node-{node}")
        duplicates = [n for n, other in self.names.items() if other == name and n != node]
        return f"{name} (node {node})" if duplicates else name

    def admit(self, replies: list[Message]) -> tuple[list[Message], list[dict[str, str]]]:
        """Split successful replies into those on the run's backbone and refusals ``{hospital, reason}``.

        Raises :class:`FederationError` when no identity is set yet and the first replies tie between backbones.
        """
        sites = {id(r): site_of(r.content) for r in replies}
        if self.identity is None:
            counts = Counter(s[1] for s in sites.values() if s is not None)
            if counts:
                ranked = counts.most_common()
                if len(ranked) > 1 and ranked[0][1] == ranked[1][1]:
                    on: dict[str, list[str]] = {}
                    for reply in replies:
                        if sites[id(reply)] is not None:
                            on.setdefault(sites[id(reply)][1], []).append(self.name(reply))
                    groups = "; ".join(f"{', '.join(sorted(names))} on {ident[:12]}…" for ident, names in on.items())
                    raise FederationError(f"the hospitals disagree on the backbone ({groups}): give every hospital "
                                          "the same backbone, or pin run config backbone-identity")
                self.identity = ranked[0][0]
                log.info("the run's backbone identity is %s (reported by %d of %d hospitals)", self.identity[:16],
                         ranked[0][1], len(replies))
        admitted, refused = [], []
        for reply in replies:
            site = sites[id(reply)]
            if site is None:
                refused.append({"hospital": self.name(reply), "reason": "the reply carries no valid site record"})
            elif site[1] != self.identity:
                refused.append({"hospital": self.name(reply),
                                "reason": f"backbone {site[1][:12]}… differs from the run's {self.identity[:12]}…"})
            else:
                admitted.append(reply)
        for entry in refused:
            log.warning("refused the reply of %s: %s", entry["hospital"], entry["reason"])
        return admitted, refused
