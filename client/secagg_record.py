"""Which of its updates a hospital agreed to have summed, and with whom: the defence against rerun-and-subtract.

Without DP, local training is deterministic: from the same global adaptors on the same stage data a hospital
computes the same update every time it is asked. A server that obtained the secure sum of {H, A, B, C} could ask
again without H, under any run identity (change a server-side setting such as ``run-dir``), and subtract the sums:
H's update, exactly. So before it signs a round's survivor set (:func:`client.secagg.consistency`, the last step
before it reveals any unmask share), a hospital looks up the update it masked, whatever the run, by two keys: the
digest of the global adaptors it started from with the digest of the stage data it trained on, and the digest of the
encoded update itself (so global adaptors that differ only in bits that change nothing, a ``-0.0`` for a ``0.0``,
cannot make it a new update): an update it agreed to have summed with one set of hospitals is never summed with
another. A new study with other hospitals must start from other global adaptors (another ``seed``). The same set
again is fine, and is how a legitimate resumption completes: a server restarted mid-round asks the same round of
the same hospitals, each sends the same update (deterministic training, or its DP release kept beside the ledger),
and the sum is the one it could already have had.

The record lives beside the audit log (``secagg-contributions.jsonl``, one JSON line per agreement, appended under
an exclusive lock and fsync'ed before the signature leaves); a hospital without an audit log keeps it in the
run's ``context.state``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.app import RecordDict

from client.audit import held_records
from shared.secagg import SecAggError

CONTRIBUTIONS = "secagg-contributions.jsonl"


class SummedBefore(SecAggError):
    """This update was agreed to be summed with another set of hospitals (a rerun, or a new study from the same
    global adaptors and data)."""


def _conflict(entries: list[dict], mine: dict) -> str | None:
    for entry in entries:
        same = entry.get("hospital") == mine["hospital"] and (
            all(entry.get(k) == mine[k] for k in ("start", "data")) or entry.get("update") == mine["update"])
        if same and sorted(entry.get("survivors", [])) != mine["survivors"]:
            return (f"this update (global adaptors {mine['start'][:12]}…, stage data {mine['data'][:12]}…) was "
                    f"summed with {', '.join(entry['survivors'])} before; a sum with "
                    f"{', '.join(mine['survivors'])} would give a difference of sums away")
    return None


def agree_to_sum(node_config: Mapping[str, Any], state: RecordDict, hospital: str, start: str, data: str,
                 update: str, survivors: list[str]) -> None:
    """Record that ``hospital``'s update (from global adaptors ``start`` on stage data ``data``; its own digest
    ``update``) may be summed with exactly ``survivors`` (names); :class:`SummedBefore` when it was agreed with
    another set before."""
    mine = {"hospital": hospital, "start": start, "data": data, "update": update, "survivors": sorted(survivors)}
    with held_records(node_config, CONTRIBUTIONS, state) as entries:
        problem = _conflict(entries, mine)
        if problem:
            raise SummedBefore(problem)
        if mine not in entries:
            entries.append(mine)
