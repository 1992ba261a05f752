"""The bundled offline default built from the miniature world: `smallcap demo`, `smallcap caption --model mini
--datastore mini-target` and `datastore retrieve` offline, and how short names resolve."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import REPO, run_cli
from smallcap.errors import SmallCapError
from smallcap.hub import BUNDLE_DIR, bundled_name, bundled_path, resolve_datastore, resolve_pretrained
from smallcap.retrieval.datastore import Datastore
from smallcap.retrieval.encoders import canonical_encoder_name

OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.mark.slow
def test_demo_runs_offline_and_shows_the_domain_transfer():
    result = run_cli("demo", "--json", env=OFFLINE)
    rows = json.loads(result.stdout)
    bundle = json.loads((BUNDLE_DIR / "bundle.json").read_text())
    target_words = set(bundle["world"]["content_words"]["target"])
    assert sorted(Path(row["image"]).name for row in rows) == sorted(bundle["samples"])
    for row in rows:
        assert row["error"] is None
        by_store = {entry["datastore"]: entry for entry in row["captions"]}
        assert set(by_store) == {"mini-source", "mini-target"}
        for entry in by_store.values():
            assert entry["caption"] and len(entry["retrieved"]) == 4
        # The model was never trained on target words: with the source datastore it cannot produce them.
        assert not target_words & set(by_store["mini-source"]["caption"].split())
        assert all(target_words & set(caption.split()) for caption in by_store["mini-target"]["retrieved"])
        if Path(row["image"]).name.startswith("target"):
            assert target_words & set(by_store["mini-target"]["caption"].split()), row


@pytest.mark.slow
def test_demo_table_is_readable():
    result = run_cli("demo", env=OFFLINE)
    out = result.stdout
    assert out.count("with mini-source:") == out.count("with mini-target:") == 6
    assert out.count("reference:") == 6 and "retrieved" in out
    assert "Loading weights" not in result.stderr


@pytest.mark.slow
def test_caption_with_bundled_short_names(tmp_path):
    sample = sorted((BUNDLE_DIR / "samples").glob("target_*.png"))[0]
    result = run_cli("caption", sample, "--model", "mini", "--datastore", "mini-target", "--output",
                     tmp_path / "out.jsonl", env=OFFLINE)
    row = json.loads((tmp_path / "out.jsonl").read_text())
    store = Datastore.load("mini-target")
    stored = {store.caption(i) for i in range(len(store))}
    assert row["caption"] and len(row["retrieved"]) == 4 and set(row["retrieved"]) <= stored
    combined = run_cli("caption", sample, "--model", "mini", "--datastore", "mini-source", "--datastore",
                       "mini-target", env=OFFLINE)
    assert json.loads(combined.stdout)["retrieved"] == row["retrieved"]  # target images find target captions
    assert result.returncode == 0


def test_short_names_resolve_to_the_bundle_and_local_paths_win(tmp_path, monkeypatch):
    assert Path(resolve_pretrained("mini")) == BUNDLE_DIR / "smallcap"
    assert Path(resolve_pretrained("mini-clip")) == BUNDLE_DIR / "clip"
    assert resolve_datastore("mini-source") == BUNDLE_DIR / "datastores" / "source"
    assert resolve_datastore("some/dir") == Path("some/dir")
    # Bundled datastores name their encoder by its short name, and the bundled CLIP's path maps back to it.
    for name in ("mini-source", "mini-target"):
        assert Datastore.load(name).encoder_name == "mini-clip"
    assert canonical_encoder_name(str(BUNDLE_DIR / "clip")) == "mini-clip" == bundled_name(BUNDLE_DIR / "clip")
    assert canonical_encoder_name("mini-clip") == "mini-clip"
    # A local directory of the same name is what the user means.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mini").mkdir()
    assert bundled_path("mini") is None and resolve_pretrained("mini") == "mini"
    assert canonical_encoder_name("mini-clip") == "mini-clip"  # no such local path: still the short name


@pytest.mark.slow
def test_short_name_errors_are_clear(monkeypatch, tmp_path):
    with pytest.raises(SmallCapError, match="bundled datastore, not a SmallCap model"):
        resolve_pretrained("mini-target", "SmallCap model")
    result = run_cli("caption", BUNDLE_DIR / "samples", "--model", "mini-source", check=False, env=OFFLINE)
    assert result.returncode == 2 and "--datastore mini-source" in result.stderr
    monkeypatch.setattr("smallcap.hub.BUNDLE_DIR", tmp_path / "nothing")
    with pytest.raises(SmallCapError, match="missing from this installation"):
        resolve_pretrained("mini")


def test_bundle_is_small_and_packaged():
    total = sum(path.stat().st_size for path in BUNDLE_DIR.rglob("*") if path.is_file())
    assert total < 16 * 2**20
    assert not list(BUNDLE_DIR.rglob("training_state"))
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '"assets/**/*"' in pyproject
    samples = sorted(path.name for path in (BUNDLE_DIR / "samples").glob("*.png"))
    assert sum(name.startswith("source") for name in samples) >= 3 and sum(
        name.startswith("target") for name in samples) >= 3


@pytest.mark.slow
def test_datastore_retrieve_for_a_folder_of_images(tmp_path):
    out = tmp_path / "retrieved.json"
    run_cli("datastore", "retrieve", "mini-target", "--data", BUNDLE_DIR / "samples", "--k", 6, "--keep", 3,
            "--no-exclude-own", "--out", out, env=OFFLINE)
    retrieved = json.loads(out.read_text())
    assert sorted(retrieved) == sorted(path.stem for path in (BUNDLE_DIR / "samples").glob("*.png"))
    assert all(len(captions) == 3 for captions in retrieved.values())
    bad = run_cli("datastore", "retrieve", "mini-target", "--data", BUNDLE_DIR / "samples", "--keep", 0, "--out",
                  out, check=False, env=OFFLINE)
    assert bad.returncode == 2 and "--keep" in bad.stderr
