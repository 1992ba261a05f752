"""`smallcap serve`: an HTTP captioning service (FastAPI + uvicorn) that batches images across requests."""

from __future__ import annotations

import signal
from pathlib import Path

from smallcap.errors import SmallCapError, require_extra
from smallcap.hub import resolve_datastore, resolve_pretrained


def register(subparsers) -> None:
    """Add the `serve` subcommand."""
    from smallcap.cli.caption import add_precision_arguments, check_precision_arguments
    from smallcap.serving.engine import DEFAULT_SERVE_DATASTORES, DEFAULT_SERVE_MODEL

    parser = subparsers.add_parser(
        "serve", help="serve captioning over HTTP (JSON API, metrics, web page)",
        description="Serve a SmallCap model over HTTP: POST /v1/captions, GET /v1/datastores, /v1/model, /health, "
                    "/metrics, the web page at / and the OpenAPI docs at /docs. Images from concurrent requests "
                    "are decoded together; every caption is what `smallcap caption` gives for the same file.")
    parser.add_argument("--model", default=DEFAULT_SERVE_MODEL,
                        help=f"Hub id, checkpoint directory or bundled name (default {DEFAULT_SERVE_MODEL})")
    parser.add_argument("--datastore", action="append", metavar="NAME_OR_DIR",
                        help="load this datastore (repeat for several; the first is the default for requests "
                             "that name none). Default with the mini model: "
                             + " and ".join(DEFAULT_SERVE_DATASTORES))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-batch", type=int, default=16, help="most images decoded together (default 16)")
    parser.add_argument("--max-wait-ms", type=float, default=10.0,
                        help="how long the first image of a batch waits for others (default 10)")
    parser.add_argument("--max-queue", type=int, default=256,
                        help="images allowed to wait; beyond that requests get 503 (default 256)")
    parser.add_argument("--max-upload-mb", type=float, default=20.0, help="largest request body (default 20)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    add_precision_arguments(parser)
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    parser.set_defaults(func=run, validate=check_precision_arguments)


def validate(args) -> None:
    """Check the options before loading anything."""
    for name, value, low in (("--max-batch", args.max_batch, 1), ("--max-queue", args.max_queue, 1),
                             ("--port", args.port, 0)):
        if value < low:
            raise SmallCapError(f"{name} must be at least {low} (got {value})")
    if args.max_wait_ms < 0 or args.max_upload_mb <= 0:
        raise SmallCapError("--max-wait-ms must be >= 0 and --max-upload-mb > 0")
    for datastore in args.datastore or []:
        if not (Path(resolve_datastore(datastore)) / "manifest.json").is_file():
            raise SmallCapError(f"datastore {datastore!r} is not a datastore directory (no manifest.json)")
    resolve_pretrained(args.model)


def run(args) -> int:
    """Start the server; returns 0 after a clean shutdown (SIGINT/SIGTERM drain in-flight requests)."""
    for module in ("fastapi", "uvicorn", "multipart", "prometheus_client"):
        require_extra(module, "serve", "Serving over HTTP (smallcap serve)")
    validate(args)
    import uvicorn

    from smallcap.serving.app import create_app
    from smallcap.serving.engine import Engine

    failure: list[BaseException] = []

    def load_error(error: BaseException) -> None:
        failure.append(error)
        server.should_exit = True

    app = create_app(lambda: Engine.load(args.model, args.datastore, args.device, dtype=args.dtype,
                                         quantize=args.quantize), max_batch=args.max_batch,
                     max_wait_ms=args.max_wait_ms, max_queue=args.max_queue, max_upload_mb=args.max_upload_mb,
                     on_load_error=load_error)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                           timeout_graceful_shutdown=60))
    # uvicorn drains in-flight requests on SIGTERM, then re-raises the signal to the handler it replaced;
    # a no-op handler there makes a drained shutdown exit with status 0.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    server.run()
    if failure:
        error = failure[0]
        raise error if isinstance(error, SmallCapError) else SmallCapError(f"could not load the model: {error}")
    return 0
