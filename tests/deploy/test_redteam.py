"""``retune redteam`` as a privacy officer runs it: every attack against the installed hospital code is held, the
JSON names each with what the attacker obtained, and the exit status says whether any succeeded."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent
#: The issue's seven attacks, the older ones the defences must keep stopping, and those found by review.
EXPECTED = {"floor-secure-aggregation", "eval-label-oracle", "eval-repeat", "eval-unlimited", "secagg-rerun-subtract",
            "secagg-inconsistent-views", "dp-exact-values", "signing-key-in-submitted-code", "approve-markup",
            "gateway-oversized-body", "state-rollback", "unsigned-rounds", "replay", "secagg-key-substitution",
            "secagg-second-mask", "forged-state", "forged-adaptors", "foreign-code", "floor-adaptor-kind",
            "secagg-session-reuse"}


def test_every_known_attack_is_held(tmp_path):
    result = subprocess.run([str(BIN / "retune"), "redteam", "--json", "--dir", str(tmp_path / "bench")],
                            capture_output=True, text=True, timeout=900,
                            env={"PATH": f"{BIN}:/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "FLWR_TELEMETRY_ENABLED": "0",
                                 "HOME": str(Path.home())})
    report = json.loads(result.stdout)
    outcomes = {a["attack"]: a for a in report["attacks"]}
    assert set(outcomes) >= EXPECTED
    failed = {name: a["obtained"] for name, a in outcomes.items() if not a["held"]}
    assert not failed and report["failed"] == 0 and result.returncode == 0, (failed, result.stderr[-2000:])
    assert "labels right: positives" in outcomes["eval-label-oracle"]["obtained"]


def test_a_floor_that_trusts_every_peer_loses_to_a_colluder_and_says_so(tmp_path):
    """The privacy officer's own floor: a hospital that assumes no peer colludes with the server
    (secagg-max-colluders = 0) unmasks once two of three sign a survivor set, so a server and one colluding peer
    unmask it alone. One line per attack, and exit status 1. An unknown attack is an error, not a pass."""
    run = [str(BIN / "retune"), "redteam", "--dir", str(tmp_path / "bench"), "--backbone", "retune-tiny-random",
           "--images", "120", "--only", "secagg-inconsistent-views", "--only", "replay"]
    env = {"PATH": f"{BIN}:/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HOME": str(Path.home()), "COLUMNS": "200"}
    default = subprocess.run(run, capture_output=True, text=True, timeout=300, env=env)
    lines = [line for line in default.stdout.splitlines() if line.startswith(("held", "FAILED"))]
    assert default.returncode == 0 and len(lines) == 2 and all(line.startswith("held") for line in lines)
    trusting = subprocess.run([*run, "--node-config", "secagg-max-colluders=0"], capture_output=True, text=True,
                              timeout=300, env=env)
    assert trusting.returncode == 1, trusting.stdout
    assert any(line.startswith("FAILED  secagg-inconsistent-views: hospital-0's masked update unmasked alone")
               for line in trusting.stdout.splitlines())
    unknown = subprocess.run([*run[:-4], "--only", "no-such-attack"], capture_output=True, text=True, timeout=120,
                             env=env)
    assert unknown.returncode == 2 and "unknown attack" in unknown.stderr
