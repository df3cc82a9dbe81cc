"""Campaign reports: ``executorkit report DIR``, ``campaign_report`` and the page in a real
headless browser (Debian's chromium)."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import taskfuncs as tf

from executorkit import SingleNodeExecutor, campaign_report
from executorkit.cli import main

T = 60
CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)


@pytest.fixture(scope="module")
def campaign(tmp_path_factory):
    """A cache with done, failed, killed (a process that died, a timeout) and retried calls."""
    cache = str(tmp_path_factory.mktemp("campaign") / "cache")
    with SingleNodeExecutor(max_workers=2, cache_directory=cache) as exe:
        futures = [exe.submit(tf.inc, i) for i in range(6)]
        futures += [exe.submit(tf.fail, "boom"), exe.submit(tf.exit_now, 3),
                    exe.submit(tf.sleep_forever, resource_dict={"run_time_max": 0.5}),
                    exe.submit(tf.exit_now, 4, resource_dict={"max_retries": 1})]
        for f in futures:
            f.exception(timeout=T)
    return cache


def test_report_counts_outcomes_and_keeps_every_attempt(campaign):
    report = campaign_report(campaign)
    # exit_now with one retry: two attempts, both killed
    assert report.counts() == {"done": 6, "failed": 1, "killed": 4}
    assert all(re.fullmatch(r".+ slot [01]", c.lane) for c in report.calls)  # recorded slots
    failed = next(c for c in report.calls if c.outcome == "failed")
    assert failed.error == "ValueError: boom" and "in fail" in failed.traceback
    assert "<svg" in report._repr_html_()  # what Jupyter shows inline


def test_cli_writes_one_self_contained_page(campaign, tmp_path, capsys):
    out = tmp_path / "r.html"
    assert main(["report", campaign, "-o", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    page = out.read_text()
    for figure in ("ekit-timeline", "ekit-concurrency", "ekit-histogram", "ekit-failures"):
        assert f'class="{figure}"' in page
    assert len(re.findall(r'<rect class="ekit-call', page)) == 11
    assert not re.search(r'(src|href)=|<link|@import|url\(', page)  # nothing fetched


def test_report_of_an_empty_or_missing_directory(tmp_path, capsys):
    assert "No calls recorded" in campaign_report(tmp_path).fragment()
    assert main(["report", str(tmp_path / "nope"), "-o", str(tmp_path / "x.html")]) == 2
    assert "not a directory" in capsys.readouterr().err


def _browse(page, profile):
    """The DOM after load and the console messages, from headless chromium."""
    proc = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
         "--v=0", f"--user-data-dir={profile}", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    console = [ln for ln in proc.stderr.splitlines() if ":CONSOLE" in ln]
    return proc.stdout, console


def _page_errors(dom):
    match = re.search(r'<pre class="ekit-errors"[^>]*>(.*?)</pre>', dom, re.S)
    return match.group(1) if match else "the error box is missing"


@pytest.mark.skipif(CHROMIUM is None, reason="needs chromium (apt-get install chromium)")
def test_page_renders_in_a_headless_browser_without_errors(campaign, tmp_path):
    page = tmp_path / "report.html"
    campaign_report(campaign).write(page)
    dom, console = _browse(page, tmp_path / "profile")
    assert console == []
    assert _page_errors(dom) == ""
    assert 'data-ready="3"' in dom  # the page's script ran and found its three figures
    assert len(re.findall(r'<rect class="ekit-call', dom)) == 11
    assert re.search(r'<path class="ekit-running" d="M[^"]+"', dom)
    assert len(re.findall(r'<rect class="ekit-bin', dom)) >= 3  # done, failed, killed
    assert dom.count("<details") == 5

    # The check itself: a script error in the same page is seen, in the page and the log.
    broken = tmp_path / "broken.html"
    broken.write_text(page.read_text().replace("</body>",
                                               "<script>no_such_function();</script></body>"))
    dom, console = _browse(broken, tmp_path / "profile2")
    assert "no_such_function" in _page_errors(dom)
    assert any("no_such_function" in line for line in console)


def test_block_allocation_calls_are_drawn_per_worker(tmp_path):
    cache = str(tmp_path / "cache")
    with SingleNodeExecutor(max_workers=2, block_allocation=True, cache_directory=cache) as exe:
        for f in [exe.submit(tf.inc, i) for i in range(20)]:
            f.result(timeout=T)
    lanes = {c.lane.rsplit(" ", 1)[-1] for c in campaign_report(cache).calls}
    assert lanes <= {"0", "1"}  # one row per persistent worker
