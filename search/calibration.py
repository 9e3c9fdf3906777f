"""Calibrated thresholds: how far a cosine value can be trusted.

``face-search eval`` measures, on an identity-labelled gallery, the cosine
thresholds at two false-positive rates and stores them in gallery.json:

- above ``threshold`` (FPR ``fpr``, 1e-3 by default) a match is called the
  **same** person: at most that share of different-person pairs score so high;
- above ``uncertain_threshold`` (FPR ``uncertain_fpr``, 10x looser) it is
  **uncertain**;
- at or below it, a **different** person.

The thresholds belong to the pipeline (the embedder), not to the gallery's faces,
so ``face-index build`` keeps them as long as the pipeline is unchanged.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any, Literal, Mapping

from facesearch.errors import ConfigurationError

Verdict = Literal["same", "uncertain", "different"]
VERDICTS: tuple[Verdict, ...] = ("same", "uncertain", "different")
CALIBRATION_KEY = "calibration"
#: words and colours for a verdict, shared by the HTML pages (CSS), the bot and watch (BGR); None: uncalibrated
VERDICT_LABELS = {"same": "same person", "uncertain": "uncertain", "different": "different person", None: "uncalibrated"}
VERDICT_BGR = {"same": (58, 127, 27), "uncertain": (0, 138, 201), "different": (30, 38, 179), None: (119, 119, 119)}


def verdict_label(verdict: str | None) -> str:
    return VERDICT_LABELS.get(verdict, VERDICT_LABELS[None])


class CalibrationError(ConfigurationError):
    """Thresholds that cannot be used."""


@dataclass(frozen=True)
class Calibration:
    fpr: float
    threshold: float
    uncertain_fpr: float
    uncertain_threshold: float
    tpr: float | None = None  # share of same-person pairs above ``threshold`` where measured
    source: str = ""  # what it was measured on

    def __post_init__(self) -> None:
        if not -1.0 <= self.uncertain_threshold <= self.threshold <= 1.0:
            raise CalibrationError(
                f"need -1 <= uncertain_threshold ({self.uncertain_threshold}) <= threshold ({self.threshold}) <= 1"
            )

    def verdict(self, cosine: float) -> Verdict:
        if cosine > self.threshold:
            return "same"
        if cosine > self.uncertain_threshold:
            return "uncertain"
        return "different"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Calibration":
        try:
            return cls(
                fpr=float(data["fpr"]), threshold=float(data["threshold"]),
                uncertain_fpr=float(data["uncertain_fpr"]), uncertain_threshold=float(data["uncertain_threshold"]),
                tpr=None if data.get("tpr") is None else float(data["tpr"]), source=str(data.get("source", "")),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise CalibrationError(f"calibration in gallery.json is malformed: {err}") from err


def gallery_calibration(data: Mapping[str, Any] | None) -> Calibration | None:
    """The calibration stored in gallery.json (GalleryInfo.calibration), or None when uncalibrated."""
    return None if data is None else Calibration.from_dict(dict(data))


def save_calibration(gallery_dir: str | os.PathLike[str], calibration: Calibration) -> None:
    """Store ``calibration`` in the gallery's gallery.json (atomically, under the writer lock).
    A fresh calibration clears the stale mark that removals leave."""
    from indexer.layout import GalleryLayout, write_json_atomic
    from indexer.lock import WriterLock

    layout = GalleryLayout(gallery_dir)
    with WriterLock(layout.root, "face-search eval"):
        info = layout.read_info()
        write_json_atomic(layout.info_file, info.replace(calibration=calibration.to_dict()).to_json())
