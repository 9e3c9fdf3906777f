#!/usr/bin/env bash
# Set up facesearch in .venv, index a sample of faces, then query it.
# With ../shared/data beside the repository: 300 CelebA test images, calibrated
# with face-search eval, queried with an unseen photo of an indexed person and a
# group photo, and an HTML report (demo-out/report.html). Without it:
# scikit-image's astronaut photo.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3.11}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[demo]'
export PATH="$PWD/.venv/bin:$PATH"

SHARED="${FACESEARCH_SHARED_DATA:-../shared/data}"
OUT=demo-out
if [ -d "$SHARED/celeba" ]; then
  face-index run "$SHARED/celeba" --format celeba --split test --limit 300 --out "$OUT/gallery"
  # Calibrate: thresholds at FPR 1e-3 / 1e-2 go into gallery.json, figures into gallery/eval/.
  face-search eval "$OUT/gallery"
  # 183876.jpg is person 6184, who is in the gallery through other photos.
  face-search query "$SHARED/celeba/img_align_celeba/183876.jpg" "$SHARED/photos/group1.jpg" --gallery "$OUT/gallery" -k 5
  face-search report "$SHARED/celeba/img_align_celeba/183876.jpg" "$SHARED/photos" --gallery "$OUT/gallery" --out "$OUT/report.html"
else
  mkdir -p "$OUT/sample"
  python - "$OUT/sample" <<'PY'
import sys
from pathlib import Path
import numpy as np
from PIL import Image
from skimage import data
out = Path(sys.argv[1])
astronaut = data.astronaut()
Image.fromarray(astronaut).save(out / "astronaut.png")
Image.fromarray(np.ascontiguousarray(astronaut[:, ::-1])).save(out / "astronaut-mirrored.png")
Image.fromarray(astronaut).resize((384, 384)).save(out / "astronaut-small.jpg", quality=90)
PY
  face-index run "$OUT/sample" --format folder --out "$OUT/gallery"
  face-search query "$OUT/sample/astronaut.png" --gallery "$OUT/gallery" -k 3
fi
