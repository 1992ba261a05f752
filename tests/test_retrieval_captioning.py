"""Captioning with captions retrieved from datastores, through the CLI and the API, on real COCO images."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from transformers import CLIPImageProcessor

from conftest import COCO_MINI, GPT2_TOKENIZER_DIR, run_cli
from smallcap.captioner import Captioner
from smallcap.retrieval.datastore import Datastore
from smallcap.retrieval.encoders import HFCLIPEncoder

IMAGES = sorted((COCO_MINI / "val2017").glob("*.jpg"))[:3]


@pytest.fixture(scope="module")
def stores(tiny_clip_dir, tmp_path_factory):
    """Two datastores built with the CLI: coco-mini train captions, and the first 60 val captions."""
    root = tmp_path_factory.mktemp("stores")
    val = json.loads((COCO_MINI / "annotations/captions_val2017.json").read_text())
    val["annotations"] = sorted(val["annotations"], key=lambda a: a["id"])[:60]
    (root / "val60.json").write_text(json.dumps(val))
    for name, source in (("train", COCO_MINI / "annotations/captions_train2017.json"), ("val", root / "val60.json")):
        run_cli("datastore", "build", source, "--out", root / name, "--encoder", tiny_clip_dir,
                "--tokenizer", GPT2_TOKENIZER_DIR)
    return root / "train", root / "val"


@pytest.mark.slow
def test_caption_with_datastores_through_cli(tiny_smallcap, stores, tiny_clip_dir, tmp_path):
    out = tmp_path / "captions.jsonl"
    run_cli("caption", *IMAGES, "--model", tiny_smallcap, "--datastore", stores[0], "--datastore", stores[1],
            "--output", out)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    encoder = HFCLIPEncoder.from_pretrained(str(tiny_clip_dir))
    queries = encoder.embed_images([Image.open(p) for p in IMAGES])
    single = [Datastore.load(s).search(queries, 8) for s in stores]
    for i, row in enumerate(rows):
        assert isinstance(row["caption"], str) and len(row["retrieved"]) == 4
        union = sorted(zip(single[0].scores[i] + single[1].scores[i], single[0].captions[i] + single[1].captions[i]),
                       key=lambda hit: -hit[0])
        assert row["retrieved"] == [caption for _, caption in union[:4]]


def test_one_vision_pass_serves_captioning_and_retrieval(tiny_smallcap, stores, tiny_clip_dir):
    captioner = Captioner.from_pretrained(str(tiny_smallcap), datastores=[str(stores[0])])
    assert captioner.retriever.reuses_encoder_states
    images = [Image.open(p).convert("RGB") for p in IMAGES]
    from_states = captioner.retriever.embed(images, captioner.encode(images))
    from_pixels = HFCLIPEncoder.from_pretrained(str(tiny_clip_dir)).embed_images(images)
    np.testing.assert_allclose(from_states, from_pixels, atol=1e-5)
    calls = []
    captioner.retriever.encoder.model.vision_model.register_forward_hook(lambda *a: calls.append(1))
    results = captioner(IMAGES)
    assert not calls and all(len(r.retrieved) == 4 for r in results)


def test_datastore_with_another_encoder_is_refused(tiny_smallcap, stores, tmp_path):
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    other = tmp_path / "other-clip"
    CLIPModel(CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                          num_attention_heads=4),
                         vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=4, patch_size=32), projection_dim=16)).save_pretrained(other)
    CLIPTokenizer.from_pretrained(COCO_MINI.parent / "tokenizers/clip").save_pretrained(other)
    CLIPImageProcessor().save_pretrained(other)
    result = run_cli("caption", IMAGES[0], "--model", tiny_smallcap, "--datastore", stores[0],
                     "--retrieval-encoder", other, check=False)
    assert result.returncode == 2 and "encoder mismatch" in result.stderr and "16-d" in result.stderr
    assert "Traceback" not in result.stderr
