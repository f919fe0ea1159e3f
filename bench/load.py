"""Benchmark: load. A simulation with 50 hospitals and a real deployment with 10 hospitals on 127.0.0.1, each to
its end; wall time and peak memory (the sum of the resident memory of every process the job started, sampled every
0.5 s: proportional set size, which counts a page shared by several processes once, and the plain sum of resident
sizes, which counts it in each). Not a test; writes bench/results/load.json.

Usage: .venv/bin/python bench/load.py [--sim-hospitals 50] [--deployed-hospitals 10] [--images 100]
       [--skip-simulation | --skip-deployment] [--out bench/results/load.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BIN = Path(sys.executable).parent


class PeakMemory(threading.Thread):
    """Samples the summed PSS and RSS of processes whose command line or environment mentions ``marker``."""

    def __init__(self, marker: str) -> None:
        super().__init__(daemon=True)
        self.marker, self.done = marker.encode(), threading.Event()
        self.peak_pss = self.peak_rss = self.processes = 0

    def sample(self) -> None:
        pss = rss = count = 0
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                if self.marker in (entry / "cmdline").read_bytes() or self.marker in (entry / "environ").read_bytes():
                    rollup = (entry / "smaps_rollup").read_bytes()
                    pss += sum(int(v) * 1024 for v in re.findall(rb"^Pss:\s+(\d+) kB", rollup, re.M))
                    rss += sum(int(v) * 1024 for v in re.findall(rb"^Rss:\s+(\d+) kB", rollup, re.M))
                    count += 1
            except OSError:
                continue
        if pss > self.peak_pss:
            self.peak_pss, self.processes = pss, count
        self.peak_rss = max(self.peak_rss, rss)

    def run(self) -> None:
        while not self.done.wait(0.5):
            self.sample()


def measured(marker: str, job) -> dict:
    memory = PeakMemory(marker)
    memory.start()
    start = time.perf_counter()
    try:
        result = job()
    finally:
        memory.done.set()
        memory.join()
    return {**result, "wall_s": round(time.perf_counter() - start, 1),
            "peak_pss_gib": round(memory.peak_pss / 2**30, 2), "peak_rss_sum_gib": round(memory.peak_rss / 2**30, 2),
            "processes_at_peak": memory.processes}


def simulation(root: Path, hospitals: int, images: int) -> dict:
    out = root / "simulation"
    argv = [str(BIN / "retune"), "simulate", "--out", str(out), "--hospitals", str(hospitals), "--images-per-hospital",
            str(images), "--stages", "1", "--rounds-per-stage", "2", "--local-epochs", "1"]

    def job() -> dict:
        proc = subprocess.run(argv, env={**os.environ, "RETUNE_LOAD_MARKER": str(root)}, capture_output=True,
                              text=True)
        report = json.loads((out / "report.json").read_text()) if proc.returncode == 0 else {}
        return {"command": " ".join(argv[1:]), "returncode": proc.returncode,
                "rounds": len(report.get("rounds", [])), "hospitals_per_round": [r["clients"] for r in
                                                                                  report.get("rounds", [])],
                "final_macro_auroc": report.get("final", {}).get("macro_auroc"),
                "zero_shot": report.get("baselines", {}).get("zero_shot", {}).get("macro_auroc"),
                "error": proc.stderr[-1500:] if proc.returncode else ""}

    return measured(str(root), job)


def deployment(root: Path, hospitals: int, images: int, rounds_per_stage: int = 2) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from deploy.launcher import CONNECTION, Layout, down, up
    from server.state import STATE

    fed = root / "fed"
    layout = Layout(fed.resolve())
    env = {**os.environ, "FLWR_HOME": str(layout.flwr_home), "FLWR_TELEMETRY_ENABLED": "0",
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    run = {"stages": 1, "rounds-per-stage": rounds_per_stage, "local-epochs": 1, "min-hospitals": hospitals, "run-dir": "runs/load",
           "join-timeout": 300.0}
    config = " ".join(f"{k}={json.dumps(v)}" for k, v in run.items())

    def job() -> dict:
        start = time.perf_counter()
        try:
            up(fed, hospitals=hospitals, images=images, image_size=64, app=Path("."))
            up_s = time.perf_counter() - start
            proc = subprocess.run([str(BIN / "flwr"), "run", ".", CONNECTION, "--stream", "--run-config", config],
                                  env=env, capture_output=True, text=True, timeout=1800)
            state_file = layout.server / "runs" / "load" / STATE
            state = json.loads(state_file.read_text()) if state_file.exists() else {"history": []}
            return {"hospitals": hospitals, "up_s": round(up_s, 1), "run_s": round(time.perf_counter() - start - up_s, 1),
                    "returncode": proc.returncode, "rounds": len(state["history"]),
                    "hospitals_per_round": [r["clients"] for r in state["history"]],
                    "round_s": [round(r["wall_s"], 2) for r in state["history"]],
                    "final_macro_auroc": state["history"][-1]["macro_auroc"] if state["history"] else None,
                    "error": proc.stdout[-1500:] if proc.returncode else ""}
        finally:
            down(fed)

    return measured(str(root), job)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sim-hospitals", type=int, default=50)
    parser.add_argument("--deployed-hospitals", type=int, default=10)
    parser.add_argument("--images", type=int, default=100, help="phantom images per hospital")
    parser.add_argument("--skip-simulation", action="store_true")
    parser.add_argument("--skip-deployment", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("bench/results/load.json"))
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="load-"))
    result = {"machine": {"cpus": os.cpu_count()}}
    if not args.skip_simulation:
        result["simulation"] = simulation(root, args.sim_hospitals, args.images)
        print(json.dumps(result["simulation"]), flush=True)
    if not args.skip_deployment:
        result["deployment"] = deployment(root, args.deployed_hospitals, args.images)
        print(json.dumps(result["deployment"]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
