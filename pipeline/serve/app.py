"""The HTTP layer: a FastAPI app over a :class:`~pipeline.serve.service.Service`.

Routes (all JSON unless said; every error is a 4xx/5xx with ``{"error": "<one line>"}``):

- ``GET /api/search``: ``uid`` (repeatable), ``lonlat`` (``LON,LAT``, repeatable), ``k`` or
  ``max_distance`` (+ ``limit``), ``bbox`` (``W,S,E,N``), ``images`` (glob), ``date``
  (``FROM/TO``: images acquired in that range, ends inclusive, either open),
  ``include_overlapping``, ``diverse``, ``footprints`` (add each query's window polygons);
  answers in ``search --json``'s shape (one document, or a list for several queries).
- ``POST /api/search``: the same as a JSON body, or an example set: ``positives``,
  ``negatives`` (uids, ``"lonlat:LON,LAT"`` or ``[lon, lat]``), ``score``,
  ``negative_weight``, ``classifier`` (+ ``background``, ``seed``, ``min_score``).
- ``POST /api/search/image``: an image upload (multipart field ``file``, or the raw body), the
  settings as query parameters.
- ``GET|POST /api/export.geojson``: the hits of the same queries as window polygons.
- ``GET /api/changes``: ``before`` and ``after`` (``FROM/TO``), ``bbox``, ``k`` or
  ``min_distance`` (+ ``limit``), ``score``, ``footprints``: ``aerial-search changes --json``'s
  document.
- ``GET /api/history``: ``lonlat`` or ``uid``, ``date``, ``footprints``: ``aerial-search history
  --json``'s document.
- ``GET /api/tiles/{uid}.png`` (``size``), ``GET /api/images`` (footprints),
  ``GET /api/images/{id}/preview.png``, ``GET /api/images/{id}/uid?x=&y=``, ``GET /api/info``.
- ``GET /tiles/{z}/{x}/{y}.png`` (``date``): the archive as an XYZ basemap, latest flight on
  top, or only the flights of a date range.
- ``GET /``: the map page; ``/static/*`` its code and Leaflet (``static/vendor/leaflet``, shipped
  in the package: nothing is fetched from a CDN or needs npm at run time); ``/openapi.json``, the
  API's description (no ``/docs`` page: Swagger UI would be 10 MB more in the package).

Security: with a token, every route needs ``Authorization: Bearer TOKEN`` or the cookie that
``/?token=TOKEN`` sets once (HttpOnly, SameSite=Strict). No CORS headers unless origins are
given. Request bodies are capped (JSON 1 MB, uploads ``max_upload``) while they stream in.
"""

from __future__ import annotations

import hmac
import logging
import time
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipeline.errors import AerialSearchError
from pipeline.serve.service import RequestError, Service, Settings

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
COOKIE = "aerial_search_token"
JSON_BODY_LIMIT = 1 << 20
MULTIPART_SLACK = 64 << 10  # multipart headers and boundaries around an upload
PNG = "image/png"


def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": " ".join(str(message).split())[:500]}, status_code=status, headers=headers)


class SearchBody(BaseModel):
    """``POST /api/search`` and ``POST /api/export.geojson``: single queries (``uid``, ``lonlat``)
    or one example set (``positives``, ``negatives``), and the settings."""

    model_config = ConfigDict(extra="forbid")

    uid: list[str | int] = []
    lonlat: list[str | list[float]] = []
    positives: list[str | int | list[float]] = []
    negatives: list[str | int | list[float]] = []
    score: Literal["centroid", "nearest"] = "centroid"
    negative_weight: float | None = None
    classifier: bool = False
    background: int = 200
    seed: int = 0
    k: int | None = None
    max_distance: float | None = None
    min_score: float | None = None
    limit: int = 10_000
    bbox: str | list[float] | None = None
    images: str | None = None
    date: str | None = None
    include_overlapping: bool = False
    diverse: bool = False
    footprints: bool = False


class SearchParams:
    """``GET /api/search`` and ``GET /api/export.geojson`` query parameters."""

    def __init__(
        self,
        uid: Annotated[list[str], Query(description="tile uid (repeatable)")] = [],  # noqa: B006
        lonlat: Annotated[list[str], Query(description="LON,LAT: the tile covering this place (repeatable)")] = [],  # noqa: B006
        k: Annotated[int | None, Query(description="results per query (default 10)")] = None,
        max_distance: Annotated[
            float | None, Query(description="instead of k: every tile within this distance")
        ] = None,
        limit: Annotated[int, Query(description="threshold mode: at most this many results")] = 10_000,
        bbox: Annotated[str | None, Query(description="W,S,E,N: only tiles centred in this lon/lat box")] = None,
        images: Annotated[str | None, Query(description="glob: only tiles of images whose path matches")] = None,
        date: Annotated[str | None, Query(description="FROM/TO: only images acquired in this range (ISO dates, "
                                                       "ends inclusive, either may be left open)")] = None,
        include_overlapping: bool = False,
        diverse: Annotated[bool, Query(description="skip results overlapping a better result")] = False,
        footprints: Annotated[bool, Query(description="add the query's and results' window polygons")] = False,
    ):
        self.uid, self.lonlat, self.footprints = uid, lonlat, footprints
        self.settings = dict(k=k, threshold=max_distance, limit=limit, bbox=bbox, images=images,
                             include_overlapping=include_overlapping, diverse=diverse, date=date)  # fmt: skip


class BodyLimit:
    """Refuse request bodies over the route's cap (413), by header or while they stream in."""

    def __init__(self, app: Any, upload_limit: int):
        self.app = app
        self.upload_limit = upload_limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.upload_limit + MULTIPART_SLACK if scope["path"] == "/api/search/image" else JSON_BODY_LIMIT
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length", b"").decode()
        if length.isdigit() and int(length) > limit:
            return await error(413, f"request body of {int(length):,} bytes is over the {limit:,}-byte limit")(
                scope, receive, send
            )
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                raise StarletteHTTPException(413, f"request body is over the {limit:,}-byte limit")
            return message

        await self.app(scope, limited, send)


def create_app(service: Service, token: str | None = None, cors_origins: list[str] | None = None) -> FastAPI:
    """The app: the API, the page and its static files (package data)."""
    app = FastAPI(
        title="aerial-search",
        summary="Visual search over aerial imagery: the store's HTTP API",
        version=_version(),
        docs_url=None,
        redoc_url=None,
    )
    app.state.service = service

    # ---- errors: one line of JSON, and the server keeps serving ----------------------------

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError) -> JSONResponse:
        return error(exc.status, str(exc))

    @app.exception_handler(AerialSearchError)
    async def _user_error(request: Request, exc: AerialSearchError) -> JSONResponse:
        return error(400, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            return error(400, f"the request body is not valid JSON ({first.get('ctx', {}).get('error', '')})")
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path"))
        return error(400, f"{where or 'request'}: {first.get('msg', 'invalid value')}")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = (
            exc.detail if exc.status_code != 404 or exc.detail != "Not Found" else f"no such route {request.url.path}"
        )
        return error(exc.status_code, str(message), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        return error(500, f"internal error ({type(exc).__name__}: {exc}); the server log has the details")

    # ---- security ------------------------------------------------------------------------------

    # Inside the guard (added first): a refused token reads no body, and a body over the cap
    # raises in the endpoint, where the HTTP exception handler answers 413.
    app.add_middleware(BodyLimit, upload_limit=service.max_upload)

    @app.middleware("http")
    async def _guard(request: Request, call_next: Any) -> Response:
        if token:
            given = request.query_params.get("token") if request.url.path == "/" else None
            if given is not None:
                if not hmac.compare_digest(given.encode(), token.encode()):
                    return error(401, "wrong token")
                resp: Response = RedirectResponse("/", status_code=303)  # the token leaves the address bar
                resp.set_cookie(COOKIE, token, httponly=True, samesite="strict", secure=request.url.scheme == "https")
                return resp
            auth = request.headers.get("authorization", "")
            supplied = auth[7:] if auth.lower().startswith("bearer ") else request.cookies.get(COOKIE, "")
            if not hmac.compare_digest(supplied.encode(), token.encode()):
                return error(401, "missing or wrong token: send 'Authorization: Bearer TOKEN', or open /?token=TOKEN once "
                                  "in the browser", {"WWW-Authenticate": "Bearer"})  # fmt: skip
        start = time.perf_counter()
        resp = await call_next(request)
        resp.headers["Server-Timing"] = f"app;dur={(time.perf_counter() - start) * 1000:.1f}"
        resp.headers["X-Content-Type-Options"] = "nosniff"
        resp.headers["Referrer-Policy"] = "no-referrer"
        resp.headers["X-Frame-Options"] = "DENY"
        resp.headers["Content-Security-Policy"] = (
            "default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; script-src 'self'"
        )
        return resp

    if cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])  # fmt: skip

    # ---- the API ---------------------------------------------------------------------------------

    def settings_of(**kw: Any) -> Settings:
        return service.settings(**kw)

    def body_results(body: SearchBody) -> list:
        examples = bool(body.positives or body.negatives)
        if examples and (body.uid or body.lonlat):
            raise RequestError("positives/negatives make one query of several examples and uid/lonlat one query "
                               "each: use one kind per search")  # fmt: skip
        if body.classifier and not examples:
            raise RequestError("classifier: true needs positives (and negatives or background tiles)")
        if body.min_score is not None and not body.classifier:
            raise RequestError("min_score is a classifier's probability; for distances and scores use max_distance")
        if body.max_distance is not None and body.classifier:
            raise RequestError("a classifier ranks by probability: use min_score, not max_distance")
        threshold = body.min_score if body.classifier else body.max_distance
        s = settings_of(k=body.k, threshold=threshold, limit=body.limit, bbox=body.bbox, images=body.images,
                        include_overlapping=body.include_overlapping, diverse=body.diverse,
                        threshold_name="min_score" if body.classifier else "max_distance", date=body.date)  # fmt: skip
        if examples:
            return service.search_examples(body.positives, body.negatives, s, body.score, body.negative_weight,
                                           body.classifier, body.background, body.seed)  # fmt: skip
        return service.search([str(u) for u in body.uid], body.lonlat, s)

    @app.get("/api/search", tags=["search"])
    def search_get(p: Annotated[SearchParams, Depends()]) -> Any:
        """The tiles most similar to tile uids or places: ``search --uid/--lonlat --json``."""
        return service.document(service.search(p.uid, p.lonlat, settings_of(**p.settings)), p.footprints)

    @app.post("/api/search", tags=["search"])
    def search_post(body: SearchBody) -> Any:
        """Single queries, or one example set (positives / negatives, optionally a classifier)."""
        return service.document(body_results(body), body.footprints)

    @app.post("/api/search/image", tags=["search"])
    async def search_image(request: Request, p: Annotated[SearchParams, Depends()]) -> Any:
        """An uploaded image (PNG, JPEG or GeoTIFF; multipart field ``file`` or the raw body) as the query."""
        if p.uid or p.lonlat:
            raise RequestError("an image search takes the image as its query: drop uid/lonlat")
        data, name = await _upload(request, service.max_upload)
        s = settings_of(**p.settings)
        results = await run_in_threadpool(service.search_image, data, name, s)
        return service.document(results, p.footprints)

    @app.get("/api/export.geojson", tags=["export"])
    def export_get(p: Annotated[SearchParams, Depends()]) -> Response:
        """The hits of a ``GET /api/search`` as window polygons (EPSG:4326), ``search --geojson``."""
        return _geojson(service.export(service.search(p.uid, p.lonlat, settings_of(**p.settings))))

    @app.post("/api/export.geojson", tags=["export"])
    def export_post(body: SearchBody) -> Response:
        """The hits of a ``POST /api/search`` as window polygons."""
        return _geojson(service.export(body_results(body)))

    @app.get("/api/history", tags=["search"])
    def history_get(
        lonlat: Annotated[str | None, Query(description="LON,LAT: the place")] = None,
        uid: Annotated[str | None, Query(description="instead of lonlat: a tile whose centre is the place")] = None,
        date: Annotated[str | None, Query(description="FROM/TO: only images acquired in this range")] = None,
        footprints: Annotated[bool, Query(description="add the windows' polygons")] = False,
    ) -> Any:
        """A place through time: its window in every image covering it, oldest first, with the
        distance to the previous one (``aerial-search history --json``)."""
        return service.document(service.history(lonlat, uid, date), footprints)

    @app.get("/api/changes", tags=["search"])
    def changes_get(
        before: Annotated[str, Query(description="FROM/TO: images acquired in this range are the 'before'")] = "",
        after: Annotated[str, Query(description="FROM/TO: images acquired in this range are the 'after'")] = "",
        bbox: Annotated[str | None, Query(description="W,S,E,N: only after windows centred in this box")] = None,
        k: Annotated[int | None, Query(description="the k most changed windows (default 100)")] = None,
        min_distance: Annotated[float | None, Query(description="instead of k: every pair this far apart")] = None,
        limit: int = 10_000,
        footprints: Annotated[bool, Query(description="add the after windows' polygons")] = False,
        score: Annotated[Literal["distance", "robust"], Query(description="rank by the distance, or by how far it "
                                                                         "stands out in its image pair")] = "distance",
    ) -> Any:
        """What changed: each after window against the window over the same ground before, ranked by
        the distance of their fingerprints (``aerial-search changes --json``)."""
        return service.document(service.changes(before, after, bbox, k, min_distance, limit, score), footprints)

    @app.get("/api/tiles/{uid}.png", tags=["pixels"], response_class=Response)
    def tile(uid: str, size: int | None = None) -> Response:
        """A tile's 256 x 256 window, read from its source image (``size``: smaller side in px)."""
        return Response(service.tile_png(uid, size), media_type=PNG, headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/api/images", tags=["store"])
    def images() -> Any:
        """The store's images: footprints (EPSG:4326; null geometry without a CRS) and facts."""
        return service.images()

    @app.get("/api/images/{image}/preview.png", tags=["pixels"], response_class=Response)
    def image_preview(image: str, max_size: Annotated[int, Query(alias="max")] = 1024) -> Response:
        """A whole image, decimated; ``X-Preview-Factor`` is image pixels per preview pixel."""
        png, factor = service.preview_png(image, max_size)
        return Response(png, media_type=PNG, headers={"X-Preview-Factor": f"{factor:.6f}",
                                                      "Cache-Control": "private, max-age=3600"})  # fmt: skip

    @app.get("/api/images/{image}/uid", tags=["store"])
    def image_uid(image: str, x: float, y: float) -> Any:
        """The searchable tile of an image whose window centre is nearest pixel (x, y)."""
        return service.uid_at_pixel(image, x, y)

    @app.get("/api/info", tags=["store"])
    def info() -> Any:
        """``aerial-search info``'s summary of the store, and the server's settings."""
        return service.info()

    @app.get("/tiles/{z}/{x}/{y}.png", tags=["pixels"], response_class=Response)
    def basemap(
        z: int, x: int, y: int,
        date: Annotated[str | None, Query(description="FROM/TO: only images acquired in this range (ISO dates, "
                                                      "either end open)")] = None,
    ) -> Response:  # fmt: skip
        """The archive's images as an XYZ (Web Mercator) basemap, the most recently acquired on
        top where they overlap; transparent where none."""
        try:
            png = service.basemap_tile(z, x, y, date)
        except RequestError:
            raise
        except ValueError as e:  # no such tile
            raise RequestError(str(e), 404) from None
        return Response(png, media_type=PNG, headers={"Cache-Control": "private, max-age=3600"})

    # ---- the page and its assets ----------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    def page() -> Response:
        return HTMLResponse((STATIC / "index.html").read_text(), headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _geojson(doc: dict) -> Response:
    import json

    return Response(json.dumps(doc), media_type="application/geo+json",
                    headers={"Content-Disposition": 'attachment; filename="hits.geojson"'})  # fmt: skip


async def _upload(request: Request, limit: int) -> tuple[bytes, str]:
    """The uploaded bytes and file name: multipart field ``file``, or the whole body."""
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("multipart/form-data"):
        try:
            form = await request.form(max_files=1, max_fields=20, max_part_size=limit + 1)
        except StarletteHTTPException:
            raise
        except Exception as e:
            raise RequestError(f"the multipart upload cannot be parsed ({type(e).__name__}: {e})") from None
        part = form.get("file")
        if part is None or isinstance(part, str):
            raise RequestError("multipart upload without a 'file' part: send the image as field 'file'")
        data = await part.read()
        return data, part.filename or "upload"
    return await request.body(), request.headers.get("x-filename", "upload")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("aerial-search")
    except PackageNotFoundError:
        return "0"
