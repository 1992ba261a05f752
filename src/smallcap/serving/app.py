"""The FastAPI application: caption API, model and datastore info, health, Prometheus metrics, the web page.

`create_app(load_engine, ...)` returns an app that loads the engine in a background thread at start-up
(`/health` says 503 "loading" until it is ready) and serves batched captioning through a `Batcher`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel

from smallcap.errors import SmallCapError
from smallcap.hub import BUNDLED_SAMPLES
from smallcap.serving.batcher import Batcher, QueueFullError
from smallcap.serving.engine import Engine, Job
from smallcap.serving.uploads import CaptionJSONRequest, RequestError, decode_uploads, parse_request

STATIC_DIR = Path(__file__).resolve().parent / "static"
log = logging.getLogger("smallcap.serve")


class RetrievedCaption(BaseModel):
    """A retrieved caption, its cosine similarity to the image, and the id of the image it describes."""

    caption: str
    score: float
    source_id: str


class CaptionResult(BaseModel):
    """The result for one input, in input order: a caption or an error."""

    input: str
    caption: str | None
    retrieved: list[RetrievedCaption]
    error: str | None
    timings_ms: dict[str, float]


class CaptionResponse(BaseModel):
    """Response of `POST /v1/captions`."""

    results: list[CaptionResult]


class Metrics:
    """The server's Prometheus metrics, in a registry of its own (several apps may live in one process)."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("smallcap_http_requests", "HTTP requests by route and status",
                                ["route", "status"], registry=self.registry)
        self.latency = Histogram("smallcap_http_request_duration_seconds", "HTTP request latency by route",
                                 ["route"], registry=self.registry,
                                 buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60))
        self.batch_size = Histogram("smallcap_batch_size", "images decoded together in one batch",
                                    registry=self.registry, buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128, 256))
        self.queue_depth = Gauge("smallcap_queue_depth", "images waiting for a batch", registry=self.registry)
        self.images = Counter("smallcap_images", "inputs by outcome (captioned or error)", ["outcome"],
                              registry=self.registry)
        self.stage = Histogram("smallcap_stage_seconds", "per-image time in each stage", ["stage"],
                               registry=self.registry,
                               buckets=(.001, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
        self.ready = Gauge("smallcap_ready", "1 once the model is loaded", registry=self.registry)


def _route_label(request: Request) -> str:
    route = request.scope.get("route")
    return getattr(route, "path", None) or "unmatched"


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": message}, status_code=status, headers=headers)


_CAPTIONS_BODY = {
    "requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": {"type": "object", "required": ["files"], "properties": {
            "files": {"type": "array", "items": {"type": "string", "format": "binary"}},
            "datastores": {"type": "array", "items": {"type": "string"}},
            "k": {"type": "integer"}, "num_beams": {"type": "integer"}, "max_new_tokens": {"type": "integer"}}}},
        "application/json": {"schema": {"$ref": "#/components/schemas/CaptionJSONRequest"}},
    }}}


def create_app(load_engine: Callable[[], Engine], *, max_batch: int = 16, max_wait_ms: float = 10.0,
               max_queue: int = 256, max_upload_mb: float = 20.0,
               on_load_error: Callable[[BaseException], None] | None = None) -> FastAPI:
    """The serving app; `load_engine` runs in a worker thread at start-up."""
    metrics = Metrics()
    state: dict = {"engine": None, "batcher": None, "error": None}
    max_bytes = int(max_upload_mb * 1024 * 1024)

    async def load() -> None:
        try:
            engine = await asyncio.to_thread(load_engine)
        except BaseException as error:  # reported on /health and to the CLI, which exits
            state["error"] = f"{type(error).__name__}: {error}" if not isinstance(error, SmallCapError) else str(error)
            log.error("could not load the model: %s", state["error"])
            if on_load_error is not None:
                on_load_error(error)
            return
        batcher = Batcher(engine.caption, max_batch, max_wait_ms, max_queue,
                          on_batch=metrics.batch_size.observe)
        metrics.queue_depth.set_function(lambda: batcher.depth)
        batcher.start()
        state["engine"], state["batcher"] = engine, batcher
        metrics.ready.set(1)
        log.info("model loaded; ready")

    async def lifespan(app: FastAPI):
        loader = asyncio.create_task(load())
        yield
        loader.cancel()
        if state["batcher"] is not None:
            await state["batcher"].stop()

    app = FastAPI(title="smallcap", version="1", lifespan=lifespan,
                  description="Retrieval-augmented image captioning (SmallCap) with cross-request batching.")

    def openapi() -> dict:
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            json_schema = CaptionJSONRequest.model_json_schema(ref_template="#/components/schemas/{model}")
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components.update(json_schema.pop("$defs", {}))
            components["CaptionJSONRequest"] = json_schema
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi

    @app.middleware("http")
    async def count_requests(request: Request, call_next):
        start = time.perf_counter()
        response = await call_next(request)
        route = _route_label(request)
        metrics.requests.labels(route, str(response.status_code)).inc()
        metrics.latency.labels(route).observe(time.perf_counter() - start)
        return response

    def ready_engine() -> Engine:
        if state["engine"] is None:
            raise RequestError(503, "the model is still loading" if state["error"] is None
                               else f"the model failed to load: {state['error']}", {"Retry-After": "5"})
        return state["engine"]

    @app.exception_handler(RequestError)
    async def request_error(request: Request, error: RequestError):
        return _error(error.status, error.message, error.headers)

    @app.post("/v1/captions", response_model=CaptionResponse, openapi_extra=_CAPTIONS_BODY,
              summary="Caption images or videos (multipart 'files' or JSON base64)")
    async def captions(request: Request):
        """Caption the inputs, in order; an unreadable input gets its `error`, the others their captions."""
        started = time.perf_counter()
        engine = ready_engine()
        uploads, options = await parse_request(request, max_bytes)
        try:
            names = engine.check_datastores(options.datastores or engine.default_datastores or ["none"])
        except KeyError as unknown:
            loaded = ", ".join(engine.stores) or "(none)"
            raise RequestError(404, f"unknown datastore(s) {unknown.args[0]}; loaded: {loaded}; "
                                    "or 'none' for no retrieval") from None
        except SmallCapError as error:
            raise RequestError(422, str(error)) from None
        k = options.k or engine.captioner.k
        images = await run_in_threadpool(decode_uploads, uploads, engine.captioner.video)
        if all(isinstance(image, str) for image in images):
            raise RequestError(415, "no input is an image or video: " + "; ".join(images))
        jobs = [Job(image, names, k, options.num_beams, options.max_new_tokens)
                for image in images if not isinstance(image, str)]
        try:
            done = iter(await state["batcher"].submit(jobs))
        except QueueFullError as error:
            raise RequestError(503, f"server busy: {error}; retry shortly", {"Retry-After": "1"}) from None
        results = []
        for upload, image in zip(uploads, images):
            if isinstance(image, str):
                metrics.images.labels("error").inc()
                results.append(CaptionResult(input=upload.name, caption=None, retrieved=[], error=image,
                                             timings_ms={}))
                continue
            result, queued = next(done)
            timings = {"queue": queued * 1e3, **result.timings_ms}
            for stage, ms in timings.items():
                metrics.stage.labels(stage).observe(ms / 1e3)
            metrics.images.labels("captioned").inc()
            results.append(CaptionResult(input=upload.name, caption=result.caption, error=None,
                                         retrieved=[RetrievedCaption(**vars(r)) for r in result.retrieved],
                                         timings_ms=timings))
        total = (time.perf_counter() - started) * 1e3
        for result in results:
            result.timings_ms["total"] = total
        return CaptionResponse(results=results)

    @app.get("/v1/datastores", summary="The loaded datastores")
    async def datastores():
        """Name, encoder, number of captions and whether it is a default, per datastore."""
        return {"datastores": ready_engine().datastore_info()}

    @app.get("/v1/model", summary="The loaded model and the server's settings")
    async def model():
        """Model name, size and defaults, plus the batching and upload limits."""
        return {**ready_engine().model_info(), "max_batch": max_batch, "max_wait_ms": max_wait_ms,
                "max_queue": max_queue, "max_upload_mb": max_upload_mb}

    @app.get("/health", summary="200 once the model is loaded, 503 before")
    async def health():
        """Readiness: `ready`, `loading` or `failed` (with the error)."""
        if state["engine"] is not None:
            return {"status": "ready"}
        status = "loading" if state["error"] is None else "failed"
        return JSONResponse({"status": status, "error": state["error"]}, status_code=503,
                            headers={"Retry-After": "5"})

    @app.get("/metrics", summary="Prometheus metrics")
    async def prometheus():
        """Requests by route and status, latencies, batch sizes, queue depth, stage timings."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/samples", summary="Sample images for the web page")
    async def samples():
        """File names of the bundled sample images (served under /samples/)."""
        return {"samples": sorted(p.name for p in BUNDLED_SAMPLES.glob("*.png"))}

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC_DIR / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    if BUNDLED_SAMPLES.is_dir():
        app.mount("/samples", StaticFiles(directory=BUNDLED_SAMPLES), name="samples")
    app.state.metrics = metrics
    app.state.serving = state
    return app
