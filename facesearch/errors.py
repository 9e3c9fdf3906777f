"""One family of errors, so every door (CLI, HTTP, bot) can answer them cleanly.

Each subclass names what went wrong from the user's side; its message is one
line that says what to do. Low-level errors are wrapped with ``raise ... from``.
Subclasses that were ``ValueError`` before stay ``ValueError`` too, so callers
that caught those keep working.
"""

from __future__ import annotations


class FaceSearchError(Exception):
    """Base of every error facesearch raises on purpose."""

    #: HTTP status the service answers with (4xx: the request or the data is at fault).
    http_status = 400


class ConfigurationError(FaceSearchError, ValueError):
    """Settings that cannot work together (a bad option, a mismatched rerun)."""

    http_status = 422


class DatasetError(FaceSearchError):
    """A dataset root that cannot be read in the requested format."""


class ImageError(FaceSearchError):
    """An image that cannot be used. ``reason`` is a short text for failure records."""

    http_status = 422

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class BackendError(FaceSearchError):
    """A face-pipeline backend that cannot be built or run (unknown name, missing weights or package)."""

    http_status = 503


class GalleryError(FaceSearchError):
    """A gallery directory that cannot be opened, built or changed, and why."""

    http_status = 409


class NotFoundError(FaceSearchError, KeyError):
    """Something asked for by id that does not exist (a face id, an identity)."""

    http_status = 404

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""
