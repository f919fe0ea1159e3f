"""The server's side of secure aggregation: one round of the protocol through ``grid.send_and_receive``.

Protocol, design choice (our Message-API stages on ``cryptography``, Flower's Shamir sharing reused, Flower's
``SecAggPlusWorkflow`` not used) and the quantisation bound: :mod:`shared.secagg`. :func:`secure_round` runs the five
stages and returns the example-weighted average of the survivors' adaptors; the server only ever holds masked
vectors, relayed ciphertexts, public keys, commitments, the survivors' signatures of the survivor set and the shares
it needs to remove masks from the *sum*.

Key announcements are signed by each hospital's roster identity and relayed with their signatures; the hospitals,
not the server, check them. A round needs at least :data:`shared.secagg.MIN_PARTICIPANTS` hospitals.

Drop-outs: a hospital that fails or times out at setup or key sharing is left out of the round; one that shared
keys but sends no masked vector (``dropped``) has its pairwise masks removed with its reconstructed ``sk1``; one
that sent its vector but does not answer the unmask request has its self mask removed with the others' shares. The
round needs ``t`` (a strict majority of the hospitals that shared keys) survivors and ``t`` shares per secret;
otherwise it yields no aggregate (the global adaptors stay as they were) and says why.

Strategies: :func:`secure_train` hands the secure average to the strategy as one reply weighted by the total number
of examples, so FedAvg and FedProx (whose proximal term is client-side) keep it, and FedAdam takes its server step
from it. Each stage waits at most ``timeout`` seconds, so a round can take up to five timeouts.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from server.messaging import exchange
from server.strategy.adaptor_strategy import AdaptorStrategy, reply_order
from shared.secagg import (CLIPPED, MIN_PARTICIPANTS, PROTOCOL, SESSION_BYTES, Layout, SecAggError, combine_secret,
                           commitment, decode_sum, public_key, remove_masks, threshold_for)
from shared.wire import (ARRAYS, CONFIG, MASKED, METRICS, NUM_EXAMPLES, SECAGG, SECAGG_CONSISTENCY, SECAGG_MASKED,
                         SECAGG_SETUP, SECAGG_SHARE_KEYS, SECAGG_UNMASK, ArraySpec, WireError, check_secure_reply,
                         payload_bytes)

log = logging.getLogger(__name__)
#: Splits masked-vector replies into admitted ones and refusals ``{hospital, reason}`` (e.g. another backbone).
Admit = Callable[[list[Message]], tuple[list[Message], list[dict[str, str]]]]


@dataclass
class SecureRound:
    """What one secure round produced.

    ``arrays``: weighted average of the survivors' adaptors (None: the round failed, see ``failure``);
    ``num_examples``: their total; ``metrics``: ``num-examples``, weighted mean ``train-loss``, ``clipped``
    coordinates; ``accepted``: the masked-vector replies in the sum (by :func:`reply_order`); ``declined``: an error
    reply per hospital that failed, timed out or was refused at some stage; ``dropped``: node ids that shared keys but
    whose vector is not in the sum; ``bytes_up``: per node, the bytes it sent (key material and masked vector);
    ``masked_bytes``: per node, the bytes of its masked vector; ``bytes_down``: bytes the server sent (key material
    and, at the masked stage, the global adaptors); ``agreed``: the survivors once any of them signed the survivor
    set (those hospitals' updates may from then on only be summed with exactly these: a retry of the round must ask
    exactly them, see :mod:`client.secagg_record`).
    """

    arrays: ArrayRecord | None = None
    num_examples: int = 0
    metrics: MetricRecord | None = None
    accepted: list[Message] = field(default_factory=list)
    declined: list[Message] = field(default_factory=list)
    dropped: list[int] = field(default_factory=list)
    bytes_up: dict[int, int] = field(default_factory=dict)
    masked_bytes: dict[int, int] = field(default_factory=dict)
    bytes_down: int = 0
    refused: list[dict[str, str]] = field(default_factory=list)
    names: dict[int, str] = field(default_factory=dict)
    failure: str | None = None
    agreed: list[int] = field(default_factory=list)


def content_bytes(content: RecordDict) -> int:
    """Array payload and key-material bytes of a message (metrics are not counted, as in plain rounds)."""
    total = 0
    for record in content.values():
        if isinstance(record, ArrayRecord):
            total += payload_bytes(record)
        elif isinstance(record, ConfigRecord) and len(record):
            total += record.count_bytes()
    return total


class _Round:
    def __init__(self, grid: Grid, train_content: RecordDict, server_round: int, timeout: float | None,
                 admit: Admit | None) -> None:
        self.grid, self.train_content, self.server_round, self.timeout = grid, train_content, server_round, timeout
        self.admit = admit
        arrays = train_content[ARRAYS]
        self.spec = {name: ArraySpec(tuple(a.shape), a.dtype) for name, a in arrays.items()}
        self.layout = Layout.of({name: s.shape for name, s in self.spec.items()})
        self.session = os.urandom(SESSION_BYTES)
        self.out = SecureRound()
        self.sent: dict[int, Message] = {}

    def send(self, stage: str, contents: dict[int, RecordDict]) -> dict[int, Message]:
        """One stage: send, wait, and keep the replies that pass the allow-list; the rest are declined."""
        sent = {node: Message(content, dst_node_id=node, message_type=f"train.{stage}",
                              group_id=str(self.server_round)) for node, content in contents.items()}
        self.sent = sent
        self.out.bytes_down += sum(content_bytes(c) for c in contents.values())
        got: dict[int, Message] = {}
        for node, reply in exchange(self.grid, list(sent.values()), self.timeout).items():
            if reply.has_error():
                self.decline(node, reply.error.code, reply.error.reason)
                got[node] = reply
                continue
            self.out.bytes_up[node] = self.out.bytes_up.get(node, 0) + content_bytes(reply.content)
            try:
                check_secure_reply(reply.content, stage, self.spec)
            except WireError as exc:
                log.warning("round %d: refused the %s reply of node %d: %s", self.server_round, stage, node, exc)
                self.decline(node, ErrorCode.UNKNOWN, f"reply refused by the server at {stage}: {exc}")
            got[node] = reply
        for node in sent:
            if node not in got:
                self.decline(node, ErrorCode.REPLY_MESSAGE_UNAVAILABLE, f"no reply at {stage} within the timeout")
        declined = {m.metadata.src_node_id for m in self.out.declined}
        return {node: r for node, r in got.items() if node not in declined}

    def decline(self, node: int, code: int, reason: str) -> None:
        """Record an error reply for ``node`` (to the message of the current stage), as if it had sent one."""
        self.out.declined.append(Message(Error(code, reason), reply_to=self.sent[node]))

    def fail(self, reason: str) -> SecureRound:
        log.warning("round %d: secure aggregation yields no aggregate: %s", self.server_round, reason)
        self.out.failure = reason
        self.out.arrays, self.out.accepted = None, []
        return self.out

    def config(self, **values) -> RecordDict:
        return RecordDict({SECAGG: ConfigRecord({"session": self.session, **values})})

    def run(self, node_ids: Iterable[int]) -> SecureRound:
        nodes = sorted(set(node_ids))
        if len(nodes) < MIN_PARTICIPANTS:
            return self.fail(f"{len(nodes)} hospital(s) sampled; secure aggregation needs at least {MIN_PARTICIPANTS}")
        index = {node: k + 1 for k, node in enumerate(nodes)}

        # 1. setup: public keys, each announcement signed with the hospital's roster identity
        position = self.train_content[CONFIG]
        replies = self.send(SECAGG_SETUP, {n: self.config(protocol=PROTOCOL, index=index[n], stage=position["stage"],
                                                          round=position["round"]) for n in nodes})
        announced = {n: r.content[SECAGG] for n, r in replies.items()}
        self.out.names = {n: str(a["name"]) for n, a in announced.items()}  # for the report; the peers verify them
        joined = sorted(announced)
        if len(joined) < MIN_PARTICIPANTS:
            return self.fail(f"{len(joined)} hospital(s) sent keys; at least {MIN_PARTICIPANTS} are needed")
        keys = {n: (announced[n]["pk1"], announced[n]["pk2"]) for n in joined}
        threshold = threshold_for(len(joined))

        # 2. share keys: broadcast the signed announcements, collect the encrypted shares
        broadcast = self.config(indices=[index[n] for n in joined], pk1=[keys[n][0] for n in joined],
                                pk2=[keys[n][1] for n in joined], names=[announced[n]["name"] for n in joined],
                                signatures=[announced[n]["signature"] for n in joined], threshold=threshold)
        replies = self.send(SECAGG_SHARE_KEYS, {n: broadcast for n in joined})
        ciphertexts: dict[tuple[int, int], bytes] = {}
        commitments: dict[int, bytes] = {}
        for node, reply in replies.items():
            fields = reply.content[SECAGG]
            peers = {index[n] for n in joined if n != node}
            if len(fields["destinations"]) != len(peers) or set(fields["destinations"]) != peers:
                self.decline(node, ErrorCode.UNKNOWN, "key shares not addressed to exactly the other hospitals")
                continue
            node_of = {index[n]: n for n in joined}
            for dst, ciphertext in zip(fields["destinations"], fields["ciphertexts"]):
                ciphertexts[(node, node_of[dst])] = ciphertext
            commitments[node] = fields["commitment"]
        shared = sorted(commitments)
        if len(shared) < threshold:
            return self.fail(f"{len(shared)} hospital(s) shared keys, fewer than the threshold {threshold}")

        # 3. masked vectors: relay each hospital's shares with the train message
        contents = {}
        for node in shared:
            sources = [n for n in shared if n != node]
            content = RecordDict(dict(self.train_content.items()))
            content[SECAGG] = ConfigRecord({"session": self.session, "sources": [index[n] for n in sources],
                                            "ciphertexts": [ciphertexts[(n, node)] for n in sources]})
            contents[node] = content
        replies = self.send(SECAGG_MASKED, contents)
        if self.admit is not None:  # a refused hospital's vector stays out of the sum: it counts as dropped
            admitted, self.out.refused = self.admit([replies[n] for n in sorted(replies)])
            replies = {r.metadata.src_node_id: r for r in admitted}
        survivors = sorted(replies)
        self.out.dropped = [n for n in shared if n not in replies]
        if len(survivors) < threshold:
            return self.fail(f"{len(survivors)} masked vector(s), fewer than the threshold {threshold}")
        total = np.zeros(self.layout.size, dtype=np.uint64)
        for node in survivors:
            record = replies[node].content[MASKED]
            total += self.layout.join({name: array.numpy() for name, array in record.items()})
            self.out.masked_bytes[node] = payload_bytes(record)
        accepted = [replies[n] for n in survivors]

        # 4. consistency: every survivor signs the survivor set it is shown (the same for all)
        view = {"survivors": [index[n] for n in survivors]}
        if self.out.dropped:
            view["dropped"] = [index[n] for n in self.out.dropped]
        signed = self.send(SECAGG_CONSISTENCY, {n: self.config(**view) for n in survivors})
        signers = sorted(signed)
        if signers:
            self.out.agreed = survivors
        if len(signers) < threshold:
            return self.fail(f"{len(signers)} hospital(s) signed the survivor set, fewer than the threshold "
                             f"{threshold}")

        # 5. unmask: seed shares of the survivors, key shares of the dropped, once the signatures are shown
        request = {**view, "signers": [index[n] for n in signers],
                   "signatures": [signed[n].content[SECAGG]["signature"] for n in signers]}
        replies = self.send(SECAGG_UNMASK, {n: self.config(**request) for n in signers})
        seed_shares: dict[int, list[bytes]] = {n: [] for n in survivors}
        key_shares: dict[int, list[bytes]] = {n: [] for n in self.out.dropped}
        for node, reply in replies.items():
            fields = reply.content[SECAGG]
            seeds, secret_keys = fields["seed-shares"], fields.get("key-shares", [])
            if len(seeds) != len(survivors) or len(secret_keys) != len(self.out.dropped):
                self.decline(node, ErrorCode.UNKNOWN, "unmask shares do not match the request")
                continue
            for n, share in zip(survivors, seeds):
                seed_shares[n].append(share)
            for n, share in zip(self.out.dropped, secret_keys):
                key_shares[n].append(share)
        try:
            seeds_of = {}
            for n in survivors:
                seed = combine_secret(seed_shares[n], threshold)
                if commitment(self.session, index[n], seed) != commitments[n]:
                    raise SecAggError(f"the shares of node {n} do not reconstruct the seed it committed to")
                seeds_of[index[n]] = seed
            keys_of = {}
            for n in self.out.dropped:
                secret = combine_secret(key_shares[n], threshold)
                if public_key(secret) != keys[n][0]:
                    raise SecAggError(f"the shares of dropped node {n} do not reconstruct its key")
                keys_of[index[n]] = secret
            total = remove_masks(total, self.session, seeds_of, keys_of, {index[n]: keys[n][0] for n in survivors})
            decoded = decode_sum(self.layout, total)
        except SecAggError as exc:
            return self.fail(str(exc))

        self.out.arrays = ArrayRecord({name: Array(decoded.averages[name].astype(np.float32))
                                       for name in self.spec})
        self.out.num_examples = decoded.num_examples
        self.out.metrics = MetricRecord({NUM_EXAMPLES: decoded.num_examples, "train-loss": decoded.train_loss,
                                         CLIPPED: decoded.clipped})
        self.out.accepted = sorted(accepted, key=reply_order)
        in_sum = set(survivors)  # a survivor that failed only at unmask still has its update in the aggregate
        self.out.declined = [m for m in self.out.declined if m.metadata.src_node_id not in in_sum]
        if decoded.clipped:
            log.warning("round %d: %d coordinate(s) were clipped to ±CLIP before aggregation", self.server_round,
                        decoded.clipped)
        return self.out


def secure_round(grid: Grid, node_ids: Iterable[int], train_content: RecordDict, server_round: int,
                 timeout: float | None, admit: Admit | None = None) -> SecureRound:
    """Run one secure-aggregation round with ``node_ids``.

    ``train_content``: what a plain train message would carry (``arrays`` = global adaptors, ``config``); it goes
    to every hospital at the masked-vector stage. Each of the five stages waits at most ``timeout`` seconds.
    ``admit`` decides which masked-vector replies enter the sum (by their ``site`` record).
    """
    return _Round(grid, train_content, server_round, timeout, admit).run(node_ids)


def secure_train(grid: Grid, strategy: AdaptorStrategy, server_round: int, train_msgs: list[Message],
                 timeout: float | None, admit: Admit | None = None
                 ) -> tuple[ArrayRecord | None, MetricRecord | None, SecureRound]:
    """The train part of a round in secure mode: ``train_msgs`` from ``strategy.configure_train`` name the hospitals
    and what they train on; the secure average enters ``strategy.aggregate_checked`` as one reply weighted by the total
    number of examples (FedAvg/FedProx keep it, FedAdam takes its server step from it)."""
    if not train_msgs:
        return None, None, SecureRound(failure="no hospitals sampled")
    outcome = secure_round(grid, [m.metadata.dst_node_id for m in train_msgs], train_msgs[0].content,
                           server_round, timeout, admit)
    if outcome.arrays is None:
        return None, None, outcome
    total = RecordDict({ARRAYS: outcome.arrays, METRICS: MetricRecord(
        {NUM_EXAMPLES: outcome.num_examples, "train-loss": float(outcome.metrics["train-loss"])})})
    arrays, metrics = strategy.aggregate_checked(server_round, [Message(total, reply_to=train_msgs[0])])
    return arrays, metrics, outcome
