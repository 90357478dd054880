"""The HTML report in a real browser: headless Chromium opens it offline, with no console
error, every chart decoded and drawn with content, and a screenshot kept in tmp_path.

Needs Chromium (Debian's `chromium` package; .ci/run installs it) but no LLM; without it the
test skips itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from opro_agent import RunStore
from opro_agent.reports import RunReport, RunsComparison
from opro_agent.reports.html import render_comparison, render_report
from tests.browser import chromium_page, find_chromium
from tests.test_report import PNG_MAGIC, ape_run, make_task, opro_run

CHROMIUM = find_chromium()
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="needs Chromium (apt-get install chromium; .ci/run installs it)"
)

# For each image: decoded size, and how much of it is not background (sampled pixels).
CHART_PIXELS = """
Array.from(document.images).map((img) => {
  const box = img.getBoundingClientRect();
  if (!img.naturalWidth || !img.naturalHeight) {
    return {complete: img.complete, width: 0, height: 0, shownWidth: box.width, ink: 0,
            colours: 0};
  }
  const canvas = document.createElement("canvas");
  canvas.width = img.naturalWidth;
  canvas.height = img.naturalHeight;
  const context = canvas.getContext("2d");
  context.drawImage(img, 0, 0);
  const data = context.getImageData(0, 0, canvas.width, canvas.height).data;
  let ink = 0, samples = 0;
  const colours = new Set();
  for (let i = 0; i < data.length; i += 4 * 5) {
    samples++;
    if (data[i] < 235 || data[i + 1] < 235 || data[i + 2] < 235) ink++;
    colours.add((data[i] << 16) | (data[i + 1] << 8) | data[i + 2]);
  }
  return {complete: img.complete, width: img.naturalWidth, height: img.naturalHeight,
          shownWidth: box.width, ink: samples ? ink / samples : 0, colours: colours.size};
})
"""


def _open(html: Path, profile: Path, screenshot: Path) -> tuple[list[str], list[dict[str, Any]]]:
    assert CHROMIUM is not None
    with chromium_page(CHROMIUM, profile) as page:
        page.open(html.resolve().as_uri(), width=1200, height=900)
        charts: list[dict[str, Any]] = page.evaluate(CHART_PIXELS)
        page.screenshot(screenshot)
        return page.load.errors, charts


def _check_charts(charts: list[dict[str, Any]], expected: int) -> None:
    assert len(charts) == expected
    for chart in charts:
        assert chart["complete"] and chart["width"] > 300 and chart["height"] > 150, chart
        assert 0 < chart["shownWidth"] <= 1200, chart
        # Axes, points and text: a real chart, neither blank nor a solid block.
        assert 0.01 < chart["ink"] < 0.9 and chart["colours"] > 8, chart


def test_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    store = RunStore.open(tmp_path / "runs")
    result = ape_run(store, make_task(hostile=True))
    html = tmp_path / "report.html"
    html.write_text(render_report(RunReport.from_store(store, result.run_id)).html, "utf-8")

    screenshot = tmp_path / "report.png"
    errors, charts = _open(html, tmp_path / "profile", screenshot)

    assert errors == []
    _check_charts(charts, expected=5)  # search, finalists, lineage, test, spending
    shot = screenshot.read_bytes()
    assert shot.startswith(PNG_MAGIC) and len(shot) > 50_000


def test_comparison_renders_in_headless_chromium(tmp_path: Path) -> None:
    store = RunStore.open(tmp_path / "runs")
    task = make_task()
    ids = [opro_run(store, task).run_id, ape_run(store, task).run_id]
    html = tmp_path / "compare.html"
    html.write_text(render_comparison(RunsComparison.from_store(store, ids)), "utf-8")

    screenshot = tmp_path / "compare.png"
    errors, charts = _open(html, tmp_path / "profile", screenshot)

    assert errors == []
    _check_charts(charts, expected=2)
    assert screenshot.read_bytes().startswith(PNG_MAGIC)


def test_the_browser_check_sees_console_errors_and_blocked_requests(tmp_path: Path) -> None:
    """The harness itself: a console error and a request the report's policy refuses are
    both caught, so an empty error list above means something."""
    page = tmp_path / "bad.html"
    page.write_text(
        '<!DOCTYPE html><html><head><meta http-equiv="Content-Security-Policy" '
        "content=\"default-src 'none'; script-src 'unsafe-inline'\"></head><body>"
        '<script>console.error("boom")</script>'
        '<img src="http://127.0.0.1:9/chart.png"></body></html>',
        "utf-8",
    )
    errors, charts = _open(page, tmp_path / "profile", tmp_path / "bad.png")
    assert any("boom" in e for e in errors)
    assert any("Content Security Policy" in e or "127.0.0.1:9" in e for e in errors), errors
    assert charts[0]["width"] == 0
