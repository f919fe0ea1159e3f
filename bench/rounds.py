"""Benchmark: what a round costs beyond the hospitals' own compute, and what a federation costs at scale.

1. Round overhead and start-up of ``retune simulate`` (10 hospitals): each round's wall time minus the slowest
   hospital's train and the slowest hospital's evaluate (timed by a client mod around the app); start-up is the
   federation's time outside its rounds. In the same run, for reference, a no-op Flower app (FedAvg over one
   4-value array, ClientApps that answer at once) through this project's engine and through Flower's simulation
   engine (``flwr.simulation.run_simulation``, Ray), and the project's own apps through Flower's engine (what
   ``retune simulate`` ran before it had its own).
2. Scale: 100 simulated hospitals × 20 rounds (40 phantom images each, one local epoch), as a separate process:
   federation time after embedding, and peak memory of every process (PSS, sampled every 0.5 s).
3. A deployed round on 127.0.0.1 (3 hospitals: SuperLink, SuperNodes, TLS, process isolation): wall time per
   round, and that minus the slowest hospital's compute for the same data measured in simulation.

Not a test; writes bench/results/rounds.json.

Usage: .venv/bin/python bench/rounds.py [--hospitals 10] [--scale-hospitals 100] [--scale-rounds 20]
       [--skip-simulation] [--skip-flower] [--skip-scale] [--skip-deployment] [--out bench/results/rounds.json]
(The deployment part installs this folder as the app: leave the working tree alone while it runs.)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402
from rich.console import Console  # noqa: E402

import deploy.simulate as simulate  # noqa: E402
from deploy.local_grid import run_local  # noqa: E402
from load import BIN, deployment, measured  # noqa: E402
from shared.config import SimulationPlan  # noqa: E402

ROUNDS = 6


def flower_engine(server_app: ServerApp, client_app: ClientApp, hospitals: int, workers: int, run_id: int = 1) -> None:
    """Flower's simulation engine (Ray), as ``retune simulate`` called it before it had its own."""
    from flwr.simulation import run_simulation

    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=hospitals,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": os.cpu_count() or 1, "include_dashboard": False}})


def noop_apps(rounds: int, walls: list[float]) -> tuple[ServerApp, ClientApp]:
    """FedAvg over a 4-value array with ClientApps that answer at once; ``walls`` gets each round's wall time."""
    server, client = ServerApp(), ClientApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = FedAvg(fraction_evaluate=1.0)
        arrays = ArrayRecord({"w": Array(np.zeros(4, dtype=np.float32))})
        for server_round in range(1, rounds + 1):
            start = time.perf_counter()
            replies = grid.send_and_receive(strategy.configure_train(server_round, arrays, ConfigRecord(), grid))
            arrays, _ = strategy.aggregate_train(server_round, replies)
            grid.send_and_receive(strategy.configure_evaluate(server_round, arrays, ConfigRecord(), grid))
            walls.append(time.perf_counter() - start)

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        return Message(RecordDict({"arrays": msg.content["arrays"], "metrics": MetricRecord({"num-examples": 1})}),
                       reply_to=msg)

    @client.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return Message(RecordDict({"metrics": MetricRecord({"num-examples": 1})}), reply_to=msg)

    return server, client


def noop(engine, hospitals: int) -> dict:
    walls: list[float] = []
    start = time.perf_counter()
    engine(*noop_apps(ROUNDS, walls), hospitals, workers=min(hospitals, os.cpu_count() or 1))
    total = time.perf_counter() - start
    steady = statistics.median(walls[1:])
    return {"round_s": round(steady, 4), "startup_s": round(total - sum(walls) + walls[0] - steady, 2)}


def timed(log: list):
    """A client mod recording (stage, round, message type, seconds in the app) of every message."""
    def mod(msg: Message, context: Context, call_next) -> Message:
        start = time.perf_counter()
        reply = call_next(msg, context)
        config = msg.content.get("config") if msg.has_content() else None
        if config is not None:
            log.append((int(config["stage"]), int(config["round"]), msg.metadata.message_type,
                        time.perf_counter() - start))
        return reply
    return mod


def retune(root: Path, hospitals: int, engine=None, images: int = 100) -> dict:
    """``retune simulate`` (in this process) on ``hospitals`` × ``images`` phantom images; with ``engine`` in place
    of its own."""
    config = simulate.simulation_config(root, hospitals, local_epochs=1)
    plan = SimulationPlan(hospitals=hospitals, images_per_hospital=images)
    log: list = []
    own = simulate.run_local
    simulate.run_local = engine or own
    try:
        report = simulate.run_simulation(config, plan, Console(stderr=True, quiet=True), client_mods=[timed(log)])
    finally:
        simulate.run_local = own
    rounds = report["rounds"]
    result = {"round_s": [round(r["wall_s"], 3) for r in rounds],
              "startup_s": round(report["timing"]["federation_s"] - sum(r["wall_s"] for r in rounds), 2),
              "final_macro_auroc": report["final"]["macro_auroc"]}
    if log:  # the mod ran in this process: per-round compute of the slowest hospital, train and evaluate
        overheads, beyond, slowest_s, total_s = [], [], [], []
        for r in rounds:
            times = {kind: [s for st, ro, k, s in log if (st, ro, k) == (r["stage"], r["round"], kind)]
                     for kind in ("train", "evaluate")}
            slowest = max(times["train"]) + max(times["evaluate"])
            total = sum(times["train"]) + sum(times["evaluate"])
            overheads.append(r["wall_s"] - slowest)
            # the hospitals share the cores: their compute cannot take less than total / cores
            beyond.append(r["wall_s"] - max(slowest, total / (os.cpu_count() or 1)))
            slowest_s.append(slowest)
            total_s.append(total)
        result.update(overhead_s=[round(o, 3) for o in overheads], mean_overhead_s=round(float(np.mean(overheads)), 3),
                      slowest_compute_s=round(float(np.mean(slowest_s)), 3),
                      all_hospitals_compute_s=round(float(np.mean(total_s)), 3),
                      mean_overhead_beyond_shared_cores_s=round(float(np.mean(beyond)), 3))
    return result


def scale(root: Path, hospitals: int, rounds: int) -> dict:
    out = root / "scale"
    argv = [str(BIN / "retune"), "simulate", "--out", str(out), "--hospitals", str(hospitals), "--images-per-hospital",
            "40", "--stages", "2", "--rounds-per-stage", str(rounds // 2), "--local-epochs", "1"]

    def job() -> dict:
        proc = subprocess.run(argv, env={**os.environ, "RETUNE_LOAD_MARKER": str(root)}, capture_output=True,
                              text=True)
        report = json.loads((out / "report.json").read_text()) if proc.returncode == 0 else {}
        timing = report.get("timing", {})
        return {"command": " ".join(argv[1:]), "returncode": proc.returncode, "rounds": len(report.get("rounds", [])),
                "prepare_s": round(timing.get("prepare_s", 0), 1), "federation_s": round(timing.get("federation_s", 0), 1),
                "final_macro_auroc": report.get("final", {}).get("macro_auroc"),
                "error": proc.stderr[-1500:] if proc.returncode else ""}

    return measured(str(root), job)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hospitals", type=int, default=10)
    parser.add_argument("--scale-hospitals", type=int, default=100)
    parser.add_argument("--scale-rounds", type=int, default=20)
    parser.add_argument("--skip-simulation", action="store_true", help="only the scale and deployment parts")
    parser.add_argument("--skip-flower", action="store_true", help="no runs through Flower's simulation engine")
    parser.add_argument("--skip-scale", action="store_true")
    parser.add_argument("--skip-deployment", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("bench/results/rounds.json"))
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="rounds-"))
    result: dict = {"machine": {"cpus": os.cpu_count()}, "hospitals": args.hospitals}

    def step(name: str, value: dict) -> None:
        result[name] = value
        print(name, json.dumps(value), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))

    if not args.skip_simulation:
        step("noop_local", noop(run_local, args.hospitals))
        step("retune_local", retune(root / "local", args.hospitals))
    if not args.skip_flower and not args.skip_simulation:
        step("noop_flower", noop(flower_engine, args.hospitals))
        step("retune_flower", retune(root / "flower", args.hospitals, flower_engine))
    if not args.skip_scale:
        step("scale", scale(root, args.scale_hospitals, args.scale_rounds))
    if not args.skip_deployment:
        deployed = deployment(root, 3, 40, rounds_per_stage=4)
        compute = retune(root / "compute3", 3, images=40)["slowest_compute_s"]
        walls = deployed.get("round_s", [])
        step("deployment", {**deployed, "slowest_compute_s": compute,
                            "overhead_s": [round(w - compute, 2) for w in walls],
                            "steady_overhead_s": round(float(np.median(walls[1:])) - compute, 2) if len(walls) > 1
                            else None})


if __name__ == "__main__":
    main()
