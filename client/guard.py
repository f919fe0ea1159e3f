"""The hospital boundary: Flower client mods that decide what may leave a hospital, and write it down.

- :func:`boundary_guard` checks every reply against the wire-format allow-list (:func:`shared.wire.check_reply`)
  and audits it; a non-conforming reply, or an exception in the app, is replaced by an error reply. An error reply
  leaves with its code and one of the fixed :data:`PUBLIC_REASONS` only (no path, no number, no message text); the
  detail goes to the hospital's audit log and logger. If the audit entry cannot be written, nothing leaves either:
  an error reply goes instead.
- :func:`floor_mod` refuses a run that asks for less than the hospital's privacy floor (:mod:`client.floor`),
  before anything else looks at the message.
- :func:`round_mod` refuses global adaptors the consortium did not sign for this run, stage, round and kind (a
  hospital without the consortium's public key refuses them all), and rounds that replay or reorder the run's
  progress; it keeps the last adaptors it let through, which the next message may name by digest instead of
  carrying them (the guard puts them back before anything else looks).
- :func:`hospital_mods` stacks them, configured from the node config.

Which app package a hospital serves at all is decided before any of this, by its runtime (:mod:`client.runtime`).

**Expected spec.** A train reply must hold exactly the arrays of the train message (same names, shapes, dtypes:
:func:`incoming_spec`; adaptors the message named by digest count as in it), so the guard needs no model or backbone
and a reply is never larger than the adaptors the hospital was given. Pass ``spec_fn`` to pin the spec to a model
instead (``lambda msg: wire_spec(adaptor_spec(model), "float16")``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common.constant import ErrorCode

from client.approval import running_code
from client.audit import AUDIT_LOG_KEY, ERROR, REFUSED, SENT, AuditLog, message_entry
from client.evaluation import EVALUATION_DECLINED
from client.floor import FLOOR_REFUSED, PrivacyFloor
from client.secagg_record import SummedBefore
from shared.config import FederationConfig, run_identity
from shared.errors import RetuneError
from shared.secagg import SecAggError
from shared.signing import ARRAYS_SIGNATURE, RoundBinding, arrays_digest, load_public_key, verify_round
from shared.wire import (ARRAYS, ARRAYS_DIGEST, ARRAYS_NOT_HELD, CONFIG, SECAGG_MASKED, ArraySpec, WireError,
                         check_reply, check_secure_reply, secure_stage)

log = logging.getLogger(__name__)
#: Node-config key of the consortium's public key (``flower-supernode --node-config 'consortium-key="..."'``).
CONSORTIUM_KEY = "consortium-key"
#: The only reasons an error reply may carry out of the hospital. The app may give one followed by ": detail";
#: the detail stays in the audit log.
DECLINED_BUDGET = "declined: this round would exceed the hospital's privacy budget"
#: A hospital labels none of the diseases a stage trains (and, with ``continual`` ``lwf`` or ``replay``, has no
#: old disease to keep).
NOTHING_TO_TRAIN = "declined: nothing labelled to train on at this stage"
REFUSED_REPLY = "reply refused at the hospital boundary (not the wire format)"
UNSIGNED = "global adaptors refused: not signed by the consortium key this hospital trusts for this round"
ROUND_REFUSED = "round refused: not a later round of this run (replayed or reordered)"
SECAGG_ABORTED = "secure aggregation aborted at this hospital: the round broke the protocol"
#: A secure round that would sum an update of this hospital with other hospitals than it agreed to before.
SUMMED_BEFORE = ("secure aggregation refused: this hospital's update was summed with another set of hospitals before "
                 "(a new study with other hospitals starts from other adaptors: another seed)")
APP_FAILED = "the hospital's app failed on this message; the details stay at the hospital"
AUDIT_UNAVAILABLE = "the hospital's audit log is unavailable"
PUBLIC_REASONS = (DECLINED_BUDGET, NOTHING_TO_TRAIN, REFUSED_REPLY, UNSIGNED, ROUND_REFUSED, SECAGG_ABORTED, APP_FAILED,
                  AUDIT_UNAVAILABLE, ARRAYS_NOT_HELD, FLOOR_REFUSED, EVALUATION_DECLINED, SUMMED_BEFORE)
#: Where a hospital keeps the last global adaptors it verified (``context.state``), which a later message of the run
#: may name by digest instead of carrying them again (:data:`shared.wire.ARRAYS_DIGEST`).
HELD_KEY = "retune-held-adaptors"


def public_reason(reason: str) -> str:
    """The fixed reason an error reply may leave with: ``reason`` itself or the public part before its ": detail"
    when it is one of :data:`PUBLIC_REASONS`, else :data:`APP_FAILED`."""
    return next((r for r in PUBLIC_REASONS if reason == r or reason.startswith(f"{r}: ")), APP_FAILED)

SpecFn = Callable[[Message], dict[str, ArraySpec] | None]


def incoming_spec(msg: Message) -> dict[str, ArraySpec] | None:
    """Train: the names/shapes/dtypes of the global adaptors received; evaluate: None (metrics only)."""
    category = msg.metadata.message_type.split(".")[0]
    if category == MessageType.EVALUATE:
        return None
    if category != MessageType.TRAIN:
        raise WireError(f"message type {msg.metadata.message_type!r} is not part of the wire format")
    if secure_stage(msg.metadata.message_type) not in (None, SECAGG_MASKED):
        return None  # secure-aggregation key exchange: no adaptors; check_secure_reply holds its fixed fields
    record = msg.content.get(ARRAYS) if msg.has_content() else None
    if not isinstance(record, ArrayRecord) or not len(record):
        raise WireError("a train message without global adaptors: there is no reply the hospital may send")
    return {name: ArraySpec(tuple(array.shape), array.dtype) for name, array in record.items()}


def restore_held(msg: Message, context: Context) -> str | None:
    """Give a message that names global adaptors by digest instead of carrying them the ones this hospital holds;
    why it cannot (None: nothing to restore, or restored). Whatever is restored is verified as if it had come with
    the message (:func:`round_mod`)."""
    if not msg.has_content() or ARRAYS in msg.content \
            or secure_stage(msg.metadata.message_type) not in (None, SECAGG_MASKED):
        return None
    config = msg.content.get(CONFIG)
    if not isinstance(config, ConfigRecord) or ARRAYS_DIGEST not in config:
        return None
    held = context.state.get(HELD_KEY)
    if isinstance(held, ArrayRecord) and arrays_digest(held).hex() == config[ARRAYS_DIGEST]:
        msg.content[ARRAYS] = held
        return None
    return f"the message names global adaptors {str(config[ARRAYS_DIGEST])[:12]}… that this hospital does not hold"


def _audit_log(audit_path: Path | str | None, context: Context) -> AuditLog | None:
    path = audit_path or context.node_config.get(AUDIT_LOG_KEY)
    return AuditLog(str(path)) if path else None


def _error(msg: Message, code: int, reason: str) -> Message:
    return Message(Error(code, reason), reply_to=msg)


def _check(msg: Message, reply: Message, spec: dict[str, ArraySpec] | None) -> str | None:
    """Why ``reply`` may not leave, or None."""
    if reply.metadata.reply_to_message_id != msg.metadata.message_id \
            or reply.metadata.message_type != msg.metadata.message_type:
        return "the reply does not answer the incoming message"
    stage = secure_stage(msg.metadata.message_type)
    try:
        if stage is not None:
            check_secure_reply(reply.content, stage, spec)
        else:
            check_reply(reply.content, spec)
    except WireError as exc:
        return str(exc)
    return None


def boundary_guard(spec_fn: SpecFn | None = None, audit_path: Path | str | None = None) -> Mod:
    """A client mod that lets only wire-format replies leave and audits every reply.

    ``spec_fn(msg)`` gives the arrays a train reply must hold (default :func:`incoming_spec`). ``audit_path``:
    the hash-chained audit log (default: the node config's ``audit-log``; neither means no audit log, the
    allow-list is enforced all the same).
    """
    spec_fn = spec_fn or incoming_spec

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        audit = _audit_log(audit_path, context)

        def record(event: str, reply: Message, content_of: Message | None = None, **extra: object) -> Message:
            if audit is None:
                return reply
            content = content_of.content if content_of is not None and content_of.has_content() else None
            try:
                audit.append(message_entry(event, msg, content, code_hash=running_code().code_hash, **extra))
            except (RetuneError, OSError) as exc:  # fail closed: nothing leaves unaudited
                log.error("audit log %s: %s; refusing the reply", audit.path, exc)
                return _error(msg, ErrorCode.MOD_FAILED_PRECONDITION, AUDIT_UNAVAILABLE)
            return reply

        def refuse(detail: str, content_of: Message | None = None) -> Message:
            log.warning("refused a %s reply: %s", msg.metadata.message_type, detail)
            return record(REFUSED, _error(msg, ErrorCode.MOD_FAILED_PRECONDITION, REFUSED_REPLY), content_of,
                          reason=detail)

        missing = restore_held(msg, context)
        if missing is not None:
            log.warning("asked the server for the adaptors of a %s message: %s", msg.metadata.message_type, missing)
            return record(ERROR, _error(msg, ErrorCode.MOD_FAILED_PRECONDITION, ARRAYS_NOT_HELD),
                          error_code=ErrorCode.MOD_FAILED_PRECONDITION, reason=missing)
        try:
            spec = spec_fn(msg)
        except WireError as exc:
            return refuse(str(exc))
        try:
            reply = call_next(msg, context)
        except Exception as exc:  # noqa: BLE001  the server learns a fixed reason, never the message
            log.exception("the ClientApp failed on a %s message", msg.metadata.message_type)
            public = SUMMED_BEFORE if isinstance(exc, SummedBefore) else \
                SECAGG_ABORTED if isinstance(exc, SecAggError) else APP_FAILED
            return record(ERROR, _error(msg, ErrorCode.CLIENT_APP_RAISED_EXCEPTION, public),
                          error_code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(exc).__name__}: {exc}")
        if reply.has_error():
            detail = reply.error.reason or ""
            return record(ERROR, _error(msg, reply.error.code, public_reason(detail)), error_code=reply.error.code,
                          reason=detail)
        problem = _check(msg, reply, spec)
        if problem is not None:
            return refuse(problem, reply)
        return record(SENT, reply, reply)

    return mod


#: The run's settings as this hospital reads them from the run config (its identity:
#: :func:`shared.config.run_identity` of them).
ConfigOf = Callable[[Context], FederationConfig]


def floor_mod(config_of: ConfigOf) -> Mod:
    """A client mod that refuses, before anything else looks at a message, a run that asks for less than the
    hospital's privacy floor (node config, :class:`client.floor.PrivacyFloor`), read at every message."""

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        problems = PrivacyFloor.from_node_config(dict(context.node_config)).problems(config_of(context))
        if problems:
            log.warning("refused a %s message below the privacy floor: %s", msg.metadata.message_type,
                        "; ".join(problems))
            return _error(msg, ErrorCode.MOD_FAILED_PRECONDITION, f"{FLOOR_REFUSED}: {'; '.join(problems)}")
        return call_next(msg, context)

    return mod


#: Where a hospital keeps, per run, the last round it served (``context.state``, kept by its SuperNode).
PROGRESS_KEY = "retune-rounds"


def _progress_problem(context: Context, kind: str, position: tuple[int, int], digest: str) -> str | None:
    """Why a ``kind`` message for ``position`` (stage, round) with adaptors ``digest`` is not a later round of
    this run (None: it is, and it is recorded). A train round may come again with the same adaptors (a retried
    round); an earlier one, or the same one with other adaptors, is a replay or a re-targeting."""
    record = context.state.get(PROGRESS_KEY)
    seen = dict(record.items()) if isinstance(record, ConfigRecord) else {}
    last = tuple(seen[kind]) if kind in seen else None
    if last is not None:
        if position < last:
            return f"{kind} for stage {position[0] + 1} round {position[1] + 1} after stage {last[0] + 1} " \
                   f"round {last[1] + 1}: a replayed or reordered round"
        if kind == "train" and position == last and digest != seen.get("train-digest"):
            return f"train for stage {position[0] + 1} round {position[1] + 1} again with other adaptors"
    seen[kind] = list(position)
    if kind == "train":
        seen["train-digest"] = digest
    context.state[PROGRESS_KEY] = ConfigRecord(seen)
    return None


def round_mod(config_of: ConfigOf, public_key: Path | str | None = None) -> Mod:
    """A client mod that refuses, before the app sees them, rounds outside the run's schedule (stages ×
    rounds-per-stage), rounds the consortium did not sign for exactly this run, stage, round and kind
    (``config[ARRAYS_SIGNATURE]``, see :func:`shared.signing.verify_round`), and rounds that are not later than the
    last one this hospital served in the run (replayed or reordered). ``config_of``: the
    run's settings as this hospital reads them (their identity is signed); ``public_key`` None: the node config's
    ``consortium-key``; a hospital with neither refuses every round (nothing it cannot verify is trained on)."""

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if secure_stage(msg.metadata.message_type) not in (None, SECAGG_MASKED):
            return call_next(msg, context)  # secure-aggregation key exchange carries no adaptors
        path = public_key or context.node_config.get(CONSORTIUM_KEY)
        kind = msg.metadata.message_type.split(".")[0]
        try:
            arrays, config = msg.content.get(ARRAYS), msg.content.get(CONFIG)
            if not isinstance(arrays, ArrayRecord) or not isinstance(config, ConfigRecord):
                raise WireError("the message carries no global adaptors and round to verify")
            position = (int(config["stage"]), int(config["round"]))
            run = config_of(context)
            if not (0 <= position[0] < run.stages and 0 <= position[1] < run.rounds_per_stage):
                log.warning("refused a %s message for stage %d round %d, outside the run's %d × %d rounds",
                            msg.metadata.message_type, position[0] + 1, position[1] + 1, run.stages,
                            run.rounds_per_stage)
                return _error(msg, ErrorCode.MOD_FAILED_PRECONDITION,
                              f"{ROUND_REFUSED}: stage {position[0] + 1} round {position[1] + 1} is not a round of "
                              f"this run ({run.stages} stages × {run.rounds_per_stage} rounds)")
            if not path:
                raise RetuneError(f"this hospital has no {CONSORTIUM_KEY!r} in its node config to verify the "
                                  "consortium's signature with")
            binding = RoundBinding(msg.metadata.run_id, run_identity(run.to_run_config()), *position, kind)
            signature = config.get(ARRAYS_SIGNATURE)
            verify_round(arrays, binding, signature if isinstance(signature, bytes) else None,
                         load_public_key(str(path)))
        except (RetuneError, KeyError, TypeError, ValueError) as exc:
            log.warning("refused a %s message: %s", msg.metadata.message_type, exc)
            return _error(msg, ErrorCode.MOD_FAILED_PRECONDITION, f"{UNSIGNED}: {exc}")
        problem = _progress_problem(context, kind, position, arrays_digest(arrays).hex())
        if problem is not None:
            log.warning("refused a %s message: %s", msg.metadata.message_type, problem)
            return _error(msg, ErrorCode.MOD_FAILED_PRECONDITION, f"{ROUND_REFUSED}: {problem}")
        context.state[HELD_KEY] = arrays  # verified: a later message may name them instead of carrying them
        return call_next(msg, context)

    return mod


def hospital_mods(config_of: ConfigOf, audit_path: Path | str | None = None,
                  public_key: Path | str | None = None) -> list[Mod]:
    """The hospital's mod stack, outermost first: boundary guard (audits every reply, including the refusals
    below), the privacy floor (:func:`floor_mod`), the consortium's signature and the order of rounds
    (:func:`round_mod`). Each path left None comes from the node config (``audit-log``, ``consortium-key``) at every
    message; without a consortium key every round is refused."""
    return [boundary_guard(audit_path=audit_path), floor_mod(config_of), round_mod(config_of, public_key)]
