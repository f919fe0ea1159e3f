"""What every RE-tune strategy adds to its Flower parent: the wire-format check, containment of what one hospital
can do to the aggregate, consistent metrics, float32 results and a deterministic order.

**Containment** (:class:`UpdateLimits`), before any aggregation, of each train reply:

- it must pass the wire format (names and shapes of the global adaptors, in the run's wire dtype); it is then
  decoded to float32;
- every value must be finite (one NaN would make the whole average NaN);
- its update ``w_i − w_global`` must be at most ``max_update_norm`` × ‖w_global‖ (an update ×100 is refused);
- its claimed ``num-examples`` must be a positive integer, and counts at most ``max_weight_ratio`` × the round's
  median claim (a claim of 1e9 cannot make one hospital the aggregate).

Refused replies are named with the reason (:attr:`AdaptorStrategy.refused`), never aggregated, never fatal. The
replies that pass reach Flower's aggregation with metrics of the same keys (``num-examples``, capped), so hospitals
with and without DP federate together; the mean train loss is taken over the hospitals that report one. Whatever
the parent computes (FedAdam's float64 included) comes out in the adaptors' own dtype (float32).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from shared.config import FederationConfig
from shared.wire import ARRAYS, METRICS, NUM_EXAMPLES, ArraySpec, WireError, check_reply, decoded, site_of, wire_spec

log = logging.getLogger(__name__)


def reply_order(msg: Message) -> tuple[int, str, int]:
    """Sort key of a reply: simulated partition id when present, then the hospital's name, then the node id."""
    content = msg.content if not msg.has_error() else None
    metrics = content[METRICS] if content is not None and METRICS in content else {}
    site = site_of(content) if content is not None else None
    return int(metrics.get("partition-id", -1)), site[0] if site else "", int(msg.metadata.src_node_id)


@dataclass(frozen=True)
class UpdateLimits:
    """How far one hospital's reply may move the aggregate (see the module docstring); 0 switches a bound off."""

    max_update_norm: float
    max_weight_ratio: float

    @classmethod
    def of(cls, config: FederationConfig) -> UpdateLimits:
        """The limits a run config sets (``max-update-norm``, ``max-weight-ratio``)."""
        return cls(config.max_update_norm, config.max_weight_ratio)


def _flat(values: dict[str, np.ndarray], names: Iterable[str]) -> np.ndarray:
    """The arrays ``names`` of ``values`` as one float64 vector."""
    return np.concatenate([values[name].ravel() for name in names]).astype(np.float64)


def _values(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    """Each array of ``arrays`` as numpy (read off its bytes once)."""
    return {name: array.numpy() for name, array in arrays.items()}


def update_problem(arrays: ArrayRecord, current: ArrayRecord | None, limits: UpdateLimits,
                   base: np.ndarray | None = None) -> str | None:
    """Why these adaptors may not be aggregated against the ``current`` global ones (None: they may). ``base``:
    ``current`` as :func:`_flat` gives it, when the caller has it already."""
    values = _values(arrays)
    bad = sorted(name for name, v in values.items() if not np.isfinite(v).all())
    if bad:
        return f"non-finite values in {bad[0]}" + (f" and {len(bad) - 1} more arrays" if len(bad) > 1 else "")
    if current is None or not limits.max_update_norm:
        return None
    base = _flat(_values(current), current.keys()) if base is None else base
    global_norm = float(np.linalg.norm(base))
    step = float(np.linalg.norm(_flat(values, current.keys()) - base))
    if step > limits.max_update_norm * max(global_norm, 1.0):
        return (f"update norm {step:.3g} exceeds {limits.max_update_norm:g} × the global adaptors' norm "
                f"{global_norm:.3g}")
    return None


def _examples(metrics: MetricRecord) -> int | None:
    value = metrics.get(NUM_EXAMPLES)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value <= 0:
        return None
    return int(value)


class AdaptorStrategy:
    """Mixin placed before a Flower strategy: refuses replies that break the wire format or the
    :class:`UpdateLimits`, aggregates in a fixed order (so a resumed run reproduces an uninterrupted one), casts the
    result to the adaptors' dtypes, and exposes server optimiser state for resume.

    Parameters
    ----------
    spec : dict[str, ArraySpec]
        Names, shapes and dtypes of the adaptor arrays (the global ones, and what aggregation returns).
    limits : UpdateLimits
        Containment of one hospital's reply.
    wire_dtype : str
        The dtype replies carry the arrays in; they are decoded to float32 before anything else looks at them.
    """

    def __init__(self, *args, spec: dict[str, ArraySpec], limits: UpdateLimits, wire_dtype: str = "float32",
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.spec = spec
        self.limits = limits
        self.wire_dtype = wire_dtype
        self.refused: list[tuple[int, str]] = []
        self.current: ArrayRecord | None = None
        self._base: np.ndarray | None = None

    def configure_train(self, server_round: int, arrays: ArrayRecord, config, grid):  # type: ignore[no-untyped-def]
        self.current = arrays  # what updates are measured against
        self._base = _flat(_values(arrays), arrays.keys())
        return super().configure_train(server_round, arrays, config, grid)  # type: ignore[misc]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        screened: list[tuple[Message, ArrayRecord, int]] = []  # reply, its decoded arrays, its example count
        for msg in sorted(replies, key=reply_order):
            if msg.has_error():
                continue
            try:
                check_reply(msg.content, wire_spec(self.spec, self.wire_dtype))
                arrays = decoded(msg.content[ARRAYS])
                examples = _examples(msg.content[METRICS])
                problem = "num-examples must be a positive whole number" if examples is None else \
                    update_problem(arrays, self.current, self.limits, self._base)
            except WireError as exc:
                problem, examples = str(exc), None
            if problem is not None:
                log.warning("round %d: refused the reply of node %d: %s", server_round, msg.metadata.src_node_id,
                            problem)
                self.refused.append((msg.metadata.src_node_id, problem))
                continue
            screened.append((msg, arrays, int(examples)))
        if not screened:
            return None, None
        cap = self.limits.max_weight_ratio * float(np.median([n for *_, n in screened])) \
            if self.limits.max_weight_ratio else math.inf
        weights = [max(1, int(min(n, cap))) for *_, n in screened]
        # decoded, fresh records: some parents (FedMedian, Bulyan) pop the arrays out of what they aggregate
        uniform = [Message(RecordDict({ARRAYS: arrays, METRICS: MetricRecord({NUM_EXAMPLES: w})}),
                           reply_to=_request(msg)) for (msg, arrays, _), w in zip(screened, weights)]
        aggregate, _ = self.aggregate_checked(server_round, uniform)
        losses = [(float(msg.content[METRICS]["train-loss"]), w) for (msg, *_), w in zip(screened, weights)
                  if "train-loss" in msg.content[METRICS]]
        metrics = {NUM_EXAMPLES: sum(weights)}
        if losses:
            metrics["train-loss"] = sum(loss * w for loss, w in losses) / sum(w for _, w in losses)
        return aggregate, MetricRecord(metrics)

    def aggregate_checked(self, server_round: int, replies: Iterable[Message]
                          ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The parent strategy's aggregation of replies already checked (e.g. the server's own unmasked secure
        sum, which is no hospital's reply), cast to the adaptors' dtypes."""
        arrays, metrics = super().aggregate_train(server_round, replies)  # type: ignore[misc]
        return self._cast(arrays), metrics

    def _cast(self, arrays: ArrayRecord | None) -> ArrayRecord | None:
        if arrays is None:
            return None
        return ArrayRecord({name: Array(np.ascontiguousarray(array.numpy(), dtype=self.spec[name].dtype))
                            for name, array in arrays.items()})

    def optimizer_state(self) -> dict[str, np.ndarray]:
        """Server-side optimiser state to persist with the global adaptors (none for plain averaging)."""
        return {}

    def load_optimizer_state(self, state: dict[str, np.ndarray]) -> None:
        """Restore what :meth:`optimizer_state` returned."""


def _request(reply: Message) -> Message:
    """A stand-in for the message ``reply`` answers (Flower's aggregation reads only replies' content)."""
    return Message(RecordDict(), dst_node_id=reply.metadata.src_node_id, message_type=reply.metadata.message_type,
                   group_id=reply.metadata.group_id)
