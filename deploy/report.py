"""The simulation report: ``report.json`` for machines, ``report.html`` (one self-contained page) for people."""

from __future__ import annotations

import base64
import html
import io
from dataclasses import asdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from deploy.plots import plot_auroc_bars, plot_matrix, plot_partition  # noqa: E402
from research.poison import Poison  # noqa: E402
from shared.config import BYZANTINE_STRATEGIES  # noqa: E402
from shared.continual import DISTILLING  # noqa: E402
from shared.metrics import forgetting  # noqa: E402


def auroc_matrix(history: list[dict], stages: int) -> list[list[float | None]]:
    """After stage i (its last round), AUROC on stage j's test data; ``None`` for stages not reached yet."""
    last = {r["stage"]: r for r in history}
    return [[last[i]["stage_auroc"][j] if j <= i else None for j in range(stages)] for i in sorted(last)]


def privacy_summary(sites, plan) -> dict:
    """ε each simulated DP hospital has spent by the end of the run, read from its own ledger (no ε reaches the
    server: in a deployment only the hospital knows it), and δ; empty without DP."""
    from client.privacy import HospitalPrivacy

    epsilon = {s.settings.name: HospitalPrivacy(Path(s.settings.ledger), s.settings.floor.dp).epsilon()
               for s in sites if s.settings.floor.dp is not None}
    return {"epsilon": epsilon, "delta": plan.dp_delta, "source": "each hospital's ledger"} if epsilon else {}


def monitoring(history: list[dict], exact: list[float | None]) -> dict:
    """Each round's macro AUROC as the hospitals released it against the exact one, and the largest gap."""
    released = [r["macro_auroc"] for r in history]
    gaps = [abs(a - b) for a, b in zip(released, exact) if a is not None and b is not None]
    return {"released": released, "exact": exact, "max_abs_deviation": max(gaps) if gaps else None}


POISON_NOTE = ("testing only: {hospital} sent {kind}-poisoned adaptors in every train reply "
               "(retune simulate --poison)")


def refusals(history: list[dict], names: dict[int, str]) -> list[dict]:
    """Every reply the server did not count, by hospital, with the round, the phase and the reason: refused by the
    server (malformed, non-finite, outside the update limits) or declined (an error reply, or none in time). A
    hospital that failed before its first valid reply is named as the run learnt it later (``names``: node → name)."""
    later = {f"node-{node}": name for node, name in names.items()}
    return [{"stage": r["stage"], "round": r["round"], "server_round": r["server_round"], "outcome": outcome,
             **entry, "hospital": later.get(entry["hospital"], entry["hospital"])}
            for r in history for outcome in ("refused", "declined") for entry in r.get(outcome, [])]


def robustness(config) -> dict:
    """The aggregation and the containment it ran with."""
    summary = {"strategy": config.strategy, "max_update_norm": config.max_update_norm,
               "max_weight_ratio": config.max_weight_ratio}
    if config.strategy == "fedtrimmedavg":
        summary["trim_fraction"] = config.trim_fraction
    if config.strategy in BYZANTINE_STRATEGIES:
        summary["byzantine_hospitals"] = config.byzantine_hospitals if config.byzantine_hospitals >= 0 else \
            "per round, the most the rule withstands"
    return summary


def adaptors_summary(config, embed_dim: int) -> dict:
    """What the hospitals trained: kind, LoRA settings, trainable parameters and the bytes of one copy of them on
    the wire (what each hospital sends per round)."""
    from server.federation import initial_model
    from shared.wire import payload_bytes, to_record

    model = initial_model(config, embed_dim)
    lora = config.lora_config()
    return {"kind": config.adaptor_kind, "lora": None if lora is None else asdict(lora),
            "lora_modules": model.adapted_modules,
            "trainable_parameters": sum(p.numel() for p in model.trainable()),
            "payload_bytes": payload_bytes(to_record(model, config.wire_dtype)),
            "embedding_cache": "image and text" if lora is None else
            " and ".join(t for t in ("image", "text") if t not in lora.towers) or "none (both towers adapted)"}


def headline(report: dict) -> dict[str, float | None]:
    """A report's four headline figures: final, zero-shot and centralized macro-AUROC, and forgetting."""
    return {"final_macro_auroc": report["final"]["macro_auroc"],
            "zero_shot": report["baselines"]["zero_shot"]["macro_auroc"],
            "centralized": report["baselines"]["centralized"]["macro_auroc"],
            "forgetting": report["stages"]["forgetting"]}


def build_report(config, plan, state, sites, partition: dict, baselines: dict, timing: dict, checkpoint: Path,
                 exact: dict, exact_rounds: list[float | None]) -> dict:
    """Everything a researcher needs to judge the run, as plain JSON. ``partition``: where the hospitals came from
    (:meth:`deploy.sim_data.SimulatedData.record`); ``exact``: the final global adaptors scored on the hospitals'
    test data without the hospitals' evaluation protection, and ``exact_rounds`` each round's macro AUROC so scored
    (only a simulation can: it holds the data), to show what that protection costs monitoring."""
    matrix = auroc_matrix(state.history, config.stages)
    final = state.history[-1]
    poison = None
    if plan.poison:
        spec = Poison.parse(plan.poison, plan.hospitals)
        hospital = sites[spec.hospital].settings.name
        poison = {"kind": spec.kind, "hospital": hospital, "note": POISON_NOTE.format(kind=spec.kind, hospital=hospital)}
    return {
        "config": {**config.to_run_config(), **asdict(plan)},
        "adaptors": adaptors_summary(config, sites[0].embed_dim),
        "continual": {"option": config.continual, "method": config.continual_method,
                      **({"lwf_weight": config.lwf_weight} if config.continual_method in DISTILLING else {})},
        "robustness": robustness(config),
        "poison": poison,
        "refused": refusals(state.history, state.hospitals),
        "partition": partition,
        "hospitals": [{"name": s.settings.name, "labelled": list(s.settings.labelled or s.diseases),
                       "train_images": len(s.train.labels), "test_images": len(s.test.labels)} for s in sites],
        "rounds": state.history,
        "stages": {"auroc_matrix": matrix, **forgetting(matrix)},
        "final": {"macro_auroc": final["macro_auroc"], "per_class_auroc": final["per_class_auroc"],
                  "exact_macro_auroc": exact["macro_auroc"], "exact_per_class_auroc": exact["per_class_auroc"]},
        "baselines": {name: {"macro_auroc": b["macro_auroc"], "per_class_auroc": b["per_class_auroc"]}
                      for name, b in baselines.items()},
        "privacy": privacy_summary(sites, plan),
        "monitoring": monitoring(state.history, exact_rounds),
        "timing": {**timing, "seconds_per_round": sum(r["wall_s"] for r in state.history) / len(state.history)},
        "checkpoint": str(checkpoint),
        "metric_note": "AUROC per disease is the positive×negative-pair-weighted mean of hospital AUROCs "
                       "(all within-hospital pairs); baselines are aggregated the same way. The rounds' figures are "
                       "what the hospitals released (ties broken at random, noised, small counts withheld, counts "
                       "coarsened: client/evaluation.py); 'exact' scores the same adaptors on the simulated "
                       "hospitals' data directly, as no deployed server can (the dash-dot line, and final).",
    }


def _figure_tag(fig: plt.Figure, alt: str) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    data = base64.b64encode(buffer.getvalue()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _figures(report: dict) -> list[str]:
    rounds = report["rounds"]
    x = range(1, len(rounds) + 1)
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    ax.plot(x, [r["macro_auroc"] for r in rounds], marker="o", label="federated (as released)")
    exact = report.get("monitoring", {}).get("exact")
    if exact:  # what the released figure stands for: the same adaptors scored exactly
        ax.plot(x, exact, marker=".", ls="-.", lw=0.9, color="tab:green",
                label=f"federated, exact (max gap {report['monitoring']['max_abs_deviation']:.4f})")
    for (name, base), style in zip(report["baselines"].items(), ("--", ":")):
        ax.axhline(base["macro_auroc"], ls=style, color="grey" if name == "zero_shot" else "black",
                   label=f"{name.replace('_', '-')} {base['macro_auroc']:.3f}")
    for r in rounds[1:]:
        if r["round"] == 0:
            ax.axvline(r["server_round"] - 0.5, color="lightgrey", lw=0.8)
    ax.set(xlabel="round", ylabel="macro AUROC", title="macro AUROC per round (stage boundaries in grey)")
    ax.legend(fontsize=8)
    tags = [_figure_tag(fig, "macro AUROC per round")]

    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    plot_auroc_bars(ax, {"zero-shot": report["baselines"]["zero_shot"]["per_class_auroc"],
                         "centralized": report["baselines"]["centralized"]["per_class_auroc"],
                         "federated": report["final"]["per_class_auroc"]})
    ax.set_title("AUROC per disease")
    tags.append(_figure_tag(fig, "AUROC per disease"))

    matrix = report["stages"]["auroc_matrix"]
    fig, ax = plt.subplots(figsize=(4.8, 3.8))
    plot_matrix(ax, matrix, [f"stage {i + 1}" for i in range(len(matrix[0]))],
                f"forgetting {report['stages']['forgetting'] or 0:.3f}")
    tags.append(_figure_tag(fig, "forgetting matrix"))

    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    ax.bar([i - 0.2 for i in x], [r["bytes_up"] / 1e3 for r in rounds], 0.4, label="up (hospitals → server)")
    ax.bar([i + 0.2 for i in x], [r["bytes_down"] / 1e3 for r in rounds], 0.4, label="down (server → hospitals)")
    ax.set(xlabel="round", ylabel="kB", title="bytes per round")
    ax.legend(fontsize=8)
    tags.append(_figure_tag(fig, "bytes per round"))

    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    names = sorted({name for r in rounds for name in r["hospitals"]})
    for name in names:
        ax.plot(x, [r["hospitals"].get(name) for r in rounds], marker=".", label=name)
    ax.set(xlabel="round", ylabel="macro AUROC", title="per-hospital macro AUROC (own test data)")
    ax.legend(fontsize=8)
    tags.append(_figure_tag(fig, "per-hospital AUROC"))
    return tags


def _partition_panel(report: dict) -> str:
    """Where the hospitals came from: the partition's settings and its heat map of positives per disease."""
    partition = report.get("partition")
    if not partition:  # a report written before partitions were recorded
        return ""
    hospitals = partition["per_hospital"]
    fig, ax = plt.subplots(figsize=(7.5, 1.2 + 0.38 * len(hospitals)))
    plot_partition(ax, partition)
    source = "phantom hospitals" if partition["source"] == "phantoms" else \
        f"{partition['source']} ({partition['format']} format)"
    dropped = f" · {partition['dropped_images']:,} images in no hospital" if partition["dropped_images"] else ""
    settings = (f"{source} · {partition['description']} · splits: {partition['splits']} · "
                f"{sum(partition['patients']):,} patients, {sum(partition['images']):,} images{dropped}")
    return (f"<h2>Partition</h2><p class=\"note\">{html.escape(settings)}</p>"
            f"{_figure_tag(fig, 'positives per disease per hospital')}")


def _adaptors_line(report: dict) -> str:
    adaptors = report["adaptors"]
    lora = adaptors["lora"]
    what = {"retune": "RE-tune adaptors", "lora": "LoRA in the backbone", "both": "RE-tune adaptors and LoRA"}
    settings = "" if lora is None else (f" (r {lora['rank']}, alpha {lora['alpha']:g}, dropout {lora['dropout']:g}, "
                                        f"{', '.join(lora['targets'])} in the {' and '.join(lora['towers'])} tower)")
    return html.escape(f"trained: {what[adaptors['kind']]}{settings} · {adaptors['trainable_parameters']:,} "
                       f"parameters · {adaptors['payload_bytes']:,} bytes per hospital per round · embedding cache "
                       f"used for: {adaptors['embedding_cache']}")


def _continual_line(report: dict) -> str:
    continual = report["continual"]
    what = {"none": "none (each stage trains on its own diseases only)",
            "lwf": f"learning without forgetting (the old diseases' scores of the model each round starts from, "
                   f"distilled on the stage's own images, weight {continual.get('lwf_weight', 0):g})",
            "replay": f"replay (each hospital trains on its own earlier stages' images with their labels too, and the "
                      f"old diseases those labels leave out are distilled, weight {continual.get('lwf_weight', 0):g})"}
    chosen = " (auto for this scenario)" if continual["option"] == "auto" else ""
    lost = report["stages"]["forgetting"]
    return html.escape(f"continual learning: {what[continual['method']]}{chosen}; the centralized baseline uses the "
                       f"same · forgetting {'-' if lost is None else f'{lost:.3f}'}")


def _privacy_line(report: dict) -> str:
    privacy = report.get("privacy")
    if not privacy:
        return " · no differential privacy"
    spent = ", ".join(f"{html.escape(h)} ε={e:.2f}" for h, e in sorted(privacy["epsilon"].items()))
    return f" · DP-SGD (δ={privacy['delta']:g}): {spent}"


def _poison_banner(report: dict) -> str:
    poison = report.get("poison")
    if not poison:
        return ""
    return f'<p style="background:#fde2e1;border:1px solid #c0392b;padding:6px"><b>{html.escape(poison["note"])}</b></p>'


def _refused_table(report: dict) -> str:
    robust = report.get("robustness", {})
    limits = html.escape(", ".join(f"{k.replace('_', '-')} {v}" for k, v in robust.items()))
    rows = "".join(f"<tr><td>{html.escape(r['hospital'])}</td><td>{r['stage'] + 1}</td><td>{r['round'] + 1}</td>"
                   f"<td>{html.escape(r.get('phase', 'train'))}</td><td>{html.escape(r['outcome'])}</td>"
                   f"<td style=\"text-align:left\">{html.escape(r['reason'])}</td></tr>" for r in report.get("refused", []))
    body = (f"<table><tr><th>hospital</th><th>stage</th><th>round</th><th>phase</th><th>outcome</th><th>reason</th>"
            f"</tr>{rows}</table>") if rows else "<p>Every reply was counted.</p>"
    return f"<h2>Replies not counted</h2><p class=\"note\">{limits}</p>{body}"


def write_html(report: dict, path: Path) -> Path:
    """One self-contained page: figures inline, no external resources."""
    fmt = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
    rows = "".join(f"<tr><td>{html.escape(d)}</td><td>{fmt(report['baselines']['zero_shot']['per_class_auroc'][d])}"
                   f"</td><td>{fmt(report['baselines']['centralized']['per_class_auroc'][d])}</td>"
                   f"<td>{fmt(v)}</td></tr>" for d, v in report["final"]["per_class_auroc"].items())
    hospitals = "".join(f"<tr><td>{html.escape(h['name'])}</td><td>{html.escape(', '.join(h['labelled']))}</td>"
                        f"<td>{h['train_images']}</td><td>{h['test_images']}</td></tr>" for h in report["hospitals"])
    config = html.escape(", ".join(f"{k}={v}" for k, v in report["config"].items()))
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>retune-fl simulation report</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}}img{{max-width:49%}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}
td:first-child{{text-align:left}}.note{{color:#666;font-size:90%}}</style></head><body>
<h1>retune-fl simulation report</h1>
<p><b>final macro AUROC {fmt(report['final']['macro_auroc'])}</b> · zero-shot
{fmt(report['baselines']['zero_shot']['macro_auroc'])} · centralized
{fmt(report['baselines']['centralized']['macro_auroc'])} · forgetting {fmt(report['stages']['forgetting'])} ·
{report['timing']['seconds_per_round']:.1f} s per round{_privacy_line(report)}</p>
<p>{_adaptors_line(report)}<br>{_continual_line(report)}</p>
<p class="note">Not for clinical use.{" Phantom data." if report.get("partition", {}).get("source", "phantoms") == "phantoms" else ""}
{html.escape(report['metric_note'])}</p>
{_poison_banner(report)}
{''.join(_figures(report))}
<h2>AUROC per disease</h2><table><tr><th>disease</th><th>zero-shot</th><th>centralized</th><th>federated</th></tr>
{rows}</table>
<h2>Hospitals</h2><table><tr><th>hospital</th><th>labels</th><th>train</th><th>test</th></tr>{hospitals}</table>
{_partition_panel(report)}
{_refused_table(report)}
<h2>Configuration</h2><p class="note">{config}</p></body></html>"""
    path.write_text(page)
    return path
