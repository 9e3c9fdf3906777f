"""The resolved settings of an index run, stored as ``run.json`` in the gallery."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from data.images import DEFAULT_MAX_PIXELS
from embedder.pipeline import PipelineConfig
from facesearch.errors import ConfigurationError, GalleryError
from indexer.layout import GalleryLayout, read_json, write_json_atomic


class ConfigMismatchError(ConfigurationError):
    """A gallery directory holds a run made with other settings."""


@dataclass(frozen=True)
class RunConfig:
    """What decides a run's output. Worker count and progress do not.

    partition_size: images per Parquet partition; smaller partitions lose less
        work on interruption, larger ones mean fewer files.
    limit: index only the first N images of the dataset (a quick run).
    """

    dataset_root: str
    format: str
    split: str = "all"
    limit: int | None = None
    partition_size: int = 1000
    max_pixels: int = DEFAULT_MAX_PIXELS
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)

    def __post_init__(self) -> None:
        object.__setattr__(self, "dataset_root", str(Path(self.dataset_root).resolve()))
        if self.partition_size < 1:
            raise ConfigurationError(f"partition_size must be >= 1, got {self.partition_size}")
        if self.limit is not None and self.limit < 1:
            raise ConfigurationError(f"limit must be >= 1, got {self.limit}")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["pipeline"] = self.pipeline.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunConfig":
        data = dict(data)
        data["pipeline"] = PipelineConfig.from_dict(data.get("pipeline", {}))
        return cls(**data)


def check_or_write_run_config(gallery_dir: Path, config: RunConfig) -> bool:
    """Write run.json for a new gallery; for an existing one, check it matches.

    Returns True when resuming an earlier run of the same settings.
    """
    path = GalleryLayout(gallery_dir).run_file
    if path.exists():
        try:
            stored = read_json(path)
        except GalleryError as err:
            raise ConfigMismatchError(f"{err}; use --overwrite to start afresh") from err
        ours = config.to_dict()
        if stored != ours:
            changed = sorted(k for k in set(stored) | set(ours) if stored.get(k) != ours.get(k))
            hint = ""
            stored_embedder = (stored.get("pipeline") or {}).get("embedder")
            if stored_embedder and stored_embedder != ours["pipeline"]["embedder"]:
                # e.g. a run started before the default embedder changed (issue 15)
                hint = f" (it was started with --embedder {stored_embedder})"
            raise ConfigMismatchError(
                f"{gallery_dir} holds a run with other settings ({', '.join(changed)} differ){hint}; "
                "rerun with the same settings to resume, or use --overwrite to start afresh"
            )
        return True
    gallery_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, config.to_dict())
    return False
