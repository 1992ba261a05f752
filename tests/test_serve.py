"""The HTTP API as a client uses it, against a real uvicorn on a loopback port: captions equal the CLI's,
multipart and base64 inputs, datastore choice, per-input errors, limits, metrics, readiness and batching."""

from __future__ import annotations

import base64
import io
import re
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi", reason="needs the serve extra: pip install 'smallcap[serve]'")
import httpx  # noqa: E402
from PIL import Image  # noqa: E402

from serving_helpers import cli_captions, live_server, smallest_coco_images, wait_ready  # noqa: E402
from smallcap.serving.app import create_app  # noqa: E402
from smallcap.serving.engine import Engine  # noqa: E402

IMAGES = smallest_coco_images(9)
MAX_QUEUE = 8


@pytest.fixture(scope="module")
def engine():
    import faiss
    import torch

    before = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(1)  # the CLI runs below are pinned the same way
    faiss.omp_set_num_threads(1)
    yield Engine.load()  # the defaults of `smallcap serve`: mini with mini-source (default) and mini-target
    torch.set_num_threads(before[0])
    faiss.omp_set_num_threads(before[1])


@pytest.fixture(scope="module")
def server(engine):
    """The served app: a 150 ms batching window, small queue and upload limits so that the limits are testable."""
    app = create_app(lambda: engine, max_batch=8, max_wait_ms=150, max_queue=MAX_QUEUE, max_upload_mb=2)
    with live_server(app) as url, httpx.Client(base_url=url, timeout=120) as client:
        wait_ready(client)
        yield client


@pytest.fixture(scope="module")
def cli_source():
    return cli_captions(IMAGES[:6], "--datastore", "mini-source")


def api_captions(engine, paths, datastores=None, **settings) -> dict[str, dict]:
    """What the Python API (`Captioner` on the same model) gives for `paths`: {file name: result dict}."""
    from smallcap.captioner import Captioner
    from smallcap.generation import GenerationSettings
    from smallcap.retrieval.retriever import DatastoreRetriever

    loaded = engine.captioner
    retriever = None if datastores is None else DatastoreRetriever.from_directories(
        datastores, vision_model=loaded.model.encoder)
    captioner = Captioner(loaded.model, loaded.tokenizer, loaded.image_processor, retriever=retriever,
                          use_retrieval=datastores is not None, settings=GenerationSettings(**settings))
    return {r.image.rsplit("/", 1)[-1]: r.to_dict() for r in captioner(paths)}


def multipart(paths, **fields):
    files = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in paths]
    return {"files": files, "data": fields}


def metric(text: str, name: str, **labels) -> float:
    """The value of one sample in Prometheus text (0 when absent)."""
    label_text = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.escape(name) + (r"\{" + re.escape(label_text) + r"\}" if labels else "") + r" ([0-9.e+-]+)\n"
    found = re.search(pattern, text)
    return float(found.group(1)) if found else 0.0


def test_multipart_captions_equal_the_cli_with_retrieved_scores_and_timings(server, cli_source):
    response = server.post("/v1/captions", **multipart(IMAGES[:6]))
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["input"] for r in results] == [p.name for p in IMAGES[:6]]
    for result in results:
        expected = cli_source[result["input"]]
        assert result["error"] is None
        assert result["caption"] == expected["caption"]
        assert [r["caption"] for r in result["retrieved"]] == expected["retrieved"]
        scores = [r["score"] for r in result["retrieved"]]
        assert scores == sorted(scores, reverse=True) and all(-1 <= s <= 1 for s in scores)
        assert all(r["source_id"] for r in result["retrieved"])
        assert set(result["timings_ms"]) == {"queue", "encode", "retrieve", "decode", "total"}


def test_base64_json_with_both_datastores_equals_the_api_combining_them(server, engine):
    paths = IMAGES[:3]
    expected = api_captions(engine, paths, ["mini-source", "mini-target"])
    body = {"images": [{"name": p.name, "data": base64.b64encode(p.read_bytes()).decode()} for p in paths],
            "datastores": ["mini-source", "mini-target"]}
    results = server.post("/v1/captions", json=body).json()["results"]
    for result in results:
        assert result["caption"] == expected[result["input"]]["caption"]
        assert [r["caption"] for r in result["retrieved"]] == expected[result["input"]]["retrieved"]


def test_no_retrieval_and_target_store_k_and_settings(server, engine):
    paths = IMAGES[:2]
    expected = api_captions(engine, paths, None, num_beams=1, max_new_tokens=8)
    results = server.post("/v1/captions", **multipart(paths, datastores="none", num_beams="1",
                                                       max_new_tokens="8")).json()["results"]
    assert [r["caption"] for r in results] == [expected[p.name]["caption"] for p in paths]
    assert all(r["retrieved"] == [] for r in results)
    target = server.post("/v1/captions", **multipart(paths[:1], datastores="mini-target", k="2")).json()["results"]
    source_ids = {r["source_id"] for r in target[0]["retrieved"]}
    assert len(target[0]["retrieved"]) == 2 and source_ids  # k honoured
    info = server.get("/v1/datastores").json()["datastores"]
    assert [(d["name"], d["default"]) for d in info] == [("mini-source", True), ("mini-target", False)]
    assert all(d["size"] > 0 and d["encoder"] == "mini-clip" for d in info)
    model = server.get("/v1/model").json()
    assert model["name"] == "mini" and model["parameters"] > 0 and model["max_batch"] == 8


def test_one_bad_input_gets_its_error_the_others_their_captions(server, cli_source, tmp_path):
    bad = tmp_path / "notes.jpg"
    bad.write_text("not an image")
    response = server.post("/v1/captions", **multipart([IMAGES[0], bad, IMAGES[1]]))
    assert response.status_code == 200
    results = response.json()["results"]
    assert [r["input"] for r in results] == [IMAGES[0].name, "notes.jpg", IMAGES[1].name]
    assert results[1]["caption"] is None
    assert results[1]["error"] == "notes.jpg: not an image file (unrecognised format)"  # as `smallcap caption` says
    assert results[0]["caption"] == cli_source[IMAGES[0].name]["caption"]
    assert results[2]["caption"] == cli_source[IMAGES[1].name]["caption"]
    only_bad = server.post("/v1/captions", **multipart([bad]))
    assert only_bad.status_code == 415 and "notes.jpg" in only_bad.json()["detail"]


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow warns while reading the header
def test_limits_and_invalid_options(server):
    big = server.post("/v1/captions", files=[("files", ("big.jpg", b"\0" * (3 * 1024 * 1024), "image/jpeg"))])
    assert big.status_code == 413
    bomb = io.BytesIO()
    Image.new("1", (12000, 12000)).save(bomb, format="PNG")  # 144 Mpixel, a few kB compressed
    bombed = server.post("/v1/captions", files=[("files", ("bomb.png", bomb.getvalue(), "image/png"))])
    assert bombed.status_code == 413 and "bomb.png" in bombed.json()["detail"]
    unknown = server.post("/v1/captions", **multipart(IMAGES[:1], datastores="coco"))
    assert unknown.status_code == 404
    assert "coco" in unknown.json()["detail"] and "mini-source, mini-target" in unknown.json()["detail"]
    for field, value in [("k", "0"), ("num_beams", "99"), ("max_new_tokens", "many")]:
        invalid = server.post("/v1/captions", **multipart(IMAGES[:1], **{field: value}))
        assert invalid.status_code == 422 and field in invalid.json()["detail"], invalid.text
    assert server.post("/v1/captions", json={"images": []}).status_code == 422
    assert server.post("/v1/captions", json={"images": [{"name": "x", "data": "!!"}]}).status_code == 422
    assert server.post("/v1/captions", content=b"hello", headers={"content-type": "text/plain"}).status_code == 415
    full = server.post("/v1/captions", **multipart(IMAGES[:MAX_QUEUE + 1]))
    assert full.status_code == 503 and full.headers["retry-after"] == "1"
    assert server.get("/health").status_code == 200  # still serving


def test_metrics_in_prometheus_text(server):
    server.post("/v1/captions", **multipart(IMAGES[:1], k="0"))
    response = server.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert metric(text, "smallcap_http_requests_total", route="/v1/captions", status="422") >= 1
    assert metric(text, "smallcap_ready") == 1
    assert "smallcap_queue_depth 0.0" in text
    assert metric(text, "smallcap_batch_size_count") >= 1
    assert 'smallcap_stage_seconds_bucket{le="+Inf",stage="decode"}' in text


def test_health_is_503_until_the_model_is_loaded(engine):
    loaded = threading.Event()
    app = create_app(lambda: (loaded.wait(60), engine)[1])
    with live_server(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        assert client.get("/health").json()["status"] == "loading"
        early = client.post("/v1/captions", **multipart(IMAGES[:1]))
        assert early.status_code == 503 and "loading" in early.json()["detail"] and early.headers["retry-after"]
        loaded.set()
        wait_ready(client, timeout=30)
        assert client.post("/v1/captions", **multipart(IMAGES[:1])).status_code == 200


def test_concurrent_clients_are_batched_and_get_the_captions_they_would_get_alone(server, cli_source):
    before = server.get("/metrics").text
    paths = IMAGES[:6]
    url = str(server.base_url)

    def one(path):
        with httpx.Client(base_url=url, timeout=120) as client:
            return client.post("/v1/captions", **multipart([path])).json()["results"][0]

    def impatient():  # disconnects before its answer; must not disturb the others' batch
        with httpx.Client(base_url=url, timeout=0.05) as client:
            try:
                client.post("/v1/captions", **multipart([IMAGES[7]]))
            except httpx.TimeoutException:
                return "gave up"
        return "answered"

    with ThreadPoolExecutor(len(paths) + 1) as pool:
        futures = [pool.submit(one, path) for path in paths] + [pool.submit(impatient)]
        health = server.get("/health", timeout=5)  # answered while the batch decodes
        results = [f.result(timeout=120) for f in futures[:-1]]
        futures[-1].result(timeout=120)
    assert health.status_code == 200
    assert [r["caption"] for r in results] == [cli_source[p.name]["caption"] for p in paths]
    after = server.get("/metrics").text
    batches = metric(after, "smallcap_batch_size_count") - metric(before, "smallcap_batch_size_count")
    images = metric(after, "smallcap_batch_size_sum") - metric(before, "smallcap_batch_size_sum")
    assert images >= len(paths) and batches < len(paths), (batches, images)  # some requests shared a batch
    assert server.post("/v1/captions", **multipart(IMAGES[:1])).json()["results"][0]["caption"] == \
        cli_source[IMAGES[0].name]["caption"]


def test_openapi_documents_the_api(server):
    schema = server.get("/openapi.json").json()
    assert {"/v1/captions", "/v1/datastores", "/v1/model", "/health", "/metrics"} <= set(schema["paths"])
    body = schema["paths"]["/v1/captions"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/json"} <= set(body)
    assert "CaptionJSONRequest" in schema["components"]["schemas"]
    assert server.get("/docs").status_code == 200


def test_a_video_upload_is_captioned_as_the_api_captions_the_file(server, engine, tmp_path):
    pytest.importorskip("av", reason="needs the video extra")
    import numpy as np
    from test_video import write_clip

    frames = [np.asarray(Image.open(p).convert("RGB").resize((160, 120))) for p in IMAGES[:4] for _ in range(6)]
    clip = tmp_path / "clip.mp4"
    write_clip(clip, "libx264", frames, fps=12)
    expected = api_captions(engine, [clip], ["mini-source"])["clip.mp4"]
    files = [("files", ("clip.mp4", clip.read_bytes(), "video/mp4"))]
    result = server.post("/v1/captions", files=files).json()["results"][0]
    assert result["error"] is None and result["caption"] == expected["caption"]
    assert [r["caption"] for r in result["retrieved"]] == expected["retrieved"]
