"""The book as a reader gets it: built with `jupyter-book build --all -W` (executing every
notebook at tiny scale, offline), then each chapter page opened in headless Chromium with the
network closed.

Slow (it executes all the notebooks): marked `book`, run by `make test`, skipped by
`make test-fast`. To check an already built book instead of building one, set
BBERT_BOOK_HTML=_build/html. Screenshots go to _build/screenshots/.
"""
import html
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from urllib.parse import unquote

import pytest
import yaml

pytestmark = pytest.mark.book

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOTS = ROOT / "_build" / "screenshots"
BUILD_TIMEOUT_S = 3600

# No request may leave the machine: a dead proxy, and no name resolves. file:// pages still load.
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
    "--proxy-server=http://127.0.0.1:9", "--host-resolver-rules=MAP * ~NOTFOUND",
    "--virtual-time-budget=8000",
]

# Injected into a copy of each page: waits for load (and the widget manager), then writes what
# a reader would see into <pre id="bbert-check"> for --dump-dom to carry out.
CHECK_SCRIPT = """
<script>
window.addEventListener("load", function () {
  setTimeout(function () {
    var main = document.querySelector("article.bd-article") || document.querySelector("main") || document.body;
    var all = function (root, sel) { return Array.prototype.slice.call(root.querySelectorAll(sel)); };
    var inState = {};
    all(document, 'script[type="application/vnd.jupyter.widget-state+json"]').forEach(function (s) {
      try { Object.keys(JSON.parse(s.textContent).state).forEach(function (k) { inState[k] = true; }); } catch (e) {}
    });
    var views = all(main, 'script[type="application/vnd.jupyter.widget-view+json"]').map(function (s) {
      var id = ""; try { id = JSON.parse(s.textContent).model_id; } catch (e) {}
      var area = s.previousElementSibling;
      var rendered = !!(area && area.classList.contains("widget-subarea") && area.querySelector(".jupyter-widgets"));
      return {model_id: id, in_state: !!inState[id], rendered: rendered,
              text: area ? area.innerText.slice(0, 300) : ""};
    });
    var report = {
      title: (main.querySelector("h1") || {innerText: ""}).innerText,
      images: all(main, "img").map(function (im) {
        return {src: im.getAttribute("src"), width: im.naturalWidth, height: im.naturalHeight,
                in_output: !!im.closest(".cell_output")};
      }),
      widget_views: views,
      widget_class_elements: all(main, '[class*="widget-"]').length,
      tracebacks: all(main, ".output.traceback, .output.error").map(function (e) { return e.innerText.slice(0, 2000); }),
      stderr: all(main, ".output.stderr").map(function (e) { return e.innerText.slice(0, 2000); }),
      clipped_code: all(main, "div.cell_input pre").filter(function (p) {
        return p.scrollWidth > p.clientWidth + 1;
      }).map(function (p) { return p.innerText.split("\\n")[0].slice(0, 120); }),
      outputs: all(main, ".cell_output").map(function (e) { return e.innerText.slice(0, 4000); }),
      toc: all(document, "nav.bd-docs-nav a.reference.internal").map(function (a) { return a.href; }),
      dropdowns: all(main, "details").map(function (d) {
        var summary = d.querySelector("summary");
        return {open: d.open, summary: summary ? summary.innerText.trim() : "",
                hidden_text: d.innerText.length};
      }),
      exercises: !!main.querySelector("section#exercises"),
      math_nodes: all(main, ".math").length,
      math_rendered: all(main, "mjx-container").length
    };
    var pre = document.createElement("pre");
    pre.id = "bbert-check";
    pre.textContent = JSON.stringify(report);
    document.body.appendChild(pre);
  }, 3000);
});
</script>
"""


def toc_files(node) -> list[str]:
    files = []
    if isinstance(node, dict):
        files += [node[k] for k in ("root", "file") if k in node]
        node = list(node.values())
    if isinstance(node, list):
        for item in node:
            if isinstance(item, (dict, list)):
                files += toc_files(item)
    return files


CHAPTERS = toc_files(yaml.safe_load((ROOT / "_toc.yml").read_text()))
# The chapters whose plots the book promises (the planner, the speed-up bars, the schedule and
# loss curves, the GLUE scores). Every other page must still load every image it has.
PLOT_CHAPTERS = ["notebooks/01_budget", "notebooks/03_model", "notebooks/04_pretraining",
                 "notebooks/05_finetuning", "notebooks/06_findings", "notebooks/07_beyond",
                 "notebooks/08_your_domain"]
# Every chapter notebook ends with exercises whose solutions are folded away.
EXERCISE_CHAPTERS = [c for c in CHAPTERS if c.startswith("notebooks/")]


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.fixture(scope="module")
def html_dir(tmp_path_factory) -> Path:
    prebuilt = os.environ.get("BBERT_BOOK_HTML")
    if prebuilt:
        path = Path(prebuilt).resolve()
        assert (path / "index.html").exists(), f"BBERT_BOOK_HTML={prebuilt} holds no built book (index.html)"
        return path
    out = tmp_path_factory.mktemp("book")
    exe = Path(sys.executable).parent / "jupyter-book"
    exe = str(exe) if exe.exists() else shutil.which("jupyter-book")
    assert exe, "jupyter-book is not installed: pip install -e '.[book]'"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "BBERT_SCALE": "tiny"}
    proc = subprocess.run([exe, "build", "--all", "-W", "--keep-going", "--path-output", str(out), str(ROOT)],
                          env=env, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    log = proc.stdout + proc.stderr
    warnings = [line for line in log.splitlines() if re.search(r"WARNING|ERROR|Traceback", line)]
    assert proc.returncode == 0, ("jupyter-book build -W failed:\n" + "\n".join(warnings[:40])
                                  + "\n...\n" + log[-3000:])
    return out / "_build" / "html"


@pytest.fixture(scope="module")
def chromium() -> str:
    exe = find_chromium()
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("CI is set but chromium is not installed: apt-get install -y chromium")
        pytest.skip("chromium is not installed (apt-get install -y chromium); "
                    "the pages were not opened in a browser")
    return exe


def run_chromium(exe: str, *args: str) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="bbert-chromium-") as profile:
        return subprocess.run([exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                              capture_output=True, text=True, timeout=180)


def page_path(html_dir: Path, chapter: str) -> Path:
    return html_dir / f"{chapter}.html"


def inspect_page(exe: str, page: Path) -> dict:
    """Open ``page`` (a copy with CHECK_SCRIPT injected) and return its report."""
    probe = page.with_name(page.stem + ".bbert-check.html")
    text = page.read_text(encoding="utf-8")
    assert "</body>" in text, f"{page} has no </body>"
    probe.write_text(text.replace("</body>", CHECK_SCRIPT + "</body>", 1), encoding="utf-8")
    try:
        # The width of the screenshots: both sidebars shown beside the article.
        proc = run_chromium(exe, "--window-size=1280,2400", "--dump-dom", probe.as_uri())
    finally:
        probe.unlink()
    found = re.search(r'<pre id="bbert-check">(.*?)</pre>', proc.stdout, re.S)
    assert found, f"Chromium did not run the page check on {page.name}:\n{proc.stderr[-2000:]}"
    return json.loads(html.unescape(found.group(1)))


@pytest.fixture(scope="module")
def reports(html_dir, chromium) -> dict:
    """chapter -> what Chromium saw on its page; also saves a screenshot of each page."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    out = {}
    for chapter in CHAPTERS:
        page = page_path(html_dir, chapter)
        if not page.exists():
            continue  # test_every_chapter_page_is_built reports it
        out[chapter] = inspect_page(chromium, page)
        shot = SCREENSHOTS / (chapter.replace("/", "__") + ".png")
        run_chromium(chromium, "--window-size=1280,2400", "--hide-scrollbars",
                     f"--screenshot={shot}", page.as_uri())
    return out


def report_for(reports: dict, chapter: str) -> dict:
    if chapter not in reports:
        pytest.fail(f"{chapter}: no HTML page was built for it")
    return reports[chapter]


def test_every_chapter_page_is_built(html_dir):
    missing = [c for c in CHAPTERS if not page_path(html_dir, c).exists()]
    assert not missing, f"no HTML page for {missing} in {html_dir}"
    assert (html_dir / "_static" / "embed-amd.js").exists(), "the widget JavaScript was not copied"


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_page_shows_its_figures(reports, chapter):
    report = report_for(reports, chapter)
    assert report["title"].strip(), f"{chapter}: the page has no title"
    broken = [im["src"] for im in report["images"] if not (im["width"] > 0 and im["height"] > 0)]
    assert not broken, f"{chapter}: images that did not load: {broken}"
    if chapter in PLOT_CHAPTERS:
        figures = [im for im in report["images"] if im["in_output"]]
        assert figures, f"{chapter}: the executed notebook shows no figure (its plots are missing)"
    if report["math_nodes"]:
        assert report["math_rendered"] > 0, f"{chapter}: math is not rendered (MathJax did not load)"


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_page_has_no_error_output(reports, chapter):
    report = report_for(reports, chapter)
    assert not report["tracebacks"], f"{chapter}: error output: {report['tracebacks'][:2]}"
    bad = [text for text in report["outputs"] if "Traceback (most recent call last)" in text]
    assert not bad, f"{chapter}: output shows an error: {bad[:2]}"
    # No stderr block on a page: progress is a widget bar in a notebook (bbert.progress), and a
    # warning a reader should see is printed as prose, not left as a red block.
    assert not report["stderr"], f"{chapter}: the page shows stderr blocks: {report['stderr'][:2]}"
    failed = [v for v in report["widget_views"] if "Error displaying widget" in v["text"]]
    assert not failed, f"{chapter}: widgets failed to display: {failed[:2]}"


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_code_cells_show_whole_lines(reports, chapter):
    """At the screenshots' 1280-pixel width no code cell scrolls sideways (book/static/bbert.css)."""
    clipped = report_for(reports, chapter)["clipped_code"]
    assert not clipped, f"{chapter}: code cells cut off at the right edge, starting {clipped[:3]}"


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_sidebar_lists_every_chapter(reports, html_dir, chapter):
    # A page links itself as "#", which resolved against the probe copy names the probe.
    hrefs = [h.replace(".bbert-check.html", ".html") for h in report_for(reports, chapter)["toc"]]
    listed = {Path(unquote(re.sub(r"[#?].*$", "", h.removeprefix("file://")))).resolve() for h in hrefs}
    expected = {page_path(html_dir, c).resolve() for c in CHAPTERS}
    # The root page is reached through the book title, and may also be in the list.
    missing = sorted(str(p.relative_to(html_dir)) for p in expected - listed
                     if p != page_path(html_dir, CHAPTERS[0]).resolve())
    assert not missing, f"{chapter}: the sidebar does not list {missing}"


def test_widgets_render_offline(reports):
    """Every saved widget view renders from the book's own JavaScript, with the network closed."""
    with_widgets = {c: r for c, r in reports.items() if any(v["in_state"] for v in r["widget_views"])}
    assert with_widgets, "no page of the book embeds a widget (the budget chapter has a planner)"
    for chapter, report in with_widgets.items():
        unrendered = [v["model_id"] for v in report["widget_views"] if v["in_state"] and not v["rendered"]]
        assert not unrendered, f"{chapter}: widget views that did not render offline: {unrendered[:5]}"
        assert report["widget_class_elements"] > 0, f"{chapter}: no widget- elements in the DOM"


@pytest.mark.parametrize("chapter", EXERCISE_CHAPTERS)
def test_exercise_solutions_are_folded(reports, chapter):
    """The solutions render as closed <details> dropdowns (sphinx-design: no JavaScript, no network)."""
    report = report_for(reports, chapter)
    assert report["exercises"], f"{chapter}: the page has no Exercises section"
    solutions = [d for d in report["dropdowns"] if d["summary"].startswith("Solution")]
    assert len(solutions) >= 3, f"{chapter}: {len(solutions)} solution dropdowns, want at least 3"
    assert not any(d["open"] for d in solutions), f"{chapter}: a solution is shown unfolded"


def test_findings_chapter_shows_its_results(reports):
    """The new chapter's four experiments ran: tables of outcomes and a figure for each."""
    report = report_for(reports, "notebooks/06_findings")
    figures = [im for im in report["images"] if im["in_output"]]
    assert len(figures) >= 4, f"the findings chapter shows {len(figures)} figures, want one per finding"
    text = "\n".join(report["outputs"])
    for expected in ("lr of the last step (share of the peak)", "2x the budget", "At the same tokens seen",
                     "steps in the budget", "final val loss", "Early stopping saved", "sparse MLM head"):
        assert expected in text, f"the findings chapter's output lacks {expected!r}"


def test_code_on_the_page_is_the_live_source(reports):
    import inspect

    from bbert.model import BertLayer

    text = "\n".join(report_for(reports, "notebooks/03_model")["outputs"])
    first_line = inspect.getsource(BertLayer.forward).strip().splitlines()[0]
    assert first_line in text, "chapter 3 does not show the source of BertLayer.forward"
