"""Shared fixtures: the real data in ../shared/data and a small real gallery."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FACESEARCH_SHARED_DATA", REPO.parent / "shared" / "data"))
CELEBA = SHARED / "celeba"
LFW = SHARED / "lfw"
PHOTOS = SHARED / "photos"


def pytest_collection_modifyitems(config, items):  # noqa: ANN001
    if not SHARED.is_dir():
        skip = pytest.mark.skip(reason=f"real data not found at {SHARED} (set FACESEARCH_SHARED_DATA)")
        for item in items:
            if "needs_data" in item.keywords:
                item.add_marker(skip)


def pytest_configure(config):  # noqa: ANN001
    config.addinivalue_line("markers", "needs_data: reads ../shared/data")


@pytest.fixture(scope="session")
def celeba_gallery(tmp_path_factory):
    """300 CelebA test-split images indexed with the default pipeline, 2 workers."""
    from indexer import RunConfig, run_index

    out = tmp_path_factory.mktemp("celeba-gallery")
    config = RunConfig(dataset_root=str(CELEBA), format="celeba", split="test", limit=300, partition_size=100)
    summary = run_index(config, out, workers=2, progress=False)
    return out, summary


@pytest.fixture(scope="session")
def pipeline():
    from embedder import FacePipeline

    return FacePipeline()


CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
)
#: screenshots of the pages the tests open, for people to look at (not committed)
ARTIFACTS = REPO / "test-output"


def _install_chromium() -> None:
    """The Debian packages chromium and chromium-driver, installed when missing."""
    import shutil
    import subprocess

    if shutil.which("chromedriver") and (shutil.which("chromium") or shutil.which("chromium-browser")):
        return
    prefix = [] if os.geteuid() == 0 else (["sudo", "-n"] if shutil.which("sudo") else None)
    if prefix is None:
        pytest.skip("chromium is not installed and this user cannot apt-get install it")
    install = [*prefix, "apt-get", "install", "-y", "-q", "chromium", "chromium-driver"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:
        subprocess.run([*prefix, "apt-get", "update", "-q"], env=env, capture_output=True, check=False)
        result = subprocess.run(install, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            pytest.fail(f"apt-get install chromium chromium-driver failed:\n{result.stderr[-2000:]}")


@pytest.fixture(scope="session")
def browser(tmp_path_factory):
    """Headless Chromium driven through chromedriver, with a fresh user-data dir.

    ``browser(path, shot)`` opens an HTML file and returns what it found:
    image count, images that failed to decode, and console errors; it saves a
    screenshot to ``shot``.
    """
    import shutil

    _install_chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.add_argument("--window-size=1400,1600")
    options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    driver.set_script_timeout(60)

    def open_page(path: Path, shot: Path) -> dict:
        driver.get(Path(path).resolve().as_uri())
        driver.get_log("browser")  # drop anything from an earlier page
        driver.get(Path(path).resolve().as_uri())
        broken = driver.execute_async_script(
            "var done = arguments[arguments.length - 1];"
            "var imgs = Array.prototype.slice.call(document.images);"
            "Promise.all(imgs.map(function (i) { return i.decode().then(function () {"
            "  return i.naturalWidth > 0 ? null : i.src.slice(0, 60); }, function () { return i.src.slice(0, 60); }); }))"
            ".then(function (r) { done(r.filter(function (x) { return x !== null; })); });"
        )
        images = driver.execute_script("return document.images.length;")
        shot.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(shot))
        errors = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
        return {"images": images, "broken": broken, "console_errors": errors, "title": driver.title, "driver": driver}

    yield open_page
    driver.quit()
