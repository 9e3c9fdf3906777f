"""``face-search serve``: the HTTP search service (FastAPI, run by uvicorn).

A thin layer over :class:`search.searcher.Searcher`:

- the gallery and the models are loaded once, at start-up (``/readyz`` turns
  200 when every stage's model is loaded, in every search thread);
- inference runs in ``concurrency`` worker threads, off the event loop; other
  requests wait their turn;
- a pure ASGI guard checks the token and the body size before anything reads the
  body: 401 at once, 413 for a declared or streamed body over the route's limit;
- limits (body bytes, image pixels, k, vectors) answer 413 / 422 with a message
  that names the field;
- any :class:`facesearch.errors.FaceSearchError` answers its ``http_status``
  with ``{"detail": <its one-line message>}``;
- ``FACESEARCH_API_TOKEN``, when set, is the bearer token every ``/v1`` call needs;
- one structured (JSON) log line per request, never image content.

:func:`create_app` reads as the list of its steps: a :class:`ServiceState`
that the lifespan fills, then one function per group of routes.
"""

import asyncio
import functools
import hmac
import json
import logging
import math
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, Sequence

import numpy as np

from data.images import ImageLoadError, ImageTooLargeError, load_image_bytes
from facesearch.errors import FaceSearchError, NotFoundError
from search.gallery import Gallery
from search.html import encode_jpeg
from search.live import LiveSearch, Snapshot
from search.searcher import Searcher

log = logging.getLogger("facesearch.service")
access_log = logging.getLogger("facesearch.access")

TOKEN_ENV = "FACESEARCH_API_TOKEN"
MULTIPART_OVERHEAD = 64 * 1024  # part headers and form fields around an upload
OTHER_BODY_BYTES = 64 * 1024  # routes that take no body
MAX_VECTORS = 1000  # per /v1/search/vector request: more is a 413
INLINE_JSON_BYTES = 256 * 1024  # larger JSON bodies are parsed in a worker thread, a few rows per call
ROWS_PER_PIECE = 32  # rows of a large vector query validated per call (under 2 ms)


@dataclass(frozen=True)
class ServiceSettings:
    gallery: str
    max_upload_bytes: int = 10 * 2**20  # larger uploads: 413
    max_json_bytes: int = 16 * 2**20  # larger JSON bodies: 413 (1000 512-D vectors take about 12 MB)
    max_pixels: int = 40_000_000  # larger images are refused before decoding: 413
    max_k: int = 100  # k outside 1..max_k: 422
    concurrency: int | None = None  # searches running at once; None: the core count (more threads gain nothing)
    token: str | None = None  # None: read TOKEN_ENV; empty: no authentication
    read_only: bool = False  # True: no write routes even with a token (without a token there are none anyway)
    reload_interval: float = 1.0  # seconds between checks for a gallery changed by another process

    def search_slots(self) -> int:
        """``concurrency``, or the core count of this machine when it is None."""
        return self.concurrency if self.concurrency is not None else max(1, os.cpu_count() or 1)

    def api_token(self) -> str:
        """The bearer token the ``/v1`` routes need; empty: none."""
        return self.token if self.token is not None else os.environ.get(TOKEN_ENV, "")

    def writes_enabled(self) -> bool:
        """Enrolment and deletion are served only behind a token, and not when ``read_only``."""
        return bool(self.api_token()) and not self.read_only

    def body_limits(self) -> dict[tuple[str, str], int]:
        """The largest request body per (method, path); other routes: OTHER_BODY_BYTES."""
        upload = self.max_upload_bytes + MULTIPART_OVERHEAD
        return {("POST", "/v1/search"): upload, ("POST", "/v1/faces"): upload,
                ("POST", "/v1/search/vector"): self.max_json_bytes}


class NotReadyError(FaceSearchError):
    """A request that needs the gallery came before the lifespan loaded it."""

    http_status = 503


class ServiceState:
    """What the routes share: the searcher and thumbnails once loaded, and the inference threads."""

    def __init__(self, concurrency: int) -> None:
        self.concurrency = concurrency
        self.ready = False
        self.warm: dict[str, float] = {}  # seconds each pipeline stage took to load and run once
        self._live: LiveSearch | None = None
        self._slots = asyncio.Semaphore(concurrency)
        # the searches' own threads: dlib's models are loaded per thread, so warming these warms every search
        self._executor = ThreadPoolExecutor(concurrency, thread_name_prefix="facesearch-search")
        self.writer = asyncio.Lock()  # one change at a time from this process (the gallery's lock covers others)

    async def load(self, gallery: str, reload_interval: float) -> Searcher:
        """Open the gallery and load every stage's model (detector, landmarks, embedder) in every
        search thread, off the event loop; then follow the gallery's changes every ``reload_interval`` s."""
        searcher = await asyncio.to_thread(Searcher, gallery)
        self.warm = await self._warm_up(searcher.pipeline)
        self._live = LiveSearch(searcher)
        self._live.watch(reload_interval)
        self.ready = True
        return searcher

    async def _warm_up(self, pipeline: Any) -> dict[str, float]:
        """``pipeline.warm_up()`` once in each of the ``concurrency`` search threads, all at once.
        Returns the slowest seconds per stage."""
        barrier = threading.Barrier(self.concurrency, timeout=300)

        def warm() -> dict[str, float]:
            barrier.wait()  # every task waits for the others, so each runs in its own thread
            return pipeline.warm_up()

        loop = asyncio.get_running_loop()
        runs = await asyncio.gather(*(loop.run_in_executor(self._executor, warm) for _ in range(self.concurrency)))
        return {stage: round(max(run[stage] for run in runs), 3) for stage in runs[0]}

    def close(self) -> None:
        self.ready = False
        if self._live is not None:
            self._live.stop()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def live(self) -> LiveSearch:
        """The loaded gallery; NotReadyError (503) while it is loading."""
        if not self.ready or self._live is None:
            raise NotReadyError("the gallery is still loading")
        return self._live

    def searcher(self) -> Searcher:
        return self.live().searcher

    def snapshot(self) -> Snapshot:
        """The current generation: answer a whole request from it."""
        return self.live().snapshot()

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` in a search thread, once one of the ``concurrency`` slots is free."""
        async with self._slots:
            return await asyncio.get_running_loop().run_in_executor(self._executor, functools.partial(fn, *args))


def _matches(result: Sequence[Any], threshold: float | None) -> list[dict[str, Any]]:
    return [m.to_dict() for m in result if threshold is None or m.cosine >= threshold]


def create_app(settings: ServiceSettings):  # noqa: ANN201 - FastAPI is an optional dependency
    """The FastAPI app. Importing FastAPI happens here (and in the add_* steps), so the library works without it."""
    from fastapi import Depends, FastAPI

    token = settings.api_token()
    state = ServiceState(settings.search_slots())
    offline_docs = _swagger_assets()
    app = FastAPI(
        title="facesearch", version="1", lifespan=_lifespan(settings, state, authenticated=bool(token)),
        description="Face search over a gallery: who looks like this face?",
        docs_url=None if offline_docs else "/docs",
    )
    if offline_docs:
        add_offline_docs(app, offline_docs)
    add_request_guard(app, settings, token)  # added before the access log, so it runs inside it
    add_access_log(app)  # outermost: logs the guard's refusals too
    keep_uploads_in_memory(settings.max_upload_bytes + MULTIPART_OVERHEAD)
    add_error_handler(app)
    auth = [Depends(bearer_auth(token))]  # the guard has checked already; the routes check again
    add_health_routes(app, state)
    add_search_routes(app, state, settings, auth)
    add_face_routes(app, state, auth)
    if settings.writes_enabled():
        add_write_routes(app, state, settings, auth)
    return app


def _lifespan(settings: ServiceSettings, state: ServiceState, authenticated: bool):  # noqa: ANN202
    """Load the gallery and the models before the first request; not ready again after shutdown."""

    @asynccontextmanager
    async def lifespan(app):  # noqa: ANN001, ANN202
        start = time.perf_counter()
        searcher = await state.load(settings.gallery, settings.reload_interval)
        log.info(json.dumps({"event": "ready", "gallery": settings.gallery, "faces": len(searcher.gallery),
                             "generation": searcher.gallery.generation, "seconds": round(time.perf_counter() - start, 2),
                             "warm": state.warm, "threads": state.concurrency,
                             "auth": authenticated, "writes": settings.writes_enabled()}))
        yield
        state.close()

    return lifespan


def _token_matches(authorization: str, token: str) -> bool:
    """``Authorization: Bearer <token>``, compared in constant time."""
    scheme, _, given = authorization.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


def bearer_auth(token: str):  # noqa: ANN201
    """The dependency the ``/v1`` routes need: 401 unless ``Authorization: Bearer <token>`` (no check when empty)."""
    from fastapi import HTTPException, Request

    def authorise(request: Request) -> None:
        if token and not _token_matches(request.headers.get("authorization", ""), token):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    return authorise


# ASGI callables (no FastAPI needed to define them)
Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class BodyTooLargeError(Exception):
    """A streamed request body went past its route's limit (the guard answers 413)."""


async def _send_json(send: Send, status: int, detail: str, headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


def _declared_length(headers: dict[bytes, bytes]) -> int | None:
    try:
        return int(headers[b"content-length"])
    except (KeyError, ValueError):
        return None


class RequestGuard:
    """Pure ASGI middleware that runs before anything reads a request's body.

    1. ``/v1`` without the bearer token: 401 at once.
    2. A declared ``Content-Length`` over the route's limit: 413 at once.
    3. A streamed (chunked) body is counted as it is read: 413 as soon as it passes the limit.

    Each refusal of a request whose body was not read carries ``Connection: close``, so
    the server stops reading that connection instead of taking in the rest of the body.
    """

    def __init__(self, app: Callable[..., Awaitable[None]], token: str, limits: dict[tuple[str, str], int],
                 default_limit: int = OTHER_BODY_BYTES) -> None:
        self.app = app
        self.token = token
        self.limits = limits
        self.default_limit = default_limit

    def limit(self, method: str, path: str) -> int:
        return self.limits.get((method, path.rstrip("/") or "/"), self.default_limit)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        declared = _declared_length(headers)
        with_body = bool(declared) or b"transfer-encoding" in headers
        close = [(b"connection", b"close")] if with_body else []
        path = scope["path"]
        if self.token and (path == "/v1" or path.startswith("/v1/")) and not _token_matches(
                headers.get(b"authorization", b"").decode("latin-1"), self.token):
            await _send_json(send, 401, "missing or wrong bearer token", [(b"www-authenticate", b"Bearer"), *close])
            return
        limit = self.limit(scope["method"], path)
        if declared is not None and declared > limit:
            await _send_json(send, 413, f"request body of {declared} bytes is over the limit of {limit} bytes "
                                        f"for {scope['method']} {path}", close)
            return
        received = 0
        refused = False  # the app's answer is replaced by a 413

        async def counted() -> dict[str, Any]:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLargeError(f"request body over the limit of {limit} bytes for {scope['method']} {path}")
            return message

        async def guarded_send(message: dict[str, Any]) -> None:
            nonlocal refused
            if refused:
                return
            if message["type"] == "http.response.start" and received > limit:
                refused = True  # whatever the app made of the error (a 400 from FastAPI's body parser, ...)
                await _send_json(send, 413, f"request body over the limit of {limit} bytes for "
                                            f"{scope['method']} {path}", [(b"connection", b"close")])
                return
            await send(message)

        try:
            await self.app(scope, counted, guarded_send)
        except BodyTooLargeError as err:
            if not refused:
                await _send_json(send, 413, str(err), [(b"connection", b"close")])


def add_request_guard(app, settings: ServiceSettings, token: str) -> None:  # noqa: ANN001
    """Token first, then the body limits, before any route reads or parses the body (:class:`RequestGuard`)."""
    app.add_middleware(RequestGuard, token=token, limits=settings.body_limits())


def keep_uploads_in_memory(limit: int) -> None:
    """Starlette spools multipart files over 1 MB to a temporary file; the guard caps bodies at
    ``limit``, so raising the spool size to it keeps every upload (a photo) in memory. The
    setting is Starlette's, for the process: it only ever grows."""
    from starlette.formparsers import MultiPartParser

    MultiPartParser.spool_max_size = max(MultiPartParser.spool_max_size, limit)


def _field(loc: Sequence[Any]) -> str:
    """("body", "vectors", 3, 0) -> "vectors[3][0]"."""
    parts = list(loc[1:] if loc and loc[0] in ("body", "query", "path", "header", "cookie") else loc)
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


def validation_message(errors: Sequence[dict[str, Any]], shown: int = 3) -> str:
    """Pydantic / FastAPI validation errors as one line that names each field."""
    text = "; ".join(f"{_field(e.get('loc', ()))}: {e.get('msg', 'invalid')}" for e in errors[:shown])
    return text + (f" (and {len(errors) - shown} more)" if len(errors) > shown else "")


def add_error_handler(app) -> None:  # noqa: ANN001
    """Answer every FaceSearchError with its ``http_status`` and ``{"detail": <its message>}``, and
    a request that fails validation with 422 and one line naming the field(s)."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    async def face_search_error(request, err: FaceSearchError) -> JSONResponse:  # noqa: ANN001
        return JSONResponse({"detail": str(err)}, status_code=err.http_status)

    async def invalid_request(request, err: RequestValidationError) -> JSONResponse:  # noqa: ANN001
        return JSONResponse({"detail": validation_message(err.errors())}, status_code=422)

    app.add_exception_handler(FaceSearchError, face_search_error)
    app.add_exception_handler(RequestValidationError, invalid_request)


class AccessLog:
    """Pure ASGI: one JSON line per request on ``facesearch.access``: method, path, status, ms,
    bytes read, bytes declared, client. Never the body."""

    def __init__(self, app: Callable[..., Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500
        bytes_in = 0

        async def counted() -> dict[str, Any]:
            nonlocal bytes_in
            message = await receive()
            bytes_in += len(message.get("body", b""))
            return message

        async def noted(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, counted, noted)
        finally:
            client = scope.get("client")
            access_log.info(json.dumps({
                "method": scope["method"], "path": scope["path"], "status": status,
                "ms": round(1000 * (time.perf_counter() - start), 1), "bytes_in": bytes_in,
                "declared": _declared_length(dict(scope["headers"])), "client": client[0] if client else None,
            }))


def add_access_log(app) -> None:  # noqa: ANN001
    app.add_middleware(AccessLog)


def add_offline_docs(app, assets: Path) -> None:  # noqa: ANN001
    """``/docs`` from the swagger-ui-bundle package's files, so it works without the internet."""
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.responses import Response
    from fastapi.staticfiles import StaticFiles

    # the bundled Swagger UI (4.x) reads OpenAPI 3.0 documents, not 3.1; the schema is the same
    app.openapi_version = "3.0.3"
    app.mount("/static/swagger", StaticFiles(directory=str(assets)), name="swagger")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> Response:
        return get_swagger_ui_html(openapi_url=app.openapi_url, title="facesearch API",
                                   swagger_js_url="/static/swagger/swagger-ui-bundle.js",
                                   swagger_css_url="/static/swagger/swagger-ui.css",
                                   swagger_favicon_url="/static/swagger/favicon-32x32.png")


def add_health_routes(app, state: ServiceState) -> None:  # noqa: ANN001
    from fastapi.responses import JSONResponse

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        """The process is up."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"])
    async def readyz() -> JSONResponse:
        """The gallery and every stage's model are loaded: 200, else 503. ``warm``: seconds each
        stage took to load and run once at start-up, in every search thread."""
        if not state.ready:
            return JSONResponse({"status": "loading"}, status_code=503)
        snap = state.snapshot()
        return JSONResponse({"status": "ready", "faces": len(snap.gallery), "generation": snap.generation,
                             "warm": state.warm, "threads": state.concurrency})


def add_search_routes(app, state: ServiceState, settings: ServiceSettings, auth: list) -> None:  # noqa: ANN001
    """``/v1/search`` (an image) and ``/v1/search/vector`` (embeddings), with their limits."""
    from fastapi import File, Form, HTTPException, Request, Response, UploadFile
    from fastapi.responses import JSONResponse

    def check_k(k: int) -> None:
        if not 1 <= k <= settings.max_k:
            raise HTTPException(422, f"k must be between 1 and {settings.max_k}, got {k}")

    def check_threshold(threshold: float | None) -> None:
        if threshold is not None and not (math.isfinite(threshold) and -1.0 <= threshold <= 1.0):
            raise HTTPException(422, f"threshold must be a finite number between -1 and 1, got {threshold}")

    @app.post("/v1/search", dependencies=auth, tags=["search"])
    async def search(
        request: Request,
        image: UploadFile = File(..., description="The query image (JPEG, PNG, ...)."),
        k: int = Form(8, description="Matches per face."),
        threshold: float | None = Form(None, description="Drop matches with a lower cosine (-1 to 1)."),
    ) -> dict[str, Any]:
        """Every face of the image (largest first) with its k nearest gallery faces."""
        check_k(k)
        check_threshold(threshold)
        declared = int(request.headers.get("content-length") or 0)
        if declared > settings.max_upload_bytes + MULTIPART_OVERHEAD:
            raise HTTPException(413, f"upload of {declared} bytes is over the limit of {settings.max_upload_bytes}")
        data = await image.read(settings.max_upload_bytes + 1)
        if len(data) > settings.max_upload_bytes:
            raise HTTPException(413, f"image is over the upload limit of {settings.max_upload_bytes} bytes")
        s, snap = state.searcher(), state.snapshot()
        pixels = await _decode(state, data, settings.max_pixels)
        results = await state.run(s.search, pixels, k, snap.gallery)
        faces = []
        for r in results:
            face = r.to_dict()
            face["matches"] = _matches(r.matches, threshold)
            faces.append(face)
        calibration = snap.gallery.calibration
        return {"faces": faces, "image": {"width": int(pixels.shape[1]), "height": int(pixels.shape[0])},
                "calibration": calibration.to_dict() if calibration else None, "generation": snap.generation}

    body_schema = {"required": True,
                   "content": {"application/json": {"schema": vector_query_model().model_json_schema()}}}

    @app.post("/v1/search/vector", dependencies=auth, tags=["search"], response_class=JSONResponse,
              openapi_extra={"requestBody": body_schema})
    async def search_vector(request: Request) -> Response:
        """The k nearest gallery faces of each embedding."""
        body = await request.body()  # at most max_json_bytes: the guard refused more before it was read
        if len(body) <= INLINE_JSON_BYTES:
            query, vectors = parse_vector_query(body)
        else:  # in a worker thread, a row at a time: other requests are served meanwhile
            query, vectors = await asyncio.to_thread(parse_vector_query, body)
        check_k(query.k)
        check_threshold(query.threshold)
        if len(vectors) > MAX_VECTORS:
            raise HTTPException(413, f"at most {MAX_VECTORS} vectors per request, got {len(vectors)}")
        s, snap = state.searcher(), state.snapshot()

        def answer() -> Response:  # search and encode in a search thread, a row at a time
            # ConfigurationError (422) names a ragged, mis-sized, non-finite or all-zero row
            results = s.search_vectors(vectors, query.k, snap.gallery) if len(vectors) else []
            rows = ",".join(json.dumps(_matches(r, query.threshold), separators=(",", ":")) for r in results)
            return Response(f'{{"results":[{rows}],"generation":{snap.generation}}}'.encode(),
                            media_type="application/json")

        return await state.run(answer)


@functools.cache
def vector_query_model():  # noqa: ANN201 - pydantic is imported here, with FastAPI
    """The body of ``/v1/search/vector``: strict numbers (no booleans, strings, NaN or infinity), k an integer."""
    from typing import Annotated

    from pydantic import BaseModel, FailFast, Field, Strict, StrictInt

    class VectorQuery(BaseModel):
        vectors: Annotated[list[Annotated[list[Annotated[float, Strict(), Field(allow_inf_nan=False)]], FailFast()]],
                           FailFast()] = Field(
            ..., description=f"Embeddings, one per row (normalised by the service), at most {MAX_VECTORS}.")
        k: StrictInt = Field(8, description="Matches per vector.")
        threshold: Annotated[float, Strict()] | None = Field(None, description="Drop matches with a lower cosine (-1 to 1).")

    return VectorQuery


@functools.cache
def _rows_adapter():  # noqa: ANN202
    from pydantic import TypeAdapter

    return TypeAdapter(vector_query_model().model_fields["vectors"].annotation)


def parse_vector_query(body: bytes) -> tuple[Any, np.ndarray | list]:
    """The query (a ``vector_query_model()``) and its vectors: HTTPException 422 naming the field.

    A body over INLINE_JSON_BYTES is validated ROWS_PER_PIECE rows per call, and its vectors
    come back as an array: json's and pydantic's C code holds the GIL for a whole call (about
    5 ms per MB), so one call on 16 MB would stall the event loop even from a worker thread.
    """
    from fastapi import HTTPException
    from pydantic import ValidationError

    model = vector_query_model()

    def invalid(err: ValidationError, offset: int | None = None) -> HTTPException:
        errors = err.errors(include_url=False, include_input=False)
        if offset is not None:  # errors of rows[offset:...]
            errors = [{**e, "loc": ("vectors", e["loc"][0] + offset, *e["loc"][1:]) if e["loc"] else ("vectors",)}
                      for e in errors]
        return HTTPException(422, validation_message(errors))

    if len(body) <= INLINE_JSON_BYTES:
        try:
            query = model.model_validate_json(body)
        except ValidationError as err:
            raise invalid(err) from err
        return query, query.vectors
    try:
        text = body.decode("utf-8")
        fields, rows, not_a_row = split_vector_rows(text)
    except (UnicodeDecodeError, ValueError) as err:
        raise HTTPException(422, f"body: Invalid JSON: {err}") from err
    try:
        query = model.model_validate({**fields, "vectors": []} if rows is not None else fields)
    except ValidationError as err:
        raise invalid(err) from err
    pieces: list[np.ndarray] = []
    for start in range(0, len(rows), ROWS_PER_PIECE):
        span = rows[start:start + ROWS_PER_PIECE]
        try:
            piece = _rows_adapter().validate_json(f"[{text[span[0][0]:span[-1][1]]}]")
        except ValidationError as err:
            raise invalid(err, start) from err
        width = pieces[0].shape[1] if pieces else len(piece[0])
        for i, row in enumerate(piece, start):
            if len(row) != width:
                raise HTTPException(422, f"vectors[{i}] has length {len(row)}, vectors[0] has length {width}")
        pieces.append(np.asarray(piece, dtype=np.float64).reshape(len(piece), width))
    if not_a_row:
        raise HTTPException(422, f"vectors[{len(rows)}]: Input should be a valid list")
    return query, np.concatenate(pieces) if pieces else []


_WS = re.compile(r"[ \t\n\r]*")


def split_vector_rows(text: str) -> tuple[dict[str, Any], list[tuple[int, int]] | None, bool]:
    """Split the JSON object ``text`` without decoding its ``vectors`` array.

    Returns its other members (decoded), the (start, end) of each row of ``vectors`` (None when
    ``vectors`` is missing or not an array: then it is among the members), and whether the
    array goes on with an element that is not an array (after the rows; the rest is not read).
    Each call into C code is short, so a worker thread running this hands the GIL back to the
    event loop every few milliseconds. ValueError (json.JSONDecodeError) when ``text`` is not JSON.
    """
    decoder = json.JSONDecoder()

    def skip(i: int) -> int:
        return _WS.match(text, i).end()

    def expect(i: int, char: str) -> int:
        if text[i:i + 1] != char:
            raise json.JSONDecodeError(f"Expecting '{char}'", text, i)
        return skip(i + 1)

    fields: dict[str, Any] = {}
    rows: list[tuple[int, int]] | None = None
    i = expect(skip(0), "{")
    while text[i:i + 1] != "}":
        if fields or rows is not None:
            i = expect(i, ",")
        key, i = decoder.raw_decode(text, i)
        if not isinstance(key, str):
            raise json.JSONDecodeError("Expecting property name enclosed in double quotes", text, i)
        i = expect(skip(i), ":")
        if key == "vectors" and text[i:i + 1] == "[":
            fields.pop("vectors", None)
            rows = []
            i = skip(i + 1)
            while text[i:i + 1] != "]":
                if rows:
                    i = expect(i, ",")
                if text[i:i + 1] != "[":  # not a row: the answer is a 422 naming it
                    decoder.raw_decode(text, i)  # (or a 422 for JSON that is not JSON)
                    return fields, rows, True
                end = text.find("]", i)  # a row of numbers holds no other bracket (if it does, it is invalid)
                if end < 0:
                    raise json.JSONDecodeError("Expecting ']'", text, i)
                rows.append((i, end + 1))
                i = skip(end + 1)
            i += 1
        else:
            fields[key], i = decoder.raw_decode(text, i)
            rows = None if key == "vectors" else rows
        i = skip(i)
    i = skip(i + 1)
    if i != len(text):
        raise json.JSONDecodeError("Extra data", text, i)
    return fields, rows, False


def add_face_routes(app, state: ServiceState, auth: list) -> None:  # noqa: ANN001
    """``/v1/faces/{id}`` (metadata) and its thumbnail; an unknown id is a NotFoundError (404)."""
    from fastapi import HTTPException
    from fastapi.responses import Response

    def no_face(face_id: int, gallery: Gallery) -> NotFoundError:
        return NotFoundError(f"no face {face_id} in this gallery of {len(gallery)}")

    @app.get("/v1/faces/{face_id}", dependencies=auth, tags=["faces"])
    async def face(face_id: int) -> dict[str, Any]:
        """A gallery face's metadata."""
        gallery = state.snapshot().gallery
        if not gallery.has(face_id):
            raise no_face(face_id, gallery)
        return gallery.row(face_id)

    @app.get("/v1/faces/{face_id}/thumbnail", dependencies=auth, tags=["faces"],
             response_class=Response, responses={200: {"content": {"image/jpeg": {}}}})
    async def thumbnail(face_id: int, size: int = 112) -> Response:
        """A square JPEG of the face, read from the gallery's dataset."""
        snap = state.snapshot()
        if not 16 <= size <= 512:
            raise HTTPException(422, f"size must be between 16 and 512, got {size}")
        if not snap.gallery.has(face_id):
            raise no_face(face_id, snap.gallery)
        crop = await state.run(snap.thumbnails.crop, face_id, size)
        if crop is None:
            raise NotFoundError(f"the image of face {face_id} is not readable at the gallery's dataset root")
        return Response(encode_jpeg(crop), media_type="image/jpeg")


async def _decode(state: ServiceState, data: bytes, max_pixels: int) -> np.ndarray:
    """Upload bytes -> RGB pixels in a worker thread: 413 over the pixel limit, 422 if unreadable."""
    from fastapi import HTTPException

    try:
        return await state.run(load_image_bytes, data, max_pixels)
    except ImageTooLargeError as err:
        raise HTTPException(413, err.reason) from err
    except ImageLoadError as err:
        raise HTTPException(422, f"cannot read the image: {err.reason}") from err


def add_write_routes(app, state: ServiceState, settings: ServiceSettings, auth: list) -> None:  # noqa: ANN001
    """Enrolment and deletion (only behind a token): each is one committed change of the gallery,
    visible to every reader (this service, others, the bot) at once as a new generation."""
    from fastapi import File, Form, HTTPException, Request, UploadFile

    from indexer.lifecycle import enroll_image, remove_faces

    async def change(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        async with state.writer:  # in a search thread, whose models are loaded (enrolment embeds the photo)
            result = await state.run(functools.partial(fn, *args, **kwargs))
        await asyncio.to_thread(state.live().refresh)  # answer later requests from the new generation
        return result

    @app.post("/v1/faces", dependencies=auth, tags=["changes"], status_code=201)
    async def enroll(
        request: Request,
        image: UploadFile = File(..., description="A photo of the person (every face in it is enrolled)."),
        identity: str = Form(..., min_length=1, max_length=256, description="Who it is."),
    ) -> dict[str, Any]:
        """Enroll the faces of a photo under ``identity``; returns the new face ids."""
        declared = int(request.headers.get("content-length") or 0)
        if declared > settings.max_upload_bytes + 64 * 1024:
            raise HTTPException(413, f"upload of {declared} bytes is over the limit of {settings.max_upload_bytes}")
        data = await image.read(settings.max_upload_bytes + 1)
        if len(data) > settings.max_upload_bytes:
            raise HTTPException(413, f"image is over the upload limit of {settings.max_upload_bytes} bytes")
        await _decode(state, data, settings.max_pixels)
        result = await change(enroll_image, settings.gallery, data, identity.strip(),
                              pipeline=state.searcher().pipeline, max_pixels=settings.max_pixels)
        if result.duplicates:
            raise HTTPException(409, "this image is already in the gallery")
        if not result.faces_added:
            raise HTTPException(422, "no face found in the image")
        return {"face_ids": list(result.added_face_ids), "identity": identity.strip(), "generation": result.generation}

    @app.delete("/v1/faces/{face_id}", dependencies=auth, tags=["changes"])
    async def delete_face(face_id: int) -> dict[str, Any]:
        """Remove one face for good (its vector, its row, pages derived from it)."""
        _, result = await change(remove_faces, settings.gallery, face_ids=[face_id])
        return {"removed": result.faces_removed, "generation": result.generation}

    @app.delete("/v1/identities/{identity}", dependencies=auth, tags=["changes"])
    async def delete_identity(identity: str) -> dict[str, Any]:
        """Remove every face and record of an identity (an erasure request)."""
        _, result = await change(remove_faces, settings.gallery, identities=[identity])
        return {"removed": result.faces_removed, "generation": result.generation}


def _swagger_assets():  # noqa: ANN202
    """The folder of Swagger UI's JS and CSS when swagger-ui-bundle is installed, else None (CDN)."""
    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError:
        return None
    path = Path(str(swagger_ui_path))
    return path if (path / "swagger-ui-bundle.js").is_file() else None


def serve(settings: ServiceSettings, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run the service with uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(create_app(settings), host=host, port=port, access_log=False, log_config=None)
