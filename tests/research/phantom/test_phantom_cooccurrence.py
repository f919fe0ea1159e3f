"""The co-occurrence table, hospital prevalence skew, and sampled label statistics."""

from __future__ import annotations

import json

import numpy as np

from shared.labels import CHEXPERT5
from research.phantom import LABEL_NOISE, hospital_style, load_table, sample_case
from research.phantom.cooccurrence import TABLE_PATH


def test_table_is_the_real_chexpert_joint_with_provenance() -> None:
    table = load_table()
    assert table.diseases == CHEXPERT5
    assert table.combos.shape == (32, 5) and len({tuple(c) for c in table.combos}) == 32
    assert abs(table.probs.sum() - 1.0) < 1e-9
    doc = json.loads(TABLE_PATH.read_text())
    assert doc["rows"] == sum(c["count"] for c in doc["combos"]) > 100_000
    assert "torchxrayvision==1.5.7" in doc["source"]["package"] and "zeros" in doc["uncertain_policy"]
    # CheXpert frontal, U-Zeros: effusion is the commonest finding, consolidation the rarest; a third are normal.
    m = table.marginals()
    assert np.argmax(m) == CHEXPERT5.index("Pleural Effusion") and np.argmin(m) == CHEXPERT5.index("Consolidation")
    assert 0.3 < table.probs[0] < 0.4


def test_skew_reweights_combinations() -> None:
    table = load_table()
    skew = (2.0, 1.0, 1.0, 0.5, 1.0)
    w = table.skewed(skew)
    expected = table.probs * np.prod(np.asarray(skew) ** table.combos, axis=1)
    assert np.allclose(w, expected / expected.sum())
    assert table.marginals(skew)[0] > table.marginals()[0] and table.marginals(skew)[3] < table.marginals()[3]


def test_hospital_skew_is_deterministic_and_bounded() -> None:
    styles = [hospital_style(k, 0) for k in range(8)]
    assert hospital_style(3, 0) == styles[3]
    assert all(0.5 <= s <= 2.0 for st in styles for s in st.skew)
    assert len({st.skew for st in styles}) == 8


def test_sampled_label_marginals_match_the_skewed_table() -> None:
    table = load_table()
    for hospital in (0, 1):
        cases = [sample_case(i, hospital, 0) for i in range(4000)]
        true = np.stack([c.labels for c in cases]).mean(axis=0)
        observed = np.stack([c.observed for c in cases]).mean(axis=0)
        expected = table.marginals(hospital_style(hospital, 0).skew)
        assert np.all(np.abs(true - expected) < 0.025), (hospital, true, expected)
        noisy = expected * (1 - LABEL_NOISE[0]) + (1 - expected) * LABEL_NOISE[1]
        assert np.all(np.abs(observed - noisy) < 0.025), (hospital, observed, noisy)
