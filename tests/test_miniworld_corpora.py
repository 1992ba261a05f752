"""The miniature world's datastore kinds (smallcap.miniworld.corpora): a large noisy web corpus and a small clean
human-labelled one, written as JSONL and built into datastores with `smallcap datastore build` as a user would."""

from __future__ import annotations

import json

from conftest import run_cli
from smallcap.miniworld.captions import mentions
from smallcap.miniworld.corpora import WebNoise, human_corpus, web_corpus, write_jsonl
from smallcap.miniworld.world import DOMAINS, SHAPES


def test_the_web_corpus_is_noisy_alt_text_of_both_domains_and_deterministic():
    records = web_corpus(seed=3, images_per_domain=1000)
    assert records == web_corpus(seed=3, images_per_domain=1000)
    assert records != web_corpus(seed=4, images_per_domain=1000)
    assert len(records) == 2000 and len({r["image_id"] for r in records}) == 2000
    kinds = [r["kind"] for r in records]
    noise = WebNoise()
    expected = {"vague": noise.vague, "wrong": noise.wrong, "unrelated": noise.unrelated,
                "right": 1 - noise.vague - noise.wrong - noise.unrelated}
    for kind, share in expected.items():  # 2,000 draws: a share is within 0.04 of its setting
        assert abs(kinds.count(kind) / len(kinds) - share) < 0.04, kind
    shapes_named = {kind: [bool(mentions(r["caption"])[0]) for r in records if r["kind"] == kind] for kind in expected}
    assert all(shapes_named["right"]) and all(shapes_named["wrong"])
    assert not any(shapes_named["vague"]) and not any(shapes_named["unrelated"])
    for domain in DOMAINS.values():  # both domains' shapes occur among the right captions
        named = set().union(*(mentions(r["caption"])[0] for r in records if r["kind"] == "right"))
        assert set(domain.shapes) <= named


def test_the_human_corpus_is_small_clean_and_covers_both_domains():
    records = human_corpus(seed=3, images_per_domain=20)
    assert len(records) == 2 * 20 * 5
    per_image: dict[str, list[str]] = {}
    for record in records:
        per_image.setdefault(record["image_id"], []).append(record["caption"])
    assert len(per_image) == 40 and all(len(set(c)) == 5 for c in per_image.values())
    for name, domain in DOMAINS.items():
        shapes = set().union(*(mentions(c)[0] for i, caps in per_image.items() if f"-{name}-" in i for c in caps))
        assert shapes == set(domain.shapes)
    assert all(mentions(c)[0] <= set(SHAPES) and mentions(c)[0] for c in (r["caption"] for r in records))


def test_corpora_build_into_datastores_with_the_cli(tmp_path):
    web = write_jsonl(web_corpus(seed=0, images_per_domain=60), tmp_path / "web.jsonl")
    human = write_jsonl(human_corpus(seed=0, images_per_domain=4), tmp_path / "human.jsonl")
    assert [json.loads(line)["caption"] for line in web.read_text().splitlines()][:3] == [
        r["caption"] for r in web_corpus(seed=0, images_per_domain=60)[:3]]
    for path, count in ((web, 120), (human, 40)):
        out = tmp_path / path.stem
        run_cli("datastore", "build", str(path), "--out", str(out), "--encoder", "mini-clip", "--model", "mini",
                "--id-column", "image_id")
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["filters"]["counts"]["read"] == count
        assert manifest["count"] == count - manifest["filters"]["counts"]["too_long"]
        assert manifest["count"] >= 0.9 * count
