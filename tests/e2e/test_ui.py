"""The web UI in a real headless Chromium (Debian's, driven by playwright-core: see
tests/e2e/browser.py), against a real `cistate serve` (orchestrator, worker and api roles as
a subprocess, PostgreSQL, RabbitMQ, sandboxed script steps). The page logs in with a real
token, follows a run live, travels in time, and acts as an operator; each test saves a
screenshot under $CISTATE_ARTEFACTS/ui (default /tmp/cistate-artefacts/ui)."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from cistate.adapters.http import pages
from cistate.adapters.postgres.store import Store
from cistate.config import Settings
from tests.conftest import settings_env, wait_until
from tests.e2e.browser import ROOT, Browser, install
from tests.integration.conftest import Producer, producer, wait_for_run  # noqa: F401 (fixture)
from tests.integration.processes import ServeProcess

pytestmark = pytest.mark.e2e

OPERATE = "ui-operate-token-5c1e"
READ = "ui-read-token-9a7b"
TOKENS = f"alice:{OPERATE}:operate,auditor:{READ}:read"
HOSTILE = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script>'

LIVE_PIPELINE = """
name: ui-live
steps:
  - name: prepare
    uses: script
    run: echo ready
  - name: count
    uses: script
    run: |
      echo 'HOSTILE'
      for i in 1 2 3 4 5 6; do echo "line $i at $(date +%s.%N)"; sleep 1; done
  - name: after
    uses: script
    run: echo done
""".replace("HOSTILE", HOSTILE)

RETRY_PIPELINE = """
name: ui-retry
steps:
  - name: build
    uses: script
    run: echo built
  - name: flaky
    uses: script
    retries: 1
    backoff: {initial: 1, jitter: 0}
    run: |
      echo "attempt $CISTATE_ATTEMPT"
      if [ "$CISTATE_ATTEMPT" = 1 ]; then echo "error: first attempts fail" >&2; exit 1; fi
      echo fine
"""

FAILING_PIPELINE = """
name: ui-fail
steps:
  - name: build
    uses: script
    run: echo built
  - name: check
    uses: script
    run: |
      echo "checking"
      echo "error: the check failed" >&2
      exit 3
"""

GATED_PIPELINE = """
name: ui-gate
steps:
  - name: build
    uses: script
    run: echo built
  - name: release-gate
    uses: approval
    with: {approvers: [alice], timeout: 1h}
  - name: release
    uses: script
    run: echo released
"""


@pytest.fixture(scope="session")
def chromium() -> str:
    return install()


@pytest.fixture
async def browser(chromium: str, tmp_path: Path) -> AsyncIterator[Browser]:
    started = await Browser(chromium, tmp_path / "chromium-profile").start()
    yield started
    await started.close()


@pytest.fixture
async def serve(make_settings: Callable[..., Settings], tmp_path: Path
                ) -> AsyncIterator[Callable[[str], Awaitable[tuple[str, Settings]]]]:
    """Start `cistate serve` (all roles) with this pipeline and two tokens, reads closed."""
    started: list[ServeProcess] = []

    async def start(pipeline: str, reads_open: bool = False) -> tuple[str, Settings]:
        settings = make_settings(pipeline, api_token=TOKENS, api_read_auth=not reads_open)
        process = ServeProcess(settings, ("orchestrator", "worker"), tmp_path / "serve.log")
        started.append(process)
        await process.start()
        return f"http://{process.settings.listen}", process.settings

    yield start
    for process in started:
        process.stop()


async def step_state(browser: Browser, step: str) -> str | None:
    state: str | None = await browser.eval(
        "s => document.querySelector(`#steps tr[data-step='${s}']`)?.dataset.state ?? null", step)
    return state


async def test_a_run_page_shows_states_change_live_and_each_log_line_within_2_s(
        serve: Any, producer: Producer, browser: Browser) -> None:  # noqa: F811
    base, _ = await serve(LIVE_PIPELINE)
    run_id = await producer.push()
    await browser.login(base, OPERATE, f"/runs/{run_id}")
    await browser.wait_for("() => document.querySelector('#steps tr[data-step=count]')")
    # the page records what it sees, as it sees it: each state of `count`, each log line's
    # arrival (this page's clock is the step's: the same machine), and never reloads
    await browser.eval("""() => {
      window.__marker = 'no reload';
      window.__states = [];
      window.__lines = {};
      const look = () => {
        const s = document.querySelector('#steps tr[data-step=count]')?.dataset.state;
        if (s && window.__states[window.__states.length - 1] !== s) window.__states.push(s);
        for (const el of document.querySelectorAll('.logpane[data-step=count] .line .text')) {
          const m = /^line (\\d) at ([0-9.]+)$/.exec(el.textContent);
          if (m && !(m[1] in window.__lines)) {
            window.__lines[m[1]] = [Number(m[2]), Date.now() / 1000];
          }
        }
      };
      new MutationObserver(look).observe(document.body, {subtree: true, childList: true,
                                                         attributes: true, characterData: true});
      look();
    }""")
    await browser.wait_for("() => document.querySelector('#steps tr[data-step=count]')"
                           "?.dataset.state === 'running'", timeout=60)
    await browser.call("click", selector="#tab-count")
    await browser.wait_for("() => Object.keys(window.__lines).length >= 3", timeout=30)
    await browser.screenshot("live-running")
    await browser.wait_for("() => document.querySelector('#run-state')?.dataset.state"
                           " === 'succeeded'", timeout=60)
    await browser.wait_for("() => Object.keys(window.__lines).length === 6", timeout=10)
    seen = await browser.eval("() => ({states: window.__states, lines: window.__lines,"
                              " marker: window.__marker, pwned: window.__pwned ?? null,"
                              " hostile: document.querySelector('.logpane[data-step=count]')"
                              "?.textContent.includes('<img src=x')})")
    await browser.screenshot("live-succeeded")
    assert seen["marker"] == "no reload"
    assert "running" in seen["states"] and seen["states"][-1] == "succeeded", seen["states"]
    delays = {n: shown - printed for n, (printed, shown) in seen["lines"].items()}
    assert all(-0.5 < delay < 2.0 for delay in delays.values()), delays
    # a log line that is markup is shown as its text, and never runs
    assert seen["hostile"] and seen["pwned"] is None
    # the graph and the timeline drew every step
    assert await browser.eval("() => document.querySelectorAll('.graph .node').length") == 3
    assert await browser.eval(
        "() => document.querySelectorAll('.attempt-row[data-step=count]').length") == 1


async def test_the_timeline_has_one_bar_per_attempt_after_a_retry(
        serve: Any, producer: Producer, browser: Browser, store: Store) -> None:  # noqa: F811
    base, _ = await serve(RETRY_PIPELINE)
    # the runs page, open before the push, shows the new run and its states as they change
    await browser.login(base, OPERATE, "/")
    await browser.wait_for("() => document.querySelector('.notice')?.textContent"
                           ".startsWith('0 runs')")
    await browser.eval("""() => { window.__marker = 'no reload'; window.__states = [];
      new MutationObserver(() => {
        const s = document.querySelector('#runs tbody tr [data-field=state]')?.textContent;
        if (s && window.__states[window.__states.length - 1] !== s) window.__states.push(s);
      }).observe(document.body, {subtree: true, childList: true, characterData: true}); }""")
    run_id = await producer.push()
    assert (await wait_for_run(store, run_id, timeout=90)).status == "succeeded"
    await browser.wait_for("id => document.querySelector(`#runs tr[data-run='${id}'] "
                           "[data-field=state]`)?.textContent === 'succeeded'", str(run_id))
    listed = await browser.eval("() => [window.__marker, window.__states]")
    assert listed[0] == "no reload" and listed[1][-1] == "succeeded", listed
    await browser.call("click", selector=f"#runs tr[data-run='{run_id}'] a")
    await browser.wait_for("() => document.querySelectorAll('.attempt-row').length >= 3")
    rows = await browser.eval("""() => Array.from(document.querySelectorAll('.attempt-row'))
      .map(g => ({step: g.dataset.step, attempt: Number(g.dataset.attempt),
                  outcome: g.dataset.outcome,
                  phases: Array.from(g.querySelectorAll('rect')).map(r => r.dataset.phase)}))""")
    await browser.screenshot("timeline-retry")
    flaky = [row for row in rows if row["step"] == "flaky"]
    assert [row["attempt"] for row in flaky] == [1, 2], rows
    assert flaky[0]["outcome"] == "failed" and "retrying" in flaky[0]["phases"]
    assert flaky[1]["outcome"] == "succeeded" and "running" in flaky[1]["phases"]
    assert [row["attempt"] for row in rows if row["step"] == "build"] == [1]
    assert await browser.eval("() => document.querySelector('#steps tr[data-step=flaky] "
                              "[data-field=attempts]').textContent") == "2"


async def test_the_slider_at_seq_n_shows_what_runs_show_at_n_shows(
        serve: Any, producer: Producer, browser: Browser, store: Store) -> None:  # noqa: F811
    base, settings = await serve(RETRY_PIPELINE)
    run_id = await producer.push()
    ended = await wait_for_run(store, run_id, timeout=90)
    await browser.login(base, READ, f"/runs/{run_id}")
    await browser.wait_for("() => document.querySelector('#travel-seq')")
    for seq in sorted({2, ended.version // 2, ended.version - 1}):
        cli = subprocess.run(
            [sys.executable, "-m", "cistate", "runs", "show", str(run_id), "--at", str(seq),
             "--json"], env=settings_env(settings), capture_output=True, text=True, timeout=60)
        assert cli.returncode == 0, cli.stderr
        expected = json.loads(cli.stdout)
        # move the slider as a keyboard user would: focus it, Home, then Right seq-1 times
        await browser.call("press", selector="#travel-seq", key="Home")
        for _ in range(seq - 1):
            await browser.call("press", selector="#travel-seq", key="ArrowRight")
        await browser.wait_for("n => document.querySelector('.travel')?.dataset.at === String(n)"
                               " && document.querySelector('#run-state')", seq)
        await browser.wait_for("""want => Array.from(document.querySelectorAll('#steps tbody tr'))
          .map(tr => tr.dataset.step + ':' + tr.dataset.state).join() === want""",
                               ",".join(f"{s['name']}:{s['state']}" for s in expected["steps"]))
        shown = await browser.eval("""() => ({
          state: document.querySelector('#run-state').dataset.state,
          steps: Array.from(document.querySelectorAll('#steps tbody tr')).map(tr => ({
            name: tr.dataset.step, state: tr.dataset.state,
            attempts: Number(tr.querySelector('[data-field=attempts]').textContent)})),
          events: document.querySelectorAll('#events tbody tr').length})""")
        await browser.screenshot(f"slider-at-{seq}")
        assert shown["state"] == expected["state"]
        assert shown["steps"] == [{"name": s["name"], "state": s["state"],
                                   "attempts": s["attempts"]} for s in expected["steps"]]
        assert shown["events"] == seq


async def test_retry_from_a_step_with_an_operate_token_records_run_retried_by_it(
        serve: Any, producer: Producer, browser: Browser, store: Store) -> None:  # noqa: F811
    base, _ = await serve(FAILING_PIPELINE)
    run_id = await producer.push()
    assert (await wait_for_run(store, run_id, timeout=90)).status == "failed"
    await browser.login(base, OPERATE, f"/runs/{run_id}")
    await browser.wait_for("() => document.querySelector('#act-retry') && "
                           "!document.querySelector('#act-retry').disabled")
    # the failing step's log: jump to its failing line, which gets a deep link
    await browser.call("click", selector="#tab-check")
    await browser.wait_for(
        "() => !document.querySelector('.logpane[data-step=check] .jump-failure').disabled")
    await browser.call("click", selector=".logpane[data-step=check] .jump-failure")
    target = await browser.wait_for("() => document.querySelector('.line.target')?.textContent")
    assert "error: the check failed" in target
    assert (await browser.eval("() => location.hash")).startswith("#log-check-L")
    await browser.call("select", selector="#retry-from", value="check")
    await browser.call("click", selector="#act-retry")
    await browser.call("fill", selector="#reason-text", value="flaky network, from the UI")
    await browser.screenshot("retry-dialog")
    await browser.call("click", selector="#reason-ok")

    async def retried() -> list[Any]:
        return [e for e in await store.events(run_id) if e.type == "run.retried"]
    [event] = await wait_until(retried, 30, what="run.retried")
    assert event.meta["actor"] == "api:alice"
    assert event.data["from_step"] == "check"
    assert event.data["reason"] == "flaky network, from the UI"
    await browser.wait_for("() => Array.from(document.querySelectorAll('#events tbody tr'))"
                           ".some(tr => tr.dataset.type === 'run.retried')")
    await browser.screenshot("retried")


async def test_an_approver_approves_a_waiting_step_from_its_page(
        serve: Any, producer: Producer, browser: Browser, store: Store) -> None:  # noqa: F811
    base, _ = await serve(GATED_PIPELINE)
    run_id = await producer.push()
    await wait_for_run(store, run_id, states=("waiting",), timeout=90)
    await browser.login(base, OPERATE, f"/runs/{run_id}")
    await browser.wait_for("() => document.querySelector('#act-approve-release-gate')"
                           " && !document.querySelector('#act-approve-release-gate').disabled")
    assert await browser.eval("() => document.querySelector('#act-reject-release-gate')"
                              ".disabled") is False
    await browser.call("click", selector="#act-approve-release-gate")
    await browser.call("fill", selector="#reason-text", value="QA signed off")
    await browser.call("click", selector="#reason-ok")
    ended = await wait_for_run(store, run_id, timeout=60)
    assert ended.status == "succeeded"
    [approved] = [e for e in await store.events(run_id) if e.type == "step.approved"]
    assert approved.data["actor"] == "api:alice" and approved.data["reason"] == "QA signed off"
    # the gate's bar shows the wait for a person, then the buttons are gone
    await browser.wait_for("() => document.querySelector('#run-state')?.dataset.state"
                           " === 'succeeded'")
    phases = await browser.eval("() => Array.from(document.querySelectorAll("
                                "'.attempt-row[data-step=release-gate] rect'))"
                                ".map(r => r.dataset.phase)")
    await browser.screenshot("approved")
    assert phases[0] == "waiting", phases
    assert await browser.eval("() => document.querySelector('#act-approve-release-gate')") is None


async def test_with_a_read_token_the_buttons_are_disabled(
        serve: Any, producer: Producer, browser: Browser, store: Store,  # noqa: F811
        tmp_path: Path) -> None:
    base, _ = await serve(FAILING_PIPELINE)
    run_id = await producer.push()
    assert (await wait_for_run(store, run_id, timeout=90)).status == "failed"
    await browser.login(base, READ, f"/runs/{run_id}")
    await browser.wait_for("() => document.querySelector('#act-retry')")
    shown = await browser.eval("""() => ({
      who: document.querySelector('#who').textContent,
      disabled: ['#act-retry', '#act-rerun', '#act-cancel', '#retry-from']
        .map(s => document.querySelector(s).disabled),
      hint: document.querySelector('#actions-hint')?.textContent})""")
    await browser.screenshot("read-token")
    # dark follows the system's setting
    await browser.call("media", colorScheme="dark")
    background = await browser.eval("() => getComputedStyle(document.documentElement)"
                                    ".backgroundColor")
    await browser.screenshot("read-token-dark")
    await browser.call("media", colorScheme="light")
    assert background == "rgb(13, 17, 23)"
    assert shown["who"] == "Logged in as auditor (read)"
    assert shown["disabled"] == [True, True, True, True]
    assert "needs an operate token" in shown["hint"]
    # a deep link to a log line opens that step's log at that line
    await browser.goto(f"{base}/runs/{run_id}#log-check-L6")
    line = await browser.wait_for("() => document.querySelector('.line.target')?.textContent")
    assert line == "6checking"  # the line's number, then its text
    assert await browser.eval("() => document.querySelector('#tab-check')"
                              ".getAttribute('aria-selected')") == "true"
    await browser.screenshot("deep-link")
    # the runs page and the audit page read with it
    await browser.goto(f"{base}/?state=failed")
    await browser.wait_for("id => document.querySelector(`#runs tr[data-run='${id}']`)",
                           str(run_id))
    await browser.screenshot("runs-page")
    await browser.goto(f"{base}/audit?type=step.failed")
    await browser.wait_for("() => document.querySelectorAll('#audit tbody tr').length === 1")
    await browser.screenshot("audit-page")
    exported = tmp_path / "audit.jsonl"
    name = await browser.call("download", selector="#export", path=str(exported))
    [line] = exported.read_text().splitlines()
    assert name == "cistate-audit.jsonl"
    assert json.loads(line)["type"] == "step.failed" and json.loads(line)["run_id"] == str(run_id)


async def test_a_wrong_token_is_refused(serve: Any, browser: Browser) -> None:
    base, _ = await serve(FAILING_PIPELINE)
    await browser.login(base, "not-a-token")
    message = await browser.wait_for("() => document.querySelector('#login-error')?.textContent")
    await browser.screenshot("wrong-token")
    assert "refused" in message
    assert await browser.eval("() => sessionStorage.length") == 0
    assert await browser.eval("() => !!document.querySelector('#token')")
    # the right one logs in, and stays for the tab's session
    await browser.call("fill", selector="#token", value=OPERATE)
    await browser.call("click", selector="#login")
    await browser.wait_for("() => document.querySelector('#who-name')?.textContent === 'alice'")
    await browser.goto(f"{base}/audit")
    await browser.wait_for("() => document.querySelector('#who-name')?.textContent === 'alice'")


async def test_where_reads_are_open_the_page_reads_without_a_token_and_acts_with_one(
        serve: Any, producer: Producer, browser: Browser, store: Store) -> None:  # noqa: F811
    base, _ = await serve(FAILING_PIPELINE, reads_open=True)
    run_id = await producer.push()
    assert (await wait_for_run(store, run_id, timeout=90)).status == "failed"
    await browser.goto(f"{base}/runs/{run_id}")
    await browser.wait_for("() => document.querySelector('#act-retry')")
    assert await browser.eval("() => [document.querySelector('#who').textContent,"
                              " document.querySelector('#act-retry').disabled]") == [
        "Reading without a token · Log in", True]
    await browser.screenshot("reads-open")
    await browser.call("click", selector="#login-link")
    await browser.call("fill", selector="#token", value=OPERATE)
    await browser.call("click", selector="#login")
    await browser.wait_for("() => document.querySelector('#act-retry')"
                           " && !document.querySelector('#act-retry').disabled")


async def test_the_pages_are_public_with_a_strict_policy_and_the_api_is_not(
        serve: Any) -> None:
    base, _ = await serve(FAILING_PIPELINE)
    async with aiohttp.ClientSession() as http:
        for path in ("/", f"/runs/{uuid.uuid4()}", "/audit", "/ui/app.js", "/ui/app.css"):
            async with http.get(base + path) as response:
                assert response.status == 200, path
                policy = response.headers["Content-Security-Policy"]
                assert "default-src 'self'" in policy and "script-src 'self'" in policy
        for path in ("/ui/BUILD", "/ui/main.ts", "/runs/not-a-run"):
            async with http.get(base + path) as response:
                assert response.status == 404, path
        async with http.get(base + "/api/v1/runs") as response:
            assert response.status == 401
        async with http.get(base + "/api/v1/whoami",
                            headers={"Authorization": f"Bearer {READ}"}) as response:
            assert await response.json() == {"name": "auditor", "scope": "read",
                                              "reads_open": False}


def test_the_committed_build_is_what_the_sources_build_to() -> None:
    done = subprocess.run(["bash", str(ROOT / "scripts" / "ui.sh"), "check"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (pages.DIST / "app.js").exists()
