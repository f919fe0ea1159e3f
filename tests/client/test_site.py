"""A hospital's settings come from its own node config: no path, backbone or name from the run config a server
sends."""

from __future__ import annotations

import pytest

from client.site import site_settings
from shared.config import OFFLINE_DEFAULT, FederationConfig
from shared.errors import RetuneError


def test_paths_and_backbone_come_from_the_node_config_never_the_run_config(tmp_path, monkeypatch):
    monkeypatch.setenv("RETUNE_CACHE", str(tmp_path / "hospital-cache"))
    server_says = FederationConfig.from_run_config({"run-dir": "/etc", "sim-dir": "/etc", "backbone": "ViT-B-16"})
    settings = site_settings(server_says, {"manifest": str(tmp_path / "data" / "labels.csv")})
    assert settings.cache == str(tmp_path / "hospital-cache") and settings.backbone == OFFLINE_DEFAULT
    assert settings.name == "data" and settings.ledger == str(tmp_path / "data" / "privacy-ledger.json")
    chosen = site_settings(server_says, {"manifest": "/d/l.csv", "cache": "/c", "backbone": "/models/biomedclip",
                                         "name": "st-mary"})
    assert (chosen.cache, chosen.backbone, chosen.name) == ("/c", "/models/biomedclip", "st-mary")
    with pytest.raises(RetuneError, match="unknown run-config keys"):
        FederationConfig.from_run_config({"cache": "/etc"})  # a run cannot name the hospital's cache


@pytest.mark.parametrize("name", ["Jane Doe 1961", "x" * 65, "../up", ""])
def test_a_name_that_could_carry_anything_is_refused(name):
    with pytest.raises(RetuneError, match="hospital name"):
        site_settings(FederationConfig(), {"manifest": "/d/l.csv", "name": name})
