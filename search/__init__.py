"""k-NN queries over a gallery: Python API, CLI (``face-search``)."""

from search.gallery import Gallery, GalleryError
from search.searcher import FaceResult, Match, Searcher

__all__ = ["FaceResult", "Gallery", "GalleryError", "Match", "Searcher"]
