"""A hospital's settings come from its own node config: no path, backbone or name from the run config a server
sends."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from client.floor import PrivacyFloor
from client.site import Site, load_site, site_settings
from shared.config import OFFLINE_DEFAULT, EmbedConfig, FederationConfig
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


HEADER = "image,split,Atelectasis,Cardiomegaly,Consolidation,Edema,Pleural Effusion"


def _hospital(folder: Path, rows: list[str] | None = None, images: int = 12) -> Path:
    """A small hospital: ``images`` 16 px PNGs, the first two thirds train, and its manifest (extra ``rows``)."""
    (folder / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = [HEADER]
    for i in range(images):
        Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(folder / "images" / f"{i}.png")
        lines.append(f"images/{i}.png,{'train' if i < 2 * images // 3 else 'test'},{i % 2},{(i + 1) % 2},0,1,{i % 3 % 2}")
    (folder / "manifest.csv").write_text("\n".join(lines + (rows or [])) + "\n")
    return folder / "manifest.csv"


def _load(tmp_path: Path, manifest: Path, **node) -> Site:
    values = {"manifest": str(manifest), "cache": str(tmp_path / "cache"), "backbone": "retune-tiny-random", **node}
    return load_site(FederationConfig(), site_settings(FederationConfig(), values))


def test_node_config_data_keys_are_parsed_strictly():
    base = {"manifest": "/d/l.csv"}
    default = site_settings(FederationConfig(), base)
    assert (default.max_pixels, default.allow_outside_paths) == (EmbedConfig().max_pixels, False)
    chosen = site_settings(FederationConfig(), {**base, "max-pixels": "1000", "allow-outside-paths": True})
    assert (chosen.max_pixels, chosen.allow_outside_paths) == (1000, True)
    assert site_settings(FederationConfig(), {**base, "allow-outside-paths": "false"}).allow_outside_paths is False
    for key, value in (("max-pixels", "lots"), ("max-pixels", 0), ("allow-outside-paths", "yes please")):
        with pytest.raises(RetuneError, match=f"node config {key}="):
            site_settings(FederationConfig(), {**base, key: value})


def test_a_misspelled_site_disease_names_the_closest_one(tmp_path):
    manifest = _hospital(tmp_path / "h1")
    with pytest.raises(RetuneError) as err:
        _load(tmp_path, manifest, name="h1", diseases="Cardiomegaly,Atelectasiss")
    assert str(err.value) == ("site h1: node config 'diseases' names 'Atelectasiss' (did you mean 'Atelectasis'?), "
                              "which its label file has no column for; its diseases: Atelectasis, Cardiomegaly, "
                              "Consolidation, Edema, Pleural Effusion")
    site = _load(tmp_path, manifest, name="h1", diseases="Cardiomegaly,Atelectasis")
    assert np.isnan(site.train.labels[:, site.diseases.index("Edema")]).all()  # labelled: only those two


def test_one_hospitals_bad_data_fails_that_hospital_only(tmp_path):
    good = _hospital(tmp_path / "good")
    bad = {"leak": ["images/0.png,test,1,0,0,1,0"],
           "escape": ["../../etc/passwd,train,1,0,0,1,0"],
           "typo": None}
    messages = {}
    for name, rows in bad.items():
        manifest = _hospital(tmp_path / name, rows)
        if name == "typo":
            manifest.write_text(manifest.read_text().replace("Cardiomegaly", "Cardiomegally"))
        with pytest.raises(RetuneError) as err:
            _load(tmp_path, manifest, name=name)
        messages[name] = str(err.value)
    assert messages["leak"].startswith(f"site leak: {tmp_path}/leak/manifest.csv: 1 image(s) are in more than one split")
    assert messages["escape"].startswith(f"site escape: {tmp_path}/escape/manifest.csv: 1 image path(s) lead outside")
    assert "site typo: " in messages["typo"] and "(did you mean 'Cardiomegaly'?)" in messages["typo"]
    assert len(_load(tmp_path, good, name="good").train.labels) == 8
    outside = _load(tmp_path, _hospital(tmp_path / "lenient", [f"{tmp_path}/good/images/0.png,train,1,0,0,1,0"]),
                    name="lenient", **{"allow-outside-paths": "true"})
    assert len(outside.train.labels) == 9


def test_a_site_skips_images_over_its_max_pixels_and_needs_train_and_test_images(tmp_path):
    manifest = _hospital(tmp_path / "h", ["big.png,train,1,0,0,1,0"])
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "h" / "big.png")
    assert len(_load(tmp_path, manifest, name="h").train.labels) == 9
    # a fresh cache each time: an image embedded once is not decoded again
    small = {"max-pixels": 1000, "cache": str(tmp_path / "cache-1000")}
    assert len(_load(tmp_path, manifest, name="h", **small).train.labels) == 8  # 64 x 64 skipped
    with pytest.raises(RetuneError, match="site h: no usable images in the 'train' split"):
        _load(tmp_path, manifest, name="h", **{"max-pixels": 100, "cache": str(tmp_path / "cache-100")})


def test_the_hospital_not_the_run_decides_whether_lora_trains_and_up_to_which_rank():
    """A malicious or careless run config asking for LoRA (or a huge rank, or another tower) is below the floor of a
    hospital whose node config does not accept it (the floor mod refuses it before any data is read:
    tests/client/test_floor.py)."""
    lora_run = FederationConfig(adaptor_kind="lora")
    default = PrivacyFloor.from_node_config({})
    assert default.adaptor_kinds == ("retune",)
    assert any("trains only retune" in p and "adaptor-kind 'lora'" in p for p in default.problems(lora_run))
    accepting = PrivacyFloor.from_node_config({"adaptor-kinds": "retune,lora"})
    assert accepting.problems(lora_run) == []
    assert any("LoRA rank 4096 is above this hospital's max-lora-rank 64" in p
               for p in accepting.problems(FederationConfig(adaptor_kind="lora", lora_rank=4096)))
    text_run = FederationConfig(adaptor_kind="lora", lora_towers="image,text")
    assert any("adapts only its image tower with LoRA" in p and "not its text tower" in p
               for p in accepting.problems(text_run))
    assert PrivacyFloor.from_node_config({"adaptor-kinds": "lora", "lora-towers": "image,text"}).problems(text_run) == []
    with pytest.raises(RetuneError, match="adaptor-kinds='loar'"):
        PrivacyFloor.from_node_config({"adaptor-kinds": "loar"})
