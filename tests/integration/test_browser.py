"""A real browser (headless Debian `chromium`) loads the web page, a study's page with its
series thumbnails, the cluster page and, when `make viewer` has laid OHIF out, the viewer
with a study (WebGL on SwiftShader); each screenshot must show a picture, not a blank page.

Driver: chromium's own `--headless --screenshot` command line (no extra Python package,
no browser download); `--virtual-time-budget` lets the page's fetches finish before the
shot. The screenshots are copied to docs/screenshots/ when PACSNODE_KEEP_SCREENSHOTS=1.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
from PIL import Image, ImageStat

from pacsnode.sim import datagen

from . import clients

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None or not clients.have_dcmtk(),
                                reason="chromium (Debian package) or dcmtk is not installed")
SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
VIEWER_DIR = Path(__file__).resolve().parents[2] / "node" / "ohif"  # `make viewer`; not in git.


def screenshot(url: str, path: Path, *, budget_ms: int = 8000, size: str = "1280,800") -> Image.Image:
    """chromium's headless screenshot of `url` after `budget_ms` of virtual time."""
    profile = path.parent / f"{path.stem}-profile"
    command = [str(CHROMIUM), "--headless=new", "--no-sandbox", "--use-angle=swiftshader",
               "--enable-unsafe-swiftshader", "--no-first-run", "--disable-extensions",
               f"--user-data-dir={profile}", f"--window-size={size}", f"--virtual-time-budget={budget_ms}",
               "--hide-scrollbars", f"--screenshot={path}", url]
    result = subprocess.run(command, capture_output=True, text=True, timeout=90)
    assert path.is_file(), f"no screenshot of {url}: {result.stderr[-2000:]}"
    shutil.rmtree(profile, ignore_errors=True)
    image = Image.open(path).convert("RGB")
    if os.environ.get("PACSNODE_KEEP_SCREENSHOTS") == "1":
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, SCREENSHOTS / path.name)
    return image


def not_blank(image: Image.Image, box: tuple[int, int, int, int] | None = None) -> tuple[float, int]:
    """(mean per-channel standard deviation, distinct colours) of the image or a region of it."""
    region = image.crop(box) if box else image
    stddev = sum(ImageStat.Stat(region).stddev) / 3
    colours = len(region.getcolors(maxcolors=1 << 20) or [])
    return stddev, colours


def _study_set(tmp_path: Path) -> list[datagen.ManifestEntry]:
    spec = datagen.StudySetSpec(patients=3, series_per_study=2, instances_per_series=3, rows=128, cols=128,
                                modalities=("CT",), seed=13)
    return datagen.write_study_set(spec, tmp_path / "data")


def test_web_pages_in_a_browser(node_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    node = node_factory.start("web-1")
    manifest = _study_set(tmp_path)
    _result, acked = clients.storescu(node.dicom_port, [entry["path"] for entry in manifest])
    assert len(acked) == len(manifest)
    url = f"http://127.0.0.1:{node.http_port}"
    study = manifest[0]["study_uid"]

    # The study list: the three patients' rows are drawn (text on white has many shades).
    studies = screenshot(url + "/ui/index.html", tmp_path / "web-studies.png")
    stddev, colours = not_blank(studies)
    assert stddev > 10 and colours > 50, (stddev, colours)

    # A study's page: its series thumbnails are the node's /thumbnail JPEGs of noise images,
    # so the page's pixels vary far more than a page of text does.
    page = screenshot(f"{url}/ui/study.html?study={study}", tmp_path / "web-study.png")
    stddev, colours = not_blank(page)
    assert stddev > 10 and colours > 200, (stddev, colours)
    assert httpx.get(f"{url}/dicom-web/studies/{study}/series/{manifest[0]['series_uid']}/thumbnail").status_code == 200

    cluster = screenshot(url + "/ui/cluster.html", tmp_path / "web-cluster.png")
    stddev, colours = not_blank(cluster)
    assert stddev > 10 and colours > 50, (stddev, colours)


@pytest.mark.skipif(not (VIEWER_DIR / "index.html").is_file(), reason="OHIF is not laid out (run `make viewer`)")
def test_viewer_shows_a_study_in_a_browser(node_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    manifest = _study_set(tmp_path)
    study = manifest[0]["study_uid"]
    viewer_node = node_factory.start("web-2", extra_args=["--viewer-dir", str(VIEWER_DIR)])
    _result, acked = clients.storescu(viewer_node.dicom_port, [e["path"] for e in manifest if e["study_uid"] == study])
    assert acked
    viewer = screenshot(f"http://127.0.0.1:{viewer_node.http_port}/viewer/viewer?StudyInstanceUIDs={study}",
                        tmp_path / "viewer-study.png", budget_ms=20000)
    # The viewport (right of the series panel, above OHIF's notice) shows the image: noise,
    # so black and white in equal parts; OHIF's viewport without an image is flat black.
    stddev, colours = not_blank(viewer, (420, 80, 1140, 680))
    assert stddev > 60 and colours > 20, (stddev, colours)
