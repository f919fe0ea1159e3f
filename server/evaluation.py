"""Combine the scalars hospitals report into federation-wide AUROC.

Each site reports per-disease AUROC with its positive and negative counts. The federated AUROC of a disease is
the mean of site AUROCs weighted by positive × negative pairs: the AUROC over all within-hospital pairs, which
needs no score to leave a hospital. Baselines are aggregated the same way, so comparisons are like for like.
"""

from __future__ import annotations

from flwr.app import RecordDict

from shared.metrics import macro
from shared.wire import METRICS, WireError, check_reply


def pairs_weighted_auroc(sites: list[dict[str, float]], part: str, diseases: tuple[str, ...]
                         ) -> dict[str, float | None]:
    """Per-disease AUROC on test part ``part`` (``all`` or ``s<j>``) over the sites' reports."""
    result: dict[str, float | None] = {}
    for disease in diseases:
        num = den = 0.0
        for metrics in sites:
            key = f"{part}/{disease}"
            if f"auroc/{key}" in metrics:
                pairs = metrics[f"pos/{key}"] * metrics[f"neg/{key}"]
                num += metrics[f"auroc/{key}"] * pairs
                den += pairs
        result[disease] = num / den if den else None
    return result


def federated_metrics(sites: list[dict[str, float]], diseases: tuple[str, ...], stage: int,
                      scored: list[tuple[str, ...]]) -> dict:
    """``macro_auroc`` and ``per_class_auroc`` on all test data so far, and ``stage_auroc`` per stage j ≤ stage
    (macro over the diseases that stage ``scored``)."""
    per_class = pairs_weighted_auroc(sites, "all", diseases)
    stage_auroc = []
    for j in range(stage + 1):
        values = pairs_weighted_auroc(sites, f"s{j}", diseases)
        stage_auroc.append(macro({d: values[d] for d in scored[j]}))
    return {"macro_auroc": macro(per_class), "per_class_auroc": per_class, "stage_auroc": stage_auroc}


def site_macro(metrics: dict[str, float], diseases: tuple[str, ...]) -> float | None:
    """One hospital's macro AUROC over its test data so far."""
    return macro({d: metrics.get(f"auroc/all/{d}") for d in diseases})


def evaluation_problem(content: RecordDict) -> str | None:
    """Why an evaluate reply cannot be counted (None: it can): it must pass the wire allow-list (finite scalar
    metrics, a site record), and every ``auroc/<part>/<disease>`` must lie in [0, 1] and come with whole, non-negative
    ``pos``/``neg`` counts of the same part and disease."""
    try:
        check_reply(content, None)
    except WireError as exc:
        return str(exc)
    metrics = content[METRICS]
    for key, value in metrics.items():
        if not key.startswith("auroc/"):
            continue
        if not 0.0 <= value <= 1.0:
            return f"metric {key!r} = {value:g} is not an AUROC in [0, 1]"
        for count in (f"pos/{key[6:]}", f"neg/{key[6:]}"):
            if count not in metrics or metrics[count] < 0 or metrics[count] != int(metrics[count]):
                return f"metric {key!r} comes without a whole, non-negative {count!r}"
    return None
