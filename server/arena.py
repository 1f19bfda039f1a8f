"""The policy arena: one browser page (GET /arena) that runs a prompt through several presets side
by side, and its static assets (GET /arena/<file>), shipped in the package under static/arena/.

The page is a client of the public API only (`/v1/policies`, `/v1/chat/completions` streamed):
its files hold no data, so they load without an API key (`is_arena_path` tells the key check
which paths those are); every API call the page makes sends the key typed into the page. Only
the files listed at import are served; any other path under /arena/ is an unknown path.
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import FastAPI
from fastapi.responses import Response

from kvmux.errors import KvmuxError

ARENA_PATH = "/arena"
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
}
PAGE = "index.html"
# the page loads only its own files and talks only to its own server
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data: blob:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


class ArenaFileNotFound(KvmuxError):
    status = 404
    error_type = "NotFoundError"


def _asset_dir():
    return files("kvmux.server").joinpath("static", "arena")


def _load_assets() -> dict[str, bytes]:
    """Every servable file of the page, by name (read once: the files are small)."""
    return {
        entry.name: entry.read_bytes()
        for entry in _asset_dir().iterdir()
        if entry.is_file() and any(entry.name.endswith(suffix) for suffix in MEDIA_TYPES)
    }


ASSETS = _load_assets()
PUBLIC_PATHS = frozenset({ARENA_PATH, *(f"{ARENA_PATH}/{name}" for name in ASSETS if name != PAGE)})


def is_arena_path(path: str) -> bool:
    """Whether `path` is the arena page or one of its files (served without an API key)."""
    return path in PUBLIC_PATHS


def _media_type(name: str) -> str:
    return next(kind for suffix, kind in MEDIA_TYPES.items() if name.endswith(suffix))


def _file_response(name: str) -> Response:
    body = ASSETS.get(name)
    if body is None or name == PAGE:  # the page itself lives at /arena only
        raise ArenaFileNotFound(f"No such arena file: '{name}'.")
    return Response(body, media_type=_media_type(name), headers=HEADERS)


def install_arena_routes(app: FastAPI) -> None:
    """GET /arena (the page) and GET /arena/<file> (its scripts and style sheet)."""

    @app.get(ARENA_PATH, include_in_schema=False)
    async def arena_page() -> Response:
        return Response(ASSETS[PAGE], media_type=MEDIA_TYPES[".html"], headers=HEADERS)

    @app.get(ARENA_PATH + "/{name}", include_in_schema=False)
    async def arena_file(name: str) -> Response:
        return _file_response(name)
