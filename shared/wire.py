"""The wire format: everything that crosses the network between a hospital and the server is defined here.

Server → hospital (train):    ``arrays`` (global adaptors, ArrayRecord) + ``config`` (ConfigRecord)
Server → hospital (evaluate): ``arrays`` + ``config``
Hospital → server (train):    ``arrays`` (its adaptors: exactly the expected names, shapes, dtypes) + ``metrics``
Hospital → server (evaluate): ``metrics`` only

Replies carry adaptor arrays and scalar metrics, nothing else: no images, embeddings, labels or strings.
:func:`check_reply` enforces that allow-list on both sides of the boundary.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict

from shared.errors import RetuneError
from shared.model import RetuneModel

ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
NUM_EXAMPLES = "num-examples"


class WireError(RetuneError):
    """A message that does not match the wire format; it is refused, never sent or aggregated."""


@dataclass(frozen=True)
class ArraySpec:
    """Expected shape and dtype of one adaptor array."""

    shape: tuple[int, ...]
    dtype: str


def adaptor_spec(model: RetuneModel) -> dict[str, ArraySpec]:
    """The names, shapes and dtypes a hospital may send for this model."""
    return {name: ArraySpec(tuple(t.shape), str(t.numpy().dtype)) for name, t in model.state_dict().items()}


def to_record(model: RetuneModel) -> ArrayRecord:
    """The model's adaptor weights as an ArrayRecord (CPU, float32)."""
    return ArrayRecord({k: v.detach().cpu() for k, v in model.state_dict().items()})


def load_record(model: RetuneModel, record: ArrayRecord) -> RetuneModel:
    """Load adaptor weights from an ArrayRecord, refusing any mismatch."""
    check_arrays(record, adaptor_spec(model))
    model.load_state_dict({k: torch.from_numpy(np.array(a.numpy())) for k, a in record.items()})
    return model


def payload_bytes(record: ArrayRecord) -> int:
    """Bytes of the serialised adaptor arrays in a record (what a round moves per hospital and direction)."""
    return sum(len(array.data) for array in record.values())


def check_arrays(record: ArrayRecord, spec: dict[str, ArraySpec]) -> None:
    """Refuse arrays whose names, shapes or dtypes differ from ``spec``."""
    if set(record.keys()) != set(spec):
        extra, missing = sorted(set(record.keys()) - set(spec)), sorted(set(spec) - set(record.keys()))
        raise WireError(f"adaptor arrays do not match the model: unexpected {extra}, missing {missing}")
    for name, array in record.items():
        expected = spec[name]
        if tuple(array.shape) != expected.shape or array.dtype != expected.dtype:
            raise WireError(f"adaptor array {name!r} is {array.dtype}{tuple(array.shape)}, "
                            f"expected {expected.dtype}{expected.shape}")


def check_metrics(record: MetricRecord) -> None:
    """Metrics are finite int/float scalars only."""
    for key, value in record.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
            raise WireError(f"metric {key!r} is not a finite scalar: {type(value).__name__}")


def check_reply(content: RecordDict, spec: dict[str, ArraySpec] | None) -> None:
    """Allow-list of a hospital's reply: ``metrics`` always, ``arrays`` exactly when ``spec`` is given."""
    allowed = {METRICS} | ({ARRAYS} if spec is not None else set())
    if set(content.keys()) != allowed:
        raise WireError(f"reply records {sorted(content.keys())} are not the allowed {sorted(allowed)}")
    if not isinstance(content[METRICS], MetricRecord):
        raise WireError("'metrics' must be a MetricRecord")
    check_metrics(content[METRICS])
    if NUM_EXAMPLES not in content[METRICS]:
        raise WireError(f"metrics lack {NUM_EXAMPLES!r}")
    if spec is not None:
        if not isinstance(content[ARRAYS], ArrayRecord):
            raise WireError("'arrays' must be an ArrayRecord")
        check_arrays(content[ARRAYS], spec)
