"""The wire format: everything that crosses the network between a hospital and the server is defined here.

Server → hospital (train):    ``arrays`` (global adaptors, ArrayRecord) + ``config`` (ConfigRecord)
Server → hospital (evaluate): ``arrays`` + ``config``
Hospital → server (train):    ``arrays`` (its adaptors: exactly the expected names, shapes, dtypes) + ``metrics``
                              + ``site``
Hospital → server (evaluate): ``metrics`` + ``site``

Adaptor arrays cross in one wire dtype both ways (run config ``wire-dtype``: ``float16`` by default, half the bytes
of ``float32``); both ends decode them to float32 before computing (:func:`decoded`). A message's ``config`` names
its adaptors' digest (:data:`ARRAYS_DIGEST`); to a hospital that holds them (it answered the previous message,
whose adaptors were the same: round r's evaluate and round r+1's train) the message goes without ``arrays``, and the
hospital's guard puts back the ones it verified before (or answers :data:`ARRAYS_NOT_HELD` and gets them in full).
Secure aggregation's train messages carry float32 adaptors: its masked vectors are 64-bit whatever the wire dtype.

``site`` (ConfigRecord) holds exactly two strings of fixed form: ``name``, the hospital's name from its node config
(letters, digits, ``.``, ``_``, ``-``; at most 64), by which reports name it, and ``backbone``, the 64-hex identity
of its frozen backbone (weights hash + preprocessing), so the server never averages adaptors trained on different
backbones. Replies carry adaptor arrays, scalar metrics and that record, nothing else: no images, embeddings,
labels or free text. :func:`check_reply` enforces that allow-list on both sides of the boundary.

Secure aggregation (run config ``secure-aggregation = true``, protocol in :mod:`shared.secagg`) replaces the train
exchange by five train actions per round; their replies never carry the plain ``arrays`` or ``num-examples``:

Server → hospital ``train.secagg_setup``:       ``secagg`` (protocol, session, the hospital's index, stage, round)
Hospital → server:                              ``secagg`` (``pk1``, ``pk2``: two X25519 public keys, ``name``
                                                and ``signature``: the announcement signed with the hospital's
                                                roster identity, see :mod:`shared.identity`)
Server → hospital ``train.secagg_share_keys``:  ``secagg`` (everyone's public keys, names and signatures,
                                                threshold)
Hospital → server:                              ``secagg`` (``destinations``, ``ciphertexts``: encrypted shares
                                                for each peer, ``commitment``: hash of its self-mask seed)
Server → hospital ``train.secagg_masked``:      ``arrays`` + ``config`` (as ``train``) + ``secagg`` (relayed shares)
Hospital → server:                              ``masked`` (uint64 arrays: the adaptors' names and shapes plus
                                                ``num-examples``, ``train-loss``, ``clipped``, all masked)
Server → hospital ``train.secagg_consistency``: ``secagg`` (survivors, dropped)
Hospital → server:                              ``secagg`` (``signature``: the survivor set signed with the
                                                hospital's roster identity)
Server → hospital ``train.secagg_unmask``:      ``secagg`` (survivors, dropped, the signers and their signatures)
Hospital → server:                              ``secagg`` (``seed-shares`` of survivors, ``key-shares`` of dropped)

Secure replies carry ``metrics`` (always with the masked vector, else optional) with :data:`SECURE_METRICS` only
(the simulated identity) and ``site`` (required with the masked vector, else optional); key material has fixed
sizes. :func:`check_secure_reply`
is that allow-list; a reply with both ``masked`` and ``arrays`` is refused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from shared.config import WIRE_DTYPES
from shared.errors import RetuneError
from shared.identity import MAX_SIGNATURE_BYTES
from shared.model import RetuneModel
from shared.secagg import CIPHERTEXT_BYTES, COMMITMENT_BYTES, EXTRAS, KEY_BYTES, MAX_PARTICIPANTS, SHARE_BYTES

ARRAYS = "arrays"
#: ConfigRecord key of every message with global adaptors: their :func:`shared.signing.arrays_digest` (hex). A
#: message to a hospital that holds those adaptors goes without ``arrays`` (see :class:`server.messaging.HeldArrays`).
ARRAYS_DIGEST = "arrays-digest"
#: The error reason of a hospital asked to use global adaptors it does not hold (it then gets them in full).
ARRAYS_NOT_HELD = "global adaptors not held at the hospital: send them"
CONFIG = "config"
METRICS = "metrics"
NUM_EXAMPLES = "num-examples"
#: The replying hospital's name and backbone identity (ConfigRecord of two fixed-form strings).
SITE = "site"
SITE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
BACKBONE_IDENTITY = re.compile(r"[0-9a-f]{64}")
#: Secure aggregation: key material (ConfigRecord, both directions) and the masked update (ArrayRecord of uint64).
SECAGG = "secagg"
MASKED = "masked"
SECAGG_SETUP, SECAGG_SHARE_KEYS, SECAGG_MASKED, SECAGG_CONSISTENCY, SECAGG_UNMASK = (
    "secagg_setup", "secagg_share_keys", "secagg_masked", "secagg_consistency", "secagg_unmask")
SECURE_STAGES = (SECAGG_SETUP, SECAGG_SHARE_KEYS, SECAGG_MASKED, SECAGG_CONSISTENCY, SECAGG_UNMASK)
#: Plain metrics a secure reply may carry (a simulated hospital's partition); everything about the update is masked.
SECURE_METRICS = {stage: {"partition-id"} for stage in SECURE_STAGES}
#: Key-material fields of each secure reply: (kind, size of each bytes value, required).
_SECURE_FIELDS: dict[str, dict[str, tuple[str, int, bool]]] = {
    SECAGG_SETUP: {"pk1": ("bytes", KEY_BYTES, True), "pk2": ("bytes", KEY_BYTES, True),
                   "name": ("name", 0, True), "signature": ("bytes-upto", MAX_SIGNATURE_BYTES, True)},
    SECAGG_SHARE_KEYS: {"destinations": ("ints", 0, True), "ciphertexts": ("bytes-list", CIPHERTEXT_BYTES, True),
                        "commitment": ("bytes", COMMITMENT_BYTES, True)},
    SECAGG_CONSISTENCY: {"signature": ("bytes-upto", MAX_SIGNATURE_BYTES, True)},
    SECAGG_UNMASK: {"seed-shares": ("bytes-list", SHARE_BYTES, True),
                    "key-shares": ("bytes-list", SHARE_BYTES, False)},
}


class WireError(RetuneError):
    """A message that does not match the wire format; it is refused, never sent or aggregated."""


@dataclass(frozen=True)
class ArraySpec:
    """Expected shape and dtype of one adaptor array."""

    shape: tuple[int, ...]
    dtype: str


def adaptor_spec(model: RetuneModel) -> dict[str, ArraySpec]:
    """The names, shapes and dtypes a hospital may send for this model."""
    return {name: ArraySpec(tuple(t.shape), str(t.dtype).removeprefix("torch."))
            for name, t in model.state_dict().items()}


def wire_spec(spec: dict[str, ArraySpec], dtype: str) -> dict[str, ArraySpec]:
    """``spec`` as it crosses the wire in ``dtype`` (one of :data:`shared.config.WIRE_DTYPES`)."""
    return {name: ArraySpec(s.shape, dtype) for name, s in spec.items()}


def record_dtype(record: ArrayRecord) -> str:
    """The one wire dtype all arrays of ``record`` share; anything else is a :class:`WireError`."""
    dtypes = {array.dtype for array in record.values()}
    if len(dtypes) != 1 or next(iter(dtypes)) not in WIRE_DTYPES:
        raise WireError(f"adaptor arrays are {sorted(dtypes)}: they must all be one of {', '.join(WIRE_DTYPES)}")
    return next(iter(dtypes))


def encoded(record: ArrayRecord, dtype: str) -> ArrayRecord:
    """Adaptor arrays as they cross the wire: cast to ``dtype`` (round to nearest)."""
    return ArrayRecord({name: Array(np.ascontiguousarray(array.numpy(), dtype=dtype)) for name, array in record.items()})


def decoded(record: ArrayRecord) -> ArrayRecord:
    """Adaptor arrays off the wire, as float32: what training and aggregation compute with."""
    return encoded(record, "float32")


def to_record(model: RetuneModel, dtype: str = "float32") -> ArrayRecord:
    """The model's adaptor weights as an ArrayRecord (CPU), in ``dtype``."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v.detach().cpu().numpy(), dtype=dtype))
                        for k, v in model.state_dict().items()})


def load_record(model: RetuneModel, record: ArrayRecord) -> RetuneModel:
    """Load adaptor weights from an ArrayRecord in a wire dtype (decoded to float32), refusing any mismatch."""
    check_arrays(record, wire_spec(adaptor_spec(model), record_dtype(record)))
    model.load_state_dict({k: torch.from_numpy(a.numpy().astype(np.float32)) for k, a in record.items()},
                          assign=any(p.is_meta for p in model.parameters()))
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


def site_record(name: str, backbone: str) -> ConfigRecord:
    """The ``site`` record of a reply (checked as :func:`check_site` does)."""
    record = ConfigRecord({"name": name, "backbone": backbone})
    check_site(record)
    return record


def check_site(record: object) -> None:
    """``site`` holds exactly ``name`` (a hospital name) and ``backbone`` (a 64-hex identity)."""
    if not isinstance(record, ConfigRecord) or set(record.keys()) != {"name", "backbone"}:
        raise WireError(f"{SITE!r} must be a ConfigRecord of exactly 'name' and 'backbone'")
    name, backbone = record["name"], record["backbone"]
    if not isinstance(name, str) or not SITE_NAME.fullmatch(name):
        raise WireError("site 'name' must be 1-64 letters, digits, '.', '_' or '-'")
    if not isinstance(backbone, str) or not BACKBONE_IDENTITY.fullmatch(backbone):
        raise WireError("site 'backbone' must be a 64-digit lowercase hex identity")


def site_of(content: RecordDict) -> tuple[str, str] | None:
    """(name, backbone identity) of a reply that carries a valid ``site`` record, else None."""
    record = content.get(SITE)
    try:
        check_site(record)
    except WireError:
        return None
    return str(record["name"]), str(record["backbone"])  # type: ignore[index]


def check_reply(content: RecordDict, spec: dict[str, ArraySpec] | None) -> None:
    """Allow-list of a hospital's reply: ``metrics`` and ``site`` always, ``arrays`` exactly when ``spec`` is
    given."""
    allowed = {METRICS, SITE} | ({ARRAYS} if spec is not None else set())
    if set(content.keys()) != allowed:
        raise WireError(f"reply records {sorted(content.keys())} are not the allowed {sorted(allowed)}")
    check_site(content[SITE])
    if not isinstance(content[METRICS], MetricRecord):
        raise WireError("'metrics' must be a MetricRecord")
    check_metrics(content[METRICS])
    if NUM_EXAMPLES not in content[METRICS]:
        raise WireError(f"metrics lack {NUM_EXAMPLES!r}")
    if spec is not None:
        if not isinstance(content[ARRAYS], ArrayRecord):
            raise WireError("'arrays' must be an ArrayRecord")
        check_arrays(content[ARRAYS], spec)


def secure_stage(message_type: str) -> str | None:
    """The secure-aggregation stage a message type names (``train.secagg_*``), or None."""
    category, _, action = message_type.partition(".")
    return action if category == "train" and action in SECURE_STAGES else None


def masked_spec(spec: dict[str, ArraySpec]) -> dict[str, ArraySpec]:
    """What a masked update holds: every adaptor array's name and shape as uint64, and one uint64 per extra."""
    return {**{name: ArraySpec((1,), "uint64") for name in EXTRAS},
            **{name: ArraySpec(s.shape, "uint64") for name, s in spec.items()}}


def _check_secure_value(key: str, value: object, kind: str, size: int) -> int:
    if kind == "bytes":
        if not isinstance(value, bytes) or len(value) != size:
            raise WireError(f"secagg {key!r} must be {size} bytes")
        return 1
    if kind == "bytes-upto":
        if not isinstance(value, bytes) or not 1 <= len(value) <= size:
            raise WireError(f"secagg {key!r} must be 1 to {size} bytes")
        return 1
    if kind == "name":
        if not isinstance(value, str) or not SITE_NAME.fullmatch(value):
            raise WireError(f"secagg {key!r} must be a hospital name")
        return 1
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_PARTICIPANTS:
        raise WireError(f"secagg {key!r} must be a list of 1 to {MAX_PARTICIPANTS} values")
    if kind == "ints":
        if any(isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_PARTICIPANTS for v in value):
            raise WireError(f"secagg {key!r} must hold hospital indices")
    elif any(not isinstance(v, bytes) or len(v) != size for v in value):
        raise WireError(f"secagg {key!r} must hold values of {size} bytes")
    return len(value)


def check_secure_reply(content: RecordDict, stage: str, spec: dict[str, ArraySpec] | None) -> None:
    """Allow-list of a hospital's secure-aggregation reply at ``stage`` (see the module docstring): key material
    of fixed sizes, or the masked update (``spec``: the adaptors sent) with its metrics record; metrics from
    :data:`SECURE_METRICS` only; no plain ``arrays``, no plain ``num-examples``, nothing else."""
    if stage not in SECURE_STAGES:
        raise WireError(f"{stage!r} is not a secure-aggregation stage")
    required = {MASKED, METRICS, SITE} if stage == SECAGG_MASKED else {SECAGG}
    keys = set(content.keys())
    if not required <= keys or keys - required - {METRICS, SITE}:
        raise WireError(f"secure reply records {sorted(keys)} are not {sorted(required)} (+ {METRICS!r}, {SITE!r})")
    if SITE in keys:
        check_site(content[SITE])
    if METRICS in keys:
        metrics = content[METRICS]
        if not isinstance(metrics, MetricRecord):
            raise WireError("'metrics' must be a MetricRecord")
        check_metrics(metrics)
        extra = sorted(set(metrics.keys()) - SECURE_METRICS[stage])
        if extra:
            raise WireError(f"a secure reply may not carry the plain metrics {extra}")
    if stage == SECAGG_MASKED:
        if spec is None:
            raise WireError("a masked update needs the spec of the adaptors it masks")
        if not isinstance(content[MASKED], ArrayRecord):
            raise WireError("'masked' must be an ArrayRecord")
        check_arrays(content[MASKED], masked_spec(spec))
        return
    record, fields = content[SECAGG], _SECURE_FIELDS[stage]
    if not isinstance(record, ConfigRecord):
        raise WireError("'secagg' must be a ConfigRecord")
    unknown = sorted(set(record.keys()) - set(fields))
    missing = sorted(k for k, (_, _, needed) in fields.items() if needed and k not in record)
    if unknown or missing:
        raise WireError(f"secagg fields: unexpected {unknown}, missing {missing}")
    counts = {key: _check_secure_value(key, record[key], *fields[key][:2]) for key in record}
    if stage == SECAGG_SHARE_KEYS and counts["destinations"] != counts["ciphertexts"]:
        raise WireError("secagg 'destinations' and 'ciphertexts' differ in length")
