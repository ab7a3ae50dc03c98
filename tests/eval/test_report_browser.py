"""tuna-eval report in a real browser: headless Chromium (Debian's ``chromium``) driven by playwright opens
the page from disk and checks the summary numbers, a filter, the images, paging and that planted markup
stays text. Needs /usr/bin/chromium and the playwright package (.ci/run installs both); without them the
test fails, it is not skipped."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from eval.report import ReportConfig, build_report
from tests.eval.test_report import PLANTED, report_runs  # noqa: F401 (report_runs is a fixture)

CHROMIUM = os.environ.get("TUNA_CHROMIUM", "/usr/bin/chromium")
# headless, and nothing that reaches out to the network: the test machines have none
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    if not (Path(CHROMIUM).is_file() or shutil.which(CHROMIUM)):
        pytest.fail(f"no Chromium at {CHROMIUM}: install Debian's package (apt-get install --no-install-recommends "
                    "chromium; .ci/run does) or set TUNA_CHROMIUM", pytrace=False)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the playwright package is missing: pip install -c constraints.txt -e '.[test]' "
                    "(never 'playwright install': the test uses the system Chromium)", pytrace=False)
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def page_file(report_runs, tmp_path_factory):  # noqa: F811 (the imported fixture)
    out = tmp_path_factory.mktemp("report_page") / "report.html"
    build_report(ReportConfig(runs=[str(report_runs["root"] / n) for n in ("baseline", "tuna")], out=str(out),
                              datastore=str(report_runs["datastore"])), progress=False)
    return out


def _visible_ids(page) -> list[str]:
    return page.eval_on_selector_all("#samples .sample", "cards => cards.map(c => c.dataset.id)")


def test_report_in_chromium(browser, page_file, report_runs, tmp_path):  # noqa: F811
    page = browser.new_page(viewport={"width": 1300, "height": 900})
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(page_file.as_uri())
    page.wait_for_load_state("load")
    assert errors == []

    # the summary shows results.json's numbers
    rows = page.eval_on_selector_all("#summary tr.benchrow, #summary tr.grouprow",
                                     "rows => rows.map(r => [...r.cells].map(c => c.textContent))")
    for c, name in enumerate(("baseline", "tuna"), start=1):
        entry = report_runs["results"][name]["benchmarks"]["synth_open"]
        expected = [entry["metrics"]["accuracy"]] + [entry["groups"]["novelty"][v]["accuracy"]
                                                    for v in ("novel", "seen")]
        assert [row[c] for row in rows] == [f"{v:.1f}" for v in expected]

    # every sample on one page; every image decoded, the missing one a placeholder
    assert _visible_ids(page) == ["q1", "q2", "q3", "q4"]
    widths = page.eval_on_selector_all("img", "imgs => imgs.map(i => i.complete ? i.naturalWidth : -1)")
    assert len(widths) == 4 + 2 * 3 and all(w > 0 for w in widths), widths  # 4 cards minus 1 missing + neighbours
    assert page.locator(".ph.main").count() == 1

    # planted markup did not run and reads literally
    assert page.evaluate("typeof window.__pwned") == "undefined"
    assert page.locator(".question", has_text=PLANTED).count() == 1
    assert page.locator(".answer .text", has_text="<img src=x onerror='window.__pwned=3'>").count() == 1
    assert page.locator(".tag .name", has_text="<b>zutag</b>").count() == 4  # one tag block per TUNA answer

    # run A (TUNA) right and run B (baseline) wrong: q2 and q3 only; then a group on top
    assert page.eval_on_selector("#f-a", "s => s.selectedOptions[0].textContent") == "tuna"
    page.select_option("#f-rel", "a-right-b-wrong")
    assert _visible_ids(page) == ["q2", "q3"]
    assert page.locator("#count").text_content() == "2 of 4 samples"
    page.select_option("#f-rel", "all")
    page.select_option("#f-group", "novelty=seen")
    assert _visible_ids(page) == ["q1", "q4"]
    page.select_option("#f-group", "")
    page.select_option("#f-size", "10")
    page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
    assert (tmp_path / "report.png").stat().st_size > 0
    page.close()


def test_paging_renders_one_page_at_a_time(browser, report_runs, tmp_path):  # noqa: F811
    """23 copies of the run's questions: pages of 10, and the next button moves on."""
    run = tmp_path / "many"
    (run / "synth_open").mkdir(parents=True)
    shutil.copy(report_runs["root"] / "tuna" / "results.json", run / "results.json")
    lines = (report_runs["root"] / "tuna" / "synth_open" / "predictions.jsonl").read_text().splitlines()
    records = [{**json.loads(line), "question_id": f"p{k:02d}"} for k in range(23) for line in lines[:1]]
    (run / "synth_open" / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "many.html"
    build_report(ReportConfig(runs=[str(run)], out=str(out)), progress=False)
    page = browser.new_page()
    page.goto(out.as_uri())
    page.select_option("#f-size", "10")
    assert _visible_ids(page) == [f"p{k:02d}" for k in range(10)]
    assert page.locator("#pager-top .pageno").text_content() == "page 1 of 3"
    page.locator("#pager-top .next").click()
    page.locator("#pager-top .next").click()
    assert _visible_ids(page) == ["p20", "p21", "p22"]
    assert page.locator("#pager-top .next").is_disabled()
    page.close()
