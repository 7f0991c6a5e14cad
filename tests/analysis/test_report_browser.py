"""The HTML report opened in headless Chromium: it renders without errors, every image loads, and with the
browser's own fonts every legend's text fits its box, no legend lies on the data, no label leaves its image.

Needs Debian's chromium (``apt-get install chromium``; .ci/run installs it); skipped where it is missing.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from lowbit.onnx import Budget, Options
from lowbit.onnx.analyze import Reporting, analyze
from lowbit.onnx.settings import edit
from lowbit.recipe import preset
from tests.onnx import models

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

# Injected first into the page's <head>: records errors (scripts, and images that fail: their error events reach
# window in the capture phase) and, once loaded, writes what it found into the DOM for --dump-dom to show.
PROBE = """<script>
window.__errors = [];
window.addEventListener('error', e => window.__errors.push(String(e.message || (e.target && e.target.alt) || e.type)),
                        true);
window.addEventListener('load', () => {
  const imgs = Array.from(document.images);
  const broken = imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt);
  const d = document.createElement('div');
  d.id = 'lowbit-check';
  d.textContent = JSON.stringify({images: imgs.length, broken: broken, errors: window.__errors,
                                  height: document.body.scrollHeight});
  document.body.appendChild(d);
});
</script>"""


def _chromium(tmp_path, *args):
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000"]  # fmt: skip
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_report_renders_in_chromium_and_every_image_loads(tmp_path):
    model = models.save(models.convnet(), tmp_path / "convnet.onnx")
    data = models.calib_data(tmp_path / "calib.npz", (3, 16, 16))
    report = tmp_path / "report.html"
    from lowbit.onnx import metrics
    from tests.onnx.test_analyze import _feeds

    analyze(
        model,
        data,
        edit(preset("int8"), per_channel=False),
        budget=Budget(metrics.OutputMetric("cosine", _feeds()), 0),
        options=Options(progress=False),
        report=Reporting(samples=16, html=report),
    )
    html = report.read_text()
    probed = tmp_path / "probed.html"
    probed.write_text(html.replace("<head>", "<head>" + PROBE, 1))
    run = _chromium(tmp_path, "--dump-dom", probed.as_uri())
    found = re.search(r'<div id="lowbit-check">(.*?)</div>', run.stdout)
    assert found, f"the page did not finish loading in Chromium: {run.stderr[-2000:]}"
    check = json.loads(found.group(1).replace("&quot;", '"'))
    assert check["errors"] == [] and check["broken"] == []
    assert check["images"] == html.count("<img ") and check["images"] >= 5
    assert check["height"] > 2000  # tables and plots laid out, not an empty page


# Run in a page holding each chart of a report inline (an <img> hides an SVG's elements from scripts): measures,
# with the fonts Chromium really uses, each legend's text against its box and the data area, and every text
# against its chart.
MEASURE = """<script>
window.addEventListener('load', () => {
  const problems = [];
  const r = e => e.getBoundingClientRect();
  const inside = (a, b) => a.left >= b.left - 0.5 && a.right <= b.right + 0.5 && a.top >= b.top - 0.5
                           && a.bottom <= b.bottom + 0.5;
  const overlap = (a, b) => a.left < b.right && b.left < a.right && a.top < b.bottom && b.top < a.bottom;
  let legends = 0;
  document.querySelectorAll('svg').forEach((svg, i) => {
    const title = svg.querySelector('text').textContent;
    svg.querySelectorAll('text').forEach(t => {
      if (!inside(r(t), r(svg))) problems.push(`${title}: "${t.textContent}" leaves the chart`);
    });
    const legend = svg.querySelector('g.legend'), plot = svg.querySelector('rect.plot');
    if (!legend) return;
    legends += 1;
    const box = r(legend.querySelector('rect'));
    if (plot && overlap(box, r(plot))) problems.push(`${title}: the legend lies on the data`);
    legend.querySelectorAll('text').forEach(t => {
      if (!inside(r(t), box)) problems.push(`${title}: "${t.textContent}" runs out of the legend's box`);
    });
  });
  const d = document.createElement('div');
  d.id = 'lowbit-measure';
  d.textContent = JSON.stringify({charts: document.querySelectorAll('svg').length, legends: legends,
                                  problems: problems});
  document.body.appendChild(d);
});
</script>"""


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_legends_and_labels_fit_with_the_browsers_own_fonts(tmp_path):
    import base64

    model = models.save(models.convnet(), tmp_path / "convnet.onnx")
    data = models.calib_data(tmp_path / "calib.npz", (3, 16, 16))
    analyze(
        model,
        data,
        edit(preset("int8"), per_channel=False),
        options=Options(progress=False),
        report=Reporting(samples=16, html=tmp_path / "report.html", profile=False),
    )
    uris = re.findall(r'src="data:image/svg\+xml;base64,([^"]+)"', (tmp_path / "report.html").read_text())
    charts = "".join(f"<div>{base64.b64decode(u).decode()}</div>" for u in uris)
    page = tmp_path / "charts.html"
    page.write_text(f"<!DOCTYPE html><html><head><meta charset='utf-8'>{MEASURE}</head><body>{charts}</body></html>")
    run = _chromium(tmp_path, "--dump-dom", page.as_uri())
    found = re.search(r'<div id="lowbit-measure">(.*?)</div>', run.stdout)
    assert found, f"the page did not finish loading in Chromium: {run.stderr[-2000:]}"
    check = json.loads(found.group(1).replace("&quot;", '"'))
    assert check["charts"] == len(uris) and check["legends"] >= 3  # the SQNR chart and the histograms
    assert check["problems"] == []
