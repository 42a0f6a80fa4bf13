"""report.html as a browser shows it: rendered by headless Chromium, with no server and no network.

Skipped, with a message, where Chromium is not installed (Debian package `chromium`; .ci/run installs it).
"""

import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from conftest import cli, fake_run

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="headless Chromium not found (apt-get install chromium); report.html not rendered"
)

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars"]
# Added to a copy of the report only: after loading, record how many images actually decoded.
PROBE = ("<script>addEventListener('load', () => { const im = [...document.images]; document.body.dataset.decoded ="
         " im.filter(i => i.complete && i.naturalWidth > 0).length + '/' + im.length; });</script>")


def chromium(tmp_path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile{len(list(tmp_path.glob('profile*')))}"
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True,
                          timeout=180)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    run = fake_run(tmp_path_factory.mktemp("html") / "run", n_classes=3, n_test=90)
    cli("compare", "--run", run, "--no-gradcam")
    return run / "compare" / "report.html"


def test_every_embedded_chart_decodes_in_chromium(report, tmp_path):
    probe = tmp_path / "probe.html"
    probe.write_text(report.read_text().replace("</body>", PROBE + "</body>"))
    r = chromium(tmp_path, "--virtual-time-budget=10000", "--dump-dom", probe.as_uri())
    assert r.returncode == 0, r.stderr[-2000:]
    assert 'data-decoded="7/7"' in r.stdout, r.stdout[:500]
    assert "<table>" in r.stdout and "Is the difference real?" in r.stdout


def test_report_screenshot_is_not_blank(report, tmp_path):
    shot = tmp_path / "report.png"
    r = chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,2400", report.as_uri())
    assert r.returncode == 0 and shot.is_file(), r.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.shape[:2] == (2400, 1280)
    ink = (pixels.sum(axis=2) < 600).mean()  # share of pixels that are not (near) white
    assert 0.03 < ink < 0.9
    # The CNN's bar colour (plots.CNN_COLOR #444444) is on screen: the charts were drawn, not just text.
    assert (np.abs(pixels - [0x44, 0x44, 0x44]).sum(axis=2) < 12).sum() > 2000
