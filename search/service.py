"""``face-search serve``: the HTTP search service (FastAPI, run by uvicorn).

A thin layer over :class:`search.searcher.Searcher`:

- the gallery and the models are loaded once, at start-up (``/readyz`` turns
  200 when they are);
- inference runs in worker threads, off the event loop, at most
  ``concurrency`` at a time; other requests wait their turn;
- limits (upload bytes, image pixels, k) answer 413 / 422 with a message;
- any :class:`facesearch.errors.FaceSearchError` answers its ``http_status``
  with ``{"detail": <its one-line message>}``;
- ``FACESEARCH_API_TOKEN``, when set, is the bearer token every ``/v1`` call needs;
- one structured (JSON) log line per request, never image content.

:func:`create_app` reads as the list of its steps: a :class:`ServiceState`
that the lifespan fills, then one function per group of routes.
"""

import asyncio
import hmac
import json
import logging
import os
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

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


@dataclass(frozen=True)
class ServiceSettings:
    gallery: str
    max_upload_bytes: int = 10 * 2**20  # larger uploads: 413
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


class NotReadyError(FaceSearchError):
    """A request that needs the gallery came before the lifespan loaded it."""

    http_status = 503


class ServiceState:
    """What the routes share: the searcher and thumbnails once loaded, and the inference slots."""

    def __init__(self, concurrency: int) -> None:
        self.concurrency = concurrency
        self.ready = False
        self._live: LiveSearch | None = None
        self._slots = asyncio.Semaphore(concurrency)
        self.writer = asyncio.Lock()  # one change at a time from this process (the gallery's lock covers others)

    async def load(self, gallery: str, reload_interval: float) -> Searcher:
        """Open the gallery and warm the models up (detector, landmarks, embedder), off the event loop;
        then follow the gallery's changes every ``reload_interval`` seconds."""
        searcher = await asyncio.to_thread(Searcher, gallery)
        await asyncio.to_thread(searcher.search, np.zeros((64, 64, 3), np.uint8), 1)
        self._live = LiveSearch(searcher)
        self._live.watch(reload_interval)
        self.ready = True
        return searcher

    def close(self) -> None:
        self.ready = False
        if self._live is not None:
            self._live.stop()

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
        """``fn(*args)`` in a worker thread, once one of the ``concurrency`` slots is free."""
        async with self._slots:
            return await asyncio.to_thread(fn, *args)


def _matches(result: list, threshold: float | None) -> list[dict[str, Any]]:
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
    add_access_log(app)
    add_error_handler(app)
    auth = [Depends(bearer_auth(token))]
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
                             "auth": authenticated, "writes": settings.writes_enabled()}))
        yield
        state.close()

    return lifespan


def bearer_auth(token: str):  # noqa: ANN201
    """The dependency the ``/v1`` routes need: 401 unless ``Authorization: Bearer <token>`` (no check when empty)."""
    from fastapi import HTTPException, Request

    def authorise(request: Request) -> None:
        if not token:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    return authorise


def add_error_handler(app) -> None:  # noqa: ANN001
    """Answer every FaceSearchError with its ``http_status`` and ``{"detail": <its message>}``."""
    from fastapi.responses import JSONResponse

    async def face_search_error(request, err: FaceSearchError) -> JSONResponse:  # noqa: ANN001
        return JSONResponse({"detail": str(err)}, status_code=err.http_status)

    app.add_exception_handler(FaceSearchError, face_search_error)


def add_access_log(app) -> None:  # noqa: ANN001
    """One JSON line per request on ``facesearch.access``: method, path, status, ms, bytes in, client."""
    from fastapi import Request

    @app.middleware("http")
    async def access(request: Request, call_next):  # noqa: ANN001, ANN202
        start = time.perf_counter()
        response = await call_next(request)
        access_log.info(json.dumps({
            "method": request.method, "path": request.url.path, "status": response.status_code,
            "ms": round(1000 * (time.perf_counter() - start), 1),
            "bytes_in": int(request.headers.get("content-length") or 0),
            "client": request.client.host if request.client else None,
        }))
        return response


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
        """The gallery and models are loaded: 200, else 503."""
        if not state.ready:
            return JSONResponse({"status": "loading"}, status_code=503)
        snap = state.snapshot()
        return JSONResponse({"status": "ready", "faces": len(snap.gallery), "generation": snap.generation})


def add_search_routes(app, state: ServiceState, settings: ServiceSettings, auth: list) -> None:  # noqa: ANN001
    """``/v1/search`` (an image) and ``/v1/search/vector`` (embeddings), with their limits."""
    from fastapi import File, Form, HTTPException, Request, UploadFile
    from pydantic import BaseModel, Field

    def check_k(k: int) -> None:
        if not 1 <= k <= settings.max_k:
            raise HTTPException(422, f"k must be between 1 and {settings.max_k}, got {k}")

    @app.post("/v1/search", dependencies=auth, tags=["search"])
    async def search(
        request: Request,
        image: UploadFile = File(..., description="The query image (JPEG, PNG, ...)."),
        k: int = Form(8, description="Matches per face."),
        threshold: float | None = Form(None, description="Drop matches with a lower cosine."),
    ) -> dict[str, Any]:
        """Every face of the image (largest first) with its k nearest gallery faces."""
        check_k(k)
        declared = int(request.headers.get("content-length") or 0)
        if declared > settings.max_upload_bytes + 64 * 1024:  # multipart overhead allowed
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

    class VectorQuery(BaseModel):
        vectors: list[list[float]] = Field(..., description="Embeddings, one per row (normalised by the service).")
        k: int = 8
        threshold: float | None = None

    @app.post("/v1/search/vector", dependencies=auth, tags=["search"])
    async def search_vector(query: VectorQuery) -> dict[str, Any]:
        """The k nearest gallery faces of each embedding."""
        check_k(query.k)
        s, snap = state.searcher(), state.snapshot()
        if len(query.vectors) > 1000:
            raise HTTPException(413, "at most 1000 vectors per request")
        try:
            results = await state.run(s.search_vectors, np.asarray(query.vectors, dtype=np.float32)
                                      if query.vectors else np.zeros((0, snap.gallery.dim), np.float32), query.k,
                                      snap.gallery)
        except ValueError as err:
            raise HTTPException(422, str(err)) from err
        return {"results": [_matches(r, query.threshold) for r in results], "generation": snap.generation}


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
        async with state.writer:
            result = await asyncio.to_thread(lambda: fn(*args, **kwargs))
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
