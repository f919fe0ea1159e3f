"""Testing only: a simulated hospital that poisons its train replies (``retune simulate --poison KIND:K``).

It shows what containment and the robust strategies stop. ``KIND`` is what hospital ``K`` (its partition id) does to
the adaptors it sends, after its own code produced them:

- ``scale``: every value × 100 (an update far outside the norm bound);
- ``flip``: every value negated (an update of about twice the global adaptors' norm, inside the default bound);
- ``nan``: every value NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp.typing import Mod

from shared.errors import RetuneError
from shared.wire import ARRAYS

POISONS = {"scale": lambda v: v * v.dtype.type(100), "flip": lambda v: -v, "nan": lambda v: np.full_like(v, np.nan)}


@dataclass(frozen=True)
class Poison:
    """Hospital ``hospital`` sends ``kind``-poisoned adaptors in every train reply."""

    kind: str
    hospital: int

    @classmethod
    def parse(cls, text: str, hospitals: int) -> Poison:
        """``KIND:K`` as the command line takes it."""
        kind, _, k = text.partition(":")
        if kind not in POISONS or not k.isdigit():
            raise RetuneError(f"--poison {text!r}: expected KIND:K with KIND one of {', '.join(POISONS)} and K a "
                              "hospital number, e.g. flip:2")
        if int(k) >= hospitals:
            raise RetuneError(f"--poison {text!r}: there is no hospital {k} among {hospitals} (0 to {hospitals - 1})")
        return cls(kind, int(k))

    def __str__(self) -> str:
        return f"{self.kind}:{self.hospital}"

    def mod(self) -> Mod:
        """A client mod, outside the hospital's own mods, that poisons this hospital's train replies."""

        def mod(msg: Message, context: Context, call_next) -> Message:
            reply = call_next(msg, context)
            if (msg.metadata.message_type == "train" and not reply.has_error()
                    and int(context.node_config.get("partition-id", -1)) == self.hospital):
                reply.content[ARRAYS] = ArrayRecord({name: Array(POISONS[self.kind](array.numpy()))
                                                     for name, array in reply.content[ARRAYS].items()})
            return reply

        return mod
