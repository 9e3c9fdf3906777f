"""Eval figures of the default pipeline on LFW and on ../shared/data/celeba, plus a report at scale.

Usage: python benchmarks/eval.py [--work bench-out/eval] [--workers 2] [--figures benchmarks/figures]
                                 [--report-queries 300]

Indexes each dataset into WORK/<name> (skipped when its gallery.json exists),
runs ``face-search eval`` (figures to FIGURES/<name>/), ``face-search audit``,
and one ``face-search report`` of N LFW images queried against the CelebA
gallery, timed, and opened in headless Chromium when it is installed.
Prints markdown tables for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from embedder.runtime import configure_process  # noqa: E402
from indexer import RunConfig, run_index  # noqa: E402
from search.audit import audit_gallery, write_audit_html  # noqa: E402
from search.calibration import save_calibration  # noqa: E402
from search.evaluate import evaluate  # noqa: E402
from search.report import build_report  # noqa: E402

log = logging.getLogger("bench.eval")
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _gallery(name: str, config: RunConfig, work: Path, workers: int) -> Path:
    out = work / name
    if not (out / "gallery.json").exists():
        start = time.perf_counter()
        run_index(config, out, workers=workers, progress=False)
        log.info("indexed %s in %.0f s", name, time.perf_counter() - start)
    return out


def _open_in_chromium(path: Path) -> dict | None:
    import shutil

    if not shutil.which("chromedriver"):
        return None
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=1400,1600"):
        options.add_argument(flag)
    options.binary_location = shutil.which("chromium")
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        start = time.perf_counter()
        driver.get(path.resolve().as_uri())
        loaded = time.perf_counter() - start
        timing = driver.execute_script(
            "var t = performance.getEntriesByType('navigation')[0];"
            "return {dom: t.domContentLoadedEventEnd, load: t.loadEventEnd, images: document.images.length};")
        start = time.perf_counter()
        driver.execute_script("window.scrollTo(0, document.body.scrollHeight);")
        driver.execute_script("return document.body.scrollHeight;")
        scrolled = time.perf_counter() - start
        return {"get_seconds": loaded, "scroll_seconds": scrolled, **timing}
    finally:
        driver.quit()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="bench-out/eval")
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--figures", default=str(Path(__file__).resolve().parent / "figures"))
    parser.add_argument("--report-queries", type=int, default=300)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    configure_process()
    work, figures = Path(args.work), Path(args.figures)

    galleries = {
        "lfw": (_gallery("lfw", RunConfig(dataset_root=str(SHARED / "lfw"), format="lfw"), work, args.workers),
                SHARED / "lfw" / "pairs.txt"),
        "celeba": (_gallery("celeba", RunConfig(dataset_root=str(SHARED / "celeba"), format="celeba", split="test"),
                            work, args.workers), None),
    }
    results = {}
    for name, (gallery, pairs) in galleries.items():
        result = evaluate(gallery, lfw_pairs=pairs, figures_dir=figures / name)
        save_calibration(gallery, result.calibration)
        audit = audit_gallery(gallery)
        write_audit_html(audit, __import__("search").Gallery.load(gallery), work / f"{name}-audit.html")
        results[name] = {"eval": result.to_dict(), "audit": {
            "noisy": len(audit.noisy), "lookalikes": audit.lookalikes_total, "duplicates": len(audit.duplicates),
            "seconds": audit.seconds}}

    lfw_images = sorted((SHARED / "lfw" / "lfw").glob("*/*.jpg"))
    step = max(1, len(lfw_images) // args.report_queries)
    queries = lfw_images[::step][: args.report_queries]
    start = time.perf_counter()
    summary = build_report(galleries["celeba"][0], queries, work / "report.html", k=8)
    report_seconds = time.perf_counter() - start
    browser = _open_in_chromium(summary.path)
    results["report"] = {"queries": summary.queries, "faces": summary.faces, "seconds": report_seconds,
                         "bytes": summary.path.stat().st_size, "chromium": browser}
    (work / "eval.json").write_text(json.dumps(results, indent=2))

    print("| gallery | faces | identities | same / different pairs | ROC AUC | TPR@1e-2 (thr) | TPR@1e-3 (thr) |"
          " TPR@1e-4 (thr) | rank-1 | mAP@8 | LFW 10-fold | eval time |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        if name == "report":
            continue
        e = r["eval"]
        v = e["verification"]
        points = " | ".join(f"{p['tpr']:.4f} ({p['threshold']:.4f})" for p in v["operating_points"])
        lfw = f"{100 * e['lfw']['accuracy']:.2f}% ± {100 * e['lfw']['std']:.2f}" if e["lfw"] else "-"
        print(f"| {name} | {e['faces']:,} | {e['identities']:,} | {v['genuine_pairs']:,} / {v['impostor_pairs']:,} | "
              f"{v['roc_auc']:.5f} | {points} | {e['identification']['rank1']:.4f} | {e['identification']['map@8']:.4f} | "
              f"{lfw} | {e['seconds']:.1f} s |")
    print("\n| gallery | noisy identities | look-alike identity pairs | near-duplicate groups | audit time |")
    print("|---|---|---|---|---|")
    for name in galleries:
        a = results[name]["audit"]
        print(f"| {name} | {a['noisy']} | {a['lookalikes']:,} | {a['duplicates']} | {a['seconds']:.1f} s |")
    r = results["report"]
    print(f"\nreport: {r['queries']} queries, {r['faces']} faces in {r['seconds']:.0f} s, "
          f"{r['bytes'] / 2**20:.1f} MiB; chromium: {r['chromium']}")


if __name__ == "__main__":
    main()
