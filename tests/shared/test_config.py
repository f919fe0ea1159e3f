"""Settings that cannot work are refused before anything runs, each with one line that says what to change."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from research.poison import Poison
from shared.config import FederationConfig, SimulationPlan
from shared.errors import RetuneError


@pytest.mark.parametrize("settings, message", [
    ({"strategy": "fedsgd"}, "unknown strategy 'fedsgd'"),
    ({"scenario": "domain"}, "unknown scenario 'domain'"),
    ({"scenario": "joint", "stages": 2}, "joint scenario trains on everything at once: it has 1 stage, not 2"),
    ({"strategy": "bulyan", "byzantine_hospitals": 1, "min_hospitals": 5},
     "bulyan with min-hospitals 5 tolerates at most 0 Byzantine hospitals, not 1: raise min-hospitals to 7"),
    ({"strategy": "krum", "byzantine_hospitals": 2, "min_hospitals": 6}, "raise min-hospitals to 7"),
    ({"strategy": "multikrum", "secure_aggregation": True}, "secure aggregation hides"),
    ({"max_weight_ratio": 0.5}, "max-weight-ratio must be at least 1"),
    ({"max_update_norm": -1.0}, "max-update-norm must be positive"),
    ({"trim_fraction": 0.5}, "trim-fraction must be in [0, 0.5)"),
    ({"byzantine_hospitals": -2}, "byzantine-hospitals must be -1"),
    ({"rounds_per_stage": 0}, "must be at least 1"),
])
def test_settings_that_cannot_work_are_refused(settings, message):
    with pytest.raises(RetuneError) as err:
        FederationConfig(**settings)
    assert message in str(err.value)


@pytest.mark.parametrize("settings", [
    {"scenario": "joint", "stages": 1}, {"strategy": "bulyan", "byzantine_hospitals": 1, "min_hospitals": 7},
    {"strategy": "krum", "byzantine_hospitals": 2, "min_hospitals": 7}, {"max_update_norm": 0, "max_weight_ratio": 0},
    {"strategy": "fedavg", "secure_aggregation": True, "min_hospitals": 3}])
def test_the_edges_of_what_works_are_accepted(settings):
    assert FederationConfig(**settings)


def test_the_app_run_config_is_the_config_defaults():
    """pyproject's [tool.flwr.app.config] lists every field with its default (one source: FederationConfig)."""
    declared = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    assert declared["tool"]["flwr"]["app"]["config"] == FederationConfig().to_run_config()


@pytest.mark.parametrize("plan, message", [
    ({"hospitals": 1}, "at least 2 hospitals"),
    ({"dp_hospitals": (0,)}, "give its budget with --dp-epsilon"),
    ({"dp_epsilon": 8.0, "dp_hospitals": (0, 5)}, "no hospital 5 among 5"),
])
def test_simulation_plans_that_cannot_work_are_refused(plan, message):
    with pytest.raises(RetuneError, match=message):
        SimulationPlan(**plan)


def test_dp_runs_where_it_is_asked():
    assert [SimulationPlan(dp_epsilon=8.0, dp_hospitals=(0, 2)).dp_at(k) for k in range(5)] == \
        [True, False, True, False, False]
    assert all(SimulationPlan(dp_epsilon=8.0).dp_at(k) for k in range(5))
    assert not any(SimulationPlan().dp_at(k) for k in range(5))


@pytest.mark.parametrize("text, message", [("flip", "expected KIND:K"), ("melt:1", "expected KIND:K"),
                                           ("nan:9", "no hospital 9 among 5")])
def test_a_poison_spec_is_checked(text, message):
    with pytest.raises(RetuneError, match=message):
        Poison.parse(text, 5)
    assert Poison.parse("scale:4", 5) == Poison("scale", 4)
