"""Reading a caption request: multipart uploads or JSON with base64, size limits, options, image decoding.

Problems with the request as a whole raise `RequestError(status, message)`; an input that cannot be read
becomes that input's error message, worded as `smallcap caption` words it with the upload's file name.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from pydantic import BaseModel, Field, ValidationError

from smallcap.errors import SmallCapError
from smallcap.images import DEFAULT_MAX_IMAGE_PIXELS, decode_image, load_image

MAX_K, MAX_BEAMS, MAX_NEW_TOKENS = 50, 10, 100


class RequestError(Exception):
    """A request that cannot be served as a whole: an HTTP status and a message for the client."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


class EncodedImage(BaseModel):
    """One input in a JSON request: its file name (used in results and errors) and its bytes in base64."""

    name: str = Field(default="image", max_length=255)
    data: str = Field(description="the file's bytes, base64-encoded")


class CaptionOptions(BaseModel):
    """Per-request retrieval and decoding options (multipart: form fields of the same names)."""

    datastores: list[str] | None = Field(
        default=None, description="loaded datastores to combine, or ['none'] for no retrieval (default: the server's)")
    k: int | None = Field(default=None, ge=1, le=MAX_K, description="retrieved captions in the prompt")
    num_beams: int = Field(default=3, ge=1, le=MAX_BEAMS)
    max_new_tokens: int = Field(default=25, ge=1, le=MAX_NEW_TOKENS)


class CaptionJSONRequest(CaptionOptions):
    """The JSON form of `POST /v1/captions`."""

    images: list[EncodedImage] = Field(min_length=1)


@dataclass
class Upload:
    """One uploaded file: the name the client gave it and its bytes."""

    name: str
    data: bytes


async def read_body(request, max_bytes: int) -> bytes:
    """The request body, refusing (413) more than `max_bytes` whether or not Content-Length says so."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise RequestError(413, f"request body is {int(declared)} bytes; the limit is {max_bytes} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise RequestError(413, f"request body exceeds the limit of {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _validation_message(error: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in error.errors())


async def parse_request(request, max_bytes: int) -> tuple[list[Upload], CaptionOptions]:
    """The uploads and options of a caption request, multipart (`files` fields) or JSON (base64)."""
    content_type = request.headers.get("content-type", "")
    body = await read_body(request, max_bytes)
    if content_type.startswith("multipart/form-data"):
        request._body = body  # Starlette parses the form from the body already read
        try:
            form = await request.form(max_files=1000, max_fields=1000, max_part_size=max_bytes)
        except Exception as error:
            raise RequestError(400, f"malformed multipart body: {error}") from None
        uploads = [Upload(getattr(f, "filename", None) or "upload", await f.read())
                   for f in form.getlist("files") if hasattr(f, "read")]
        if not uploads:
            raise RequestError(422, "no files: send the images as repeated multipart fields named 'files'")
        fields = {name: form.get(name) for name in ("k", "num_beams", "max_new_tokens") if form.get(name) not in (None, "")}
        datastores = [str(v) for v in form.getlist("datastores") if str(v).strip()]
        # Several names may come in one field, comma-separated (handy for curl -F).
        datastores = [name.strip() for value in datastores for name in value.split(",") if name.strip()]
        try:
            options = CaptionOptions(**fields, datastores=datastores or None)
        except ValidationError as error:
            raise RequestError(422, _validation_message(error)) from None
        return uploads, options
    if content_type.startswith("application/json"):
        try:
            parsed = CaptionJSONRequest.model_validate(json.loads(body))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise RequestError(400, f"request body is not valid JSON: {error}") from None
        except ValidationError as error:
            raise RequestError(422, _validation_message(error)) from None
        uploads = []
        for image in parsed.images:
            try:
                uploads.append(Upload(image.name, base64.b64decode(image.data, validate=True)))
            except (binascii.Error, ValueError):
                raise RequestError(422, f"{image.name}: 'data' is not valid base64") from None
        return uploads, CaptionOptions(**parsed.model_dump(exclude={"images"}))
    raise RequestError(415, f"unsupported content type {content_type or '(none)'!r}: send multipart/form-data "
                            "with 'files' fields, or application/json with base64 'images'")


def _safe_name(name: str) -> str:
    base = re.split(r"[\\/]", name)[-1]
    return re.sub(r"[^A-Za-z0-9._-]", "_", base)[:100] or "upload"


def decode_uploads(uploads: list[Upload], video_options=None) -> list[Image.Image | str]:
    """Each upload as an RGB image, or the error message `smallcap caption` would give for that file.

    Raises RequestError(413) for an image over the pixel limit of the CLI's loader (a decompression bomb). Still images
    are decoded in memory; anything else (videos, animated GIFs, unreadable data) is written to a private
    temporary directory and read by the CLI's loader, so videos work and errors are worded alike.
    """
    decoded: list[Image.Image | str] = []
    with tempfile.TemporaryDirectory(prefix="smallcap-serve-") as tmp:
        for index, upload in enumerate(uploads):
            image = _still_image(upload)
            decoded.append(image if image is not None else _load_from_file(upload, Path(tmp) / str(index),
                                                                            video_options))
    return decoded


def _still_image(upload: Upload) -> Image.Image | str | None:
    """The upload as an RGB image (or the CLI's error for it) when its header says single-frame still image;
    None for anything else (videos, animated GIFs, unrecognised data), which the CLI's loader then reads."""
    limit = DEFAULT_MAX_IMAGE_PIXELS
    try:
        with Image.open(io.BytesIO(upload.data)) as probe:  # the header only
            width, height = probe.size
            animated = getattr(probe, "n_frames", 1) > 1
    except Image.DecompressionBombError:
        raise RequestError(413, f"{upload.name}: image has more pixels than the limit of {limit} "
                                "(a decompression bomb?)") from None
    except Exception:
        return None
    if limit is not None and width * height > limit:
        raise RequestError(413, f"{upload.name}: {width}x{height} image exceeds the limit of {limit} pixels")
    if animated:
        return None
    try:
        return decode_image(io.BytesIO(upload.data), upload.name)
    except SmallCapError as error:
        return str(error)


def _load_from_file(upload: Upload, directory: Path, video_options) -> Image.Image | str:
    path = directory / _safe_name(upload.name)
    directory.mkdir()
    path.write_bytes(upload.data)
    try:
        return load_image(path, video_options)
    except SmallCapError as error:
        return str(error).replace(str(path), upload.name)
