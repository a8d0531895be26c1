"""`alignforge report` renders in a real headless Chromium (Debian package `chromium`; the Makefile's
test target installs it, and so does this test when apt-get works), and the card links its plots."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest


def chromium_binary() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], capture_output=True, timeout=900)
        found = shutil.which("chromium")
    if not found:
        pytest.skip("headless Chromium is not installed and `apt-get install -y chromium` failed here "
                    "(no apt or no root); `make test` installs it")
    return found


def test_report_page_renders_step_table_and_plots_in_chromium(curate_run, tmp_path):
    from flows.cli import main

    out, result = curate_run
    page = tmp_path / "report.html"
    assert main(["report", str(out), "--out", str(page)]) == 0
    html = page.read_text()
    # Self-contained: no fetch of any kind (scripts, styles, images all inline).
    assert not re.search(r"""(src|href)=["'](https?:)?//""", html)
    assert html.count('src="data:image/png;base64,') >= 3
    assert 'id="step-table"' in html and "zipfit_not_selected" in html and "minhash_duplicate" in html

    chromium = chromium_binary()
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={tmp_path / 'chr'}"]
    dom = subprocess.run([chromium, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True,
                         timeout=300).stdout
    rendered = re.search(r'<table id="step-table">.*?</table>', dom, re.S)
    assert rendered, dom[:2000]
    cells = re.findall(r"<td[^>]*>([^<]*)</td>", rendered.group(0))
    assert ["zipfit", "1"] == cells[cells.index("zipfit"):cells.index("zipfit") + 2]
    assert "40" in cells[cells.index("zipfit"):cells.index("zipfit") + 6]

    shot = tmp_path / "report.png"
    subprocess.run([chromium, *flags, "--window-size=1280,1800", f"--screenshot={shot}", page.as_uri()],
                   capture_output=True, timeout=300)
    print(f"report screenshot: {shot}")
    import matplotlib.image

    pixels = matplotlib.image.imread(str(shot))[..., :3]
    # The plots' bar colour (reporting.plots.KEPT_COLOR, #1f77b4) covers a visible area: a plot rendered.
    blue = ((abs(pixels[..., 0] - 0x1F / 255) < 0.03) & (abs(pixels[..., 1] - 0x77 / 255) < 0.03)
            & (abs(pixels[..., 2] - 0xB4 / 255) < 0.03))
    assert blue.sum() > 2000, f"no plot visible in {shot}"


def test_card_links_plots_stored_in_publish_and_a_rerun_may_replace_them(curate_run):
    out, _ = curate_run
    publish = out / "publish"
    card = (publish / "README.md").read_text()
    manifest = json.loads((publish / "_manifest.json").read_text())
    links = re.findall(r"!\[[^\]]*\]\((plots/[^)]+\.png)\)", card)
    assert "plots/hist_zipfit_alignment.png" in links and "plots/steps_kept.png" in links
    for link in links:
        assert (publish / link).read_bytes().startswith(b"\x89PNG") and link in manifest["files"]
    assert card.index("## Steps") < card.index("## Plots")  # beside the step table
    assert "| zipfit |" in card
    import storage

    storage.check_publish_target(str(publish))  # plots are listed: the next publish may replace the folder
    assert not list(out.glob(".card-plot.tmp-*"))


def test_report_without_matplotlib_names_the_extra(curate_run, monkeypatch, capsys):
    import builtins

    from flows.cli import main

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert main(["report", str(curate_run[0])]) == 2
    assert "pip install 'alignforge[report]'" in capsys.readouterr().err
