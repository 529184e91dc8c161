"""`schema/openapi.yaml` against the live service: schemathesis generates requests for every
operation and checks that none gets a 5xx and every answer matches the schema; and every
route of the API (`make_app`) is in the spec and the other way round, so it cannot drift.

The service runs in this process on the test's event loop, and schemathesis calls it with
blocking `requests`, so every schemathesis call runs in a worker thread (`asyncio.to_thread`)
while the loop serves it.

Each operation gets MAX_EXAMPLES valid (positive) and MAX_EXAMPLES invalid (negative) cases,
derandomized so every run sends the same requests; half the positive cases of `/runs/{id}...`
use the id of a run that exists. Every request carries the API token, except the negative
cases in which schemathesis drops `Authorization` on purpose to see the 401. Then explicit
requests get the answers generation rarely reaches (2xx of every operation, 409s, a signed
webhook) and the requests that used to get a 500, all checked with the same checks.

`GET /api/v1/runs/{id}/stream` streams until the run ends. Generated ids are random UUIDs or
malformed ones, which get 404 or 400 at once; the only real id the generator gets for the
stream is a run that has succeeded, whose stream is sent whole and ends. Every request also
has a 20 s timeout, so nothing can hang the test.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hypothesis
import pytest
import requests
import schemathesis
import yaml
from aiohttp import web
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import CheckFunction
from schemathesis.core import NOT_SET
from schemathesis.core.result import Ok

from cistate.adapters.http import pages
from cistate.adapters.http.api import make_app
from cistate.adapters.postgres.store import Store
from cistate.bootstrap import App
from tests.integration.conftest import Producer, Serve, wait_for_run

pytestmark = pytest.mark.integration

SPEC = Path(__file__).resolve().parents[2] / "schema" / "openapi.yaml"
TOKEN = "openapi-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SECRET = "openapi webhook secret"
MAX_EXAMPLES = 25  # per operation and generation mode
NOTHING_TO_NEGATE = ("/health", "/metrics", "/api/v1/whoami")  # GETs without parameters or body
TIMEOUT = 20.0  # seconds, per request

# `check` succeeds on main, takes its time on `slow` and fails on any other branch.
PIPELINE = """
name: openapi
steps:
  - name: build
    uses: script
    run: echo "building $CISTATE_COMMIT"
  - name: check
    uses: script
    run: |
      case "$CISTATE_REF" in
        refs/heads/main) echo checked ;;
        refs/heads/slow) sleep 60 ;;
        *) echo "not main" >&2; exit 3 ;;
      esac
"""

CHECKS: list[CheckFunction] = [
    schemathesis.checks.not_a_server_error,
    schemathesis.checks.status_code_conformance,
    schemathesis.checks.content_type_conformance,
    schemathesis.checks.response_headers_conformance,
    schemathesis.checks.response_schema_conformance,
    schemathesis.checks.negative_data_rejection,
    # Not positive_data_acceptance: the `cursor` of GET /api/v1/runs is an opaque token, so
    # any string is schema-valid, and the server rightly answers 400 to one it did not make.
]


def app_routes() -> set[tuple[str, str]]:
    """(METHOD, path) of every route make_app registers (HEAD comes with each GET), but the
    web UI's pages and assets: HTML for people, not the API (tests/e2e/test_ui.py has them)."""
    web_app = make_app(App.__new__(App))  # the routes do not need a working App
    ui = {route.path for route in pages.routes() if isinstance(route, web.RouteDef)}
    return {(route.method, route.resource.canonical)
            for route in web_app.router.routes()
            if route.resource is not None and route.method != "HEAD"
            and route.resource.canonical not in ui}


def spec_routes() -> set[tuple[str, str]]:
    spec = yaml.safe_load(SPEC.read_text(encoding="utf-8"))
    methods = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}
    return {(method.upper(), path)
            for path, item in spec["paths"].items() for method in item if method in methods}


def test_every_route_of_the_api_is_in_the_spec_and_nothing_else() -> None:
    app, spec = app_routes(), spec_routes()
    assert app - spec == set(), f"routes missing from {SPEC.name}: {sorted(app - spec)}"
    assert spec - app == set(), f"{SPEC.name} describes routes the API lacks: {sorted(spec - app)}"


def describe(case: schemathesis.Case[Any], response: Any | None, error: BaseException) -> str:
    where = f"{case.method} {case.formatted_path}"
    parts = [where]
    if case.query:
        parts.append(f"query={case.query!r}")
    if case.headers:
        parts.append(f"headers={dict(case.headers)!r}")
    if case.body is not NOT_SET:
        parts.append(f"body={case.body!r}")
    if response is not None:
        parts.append(f"-> {response.status_code} {response.content[:500]!r}")
    return " ".join(parts) + f"\n{type(error).__name__}: {error}"


class Recorder:
    """Checks every response; keeps the first failure of each kind instead of stopping."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.session = requests.Session()
        self.failures: dict[tuple[object, ...], str] = {}
        self.calls = 0
        self.statuses: dict[str, dict[int, int]] = {}
        self.seconds: dict[str, float] = {}

    def run(self, case: schemathesis.Case[Any], expect: int | None = None) -> Any:
        response = None
        label = f"{case.method} {case.path}"
        try:
            response = case.call(base_url=self.base_url, session=self.session, headers=AUTH,
                                 timeout=TIMEOUT)
            self.calls += 1
            counts = self.statuses.setdefault(label, {})
            counts[response.status_code] = counts.get(response.status_code, 0) + 1
            case.validate_response(response, checks=CHECKS, headers=AUTH)
            if expect is not None and response.status_code != expect:
                raise AssertionError(f"expected {expect}")
        except (Exception, BaseExceptionGroup) as exc:  # schemathesis' FailureGroup is a base one
            kind = (label, type(exc).__name__ + str(exc).split("\n", 1)[0][:120])
            self.failures.setdefault(kind, describe(case, response, exc))
        return response

    def fuzz(self, operation: Any, mode: GenerationMode, real_ids: list[str]) -> None:
        strategy = operation.as_strategy(generation_mode=mode)
        if real_ids and mode == GenerationMode.POSITIVE:
            # Half of the positive cases use the id of a run that exists.
            strategy = st.one_of(strategy, *(
                operation.as_strategy(generation_mode=mode, path_parameters={"id": run_id})
                for run_id in real_ids))

        @hypothesis.settings(max_examples=MAX_EXAMPLES, derandomize=True, database=None,
                             deadline=None, suppress_health_check=list(hypothesis.HealthCheck),
                             phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate])
        @hypothesis.given(case=strategy)
        def test(case: schemathesis.Case[Any]) -> None:
            self.run(case)

        try:
            test()
        except hypothesis.errors.Unsatisfiable:
            # An operation without parameters or body has nothing to negate.
            if mode != GenerationMode.NEGATIVE or operation.path not in NOTHING_TO_NEGATE:
                raise


async def in_thread(func: Callable[..., Any], *args: Any) -> Any:
    return await asyncio.to_thread(func, *args)


async def test_schemathesis_finds_no_server_error_and_no_schema_mismatch(
        serve: Serve, producer: Producer, store: Store) -> None:
    started = time.monotonic()
    settings = await serve(PIPELINE, api_token=f"openapi:{TOKEN}", webhook_secret=SECRET)
    base_url = f"http://{settings.listen}"
    succeeded_id = await producer.push(ref="refs/heads/main")
    failed_id = await producer.push(ref="refs/heads/topic")
    assert (await wait_for_run(store, succeeded_id)).status == "succeeded"
    assert (await wait_for_run(store, failed_id)).status == "failed"
    succeeded, failed = str(succeeded_id), str(failed_id)

    schema = schemathesis.openapi.from_path(SPEC)
    schema.validate()
    recorder = Recorder(base_url)
    operations = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result  # an operation the spec describes badly
        operations.append(result.ok())
    assert {(op.method.upper(), op.path) for op in operations} == spec_routes()

    # 1. Generated requests for every operation, valid ones and invalid ones.
    for operation in operations:
        has_id = "{id}" in operation.path
        # A stream only ends once its run has ended: give it the run that already has.
        real_ids = ([succeeded] if operation.path.endswith("/stream") else
                    [succeeded, failed]) if has_id else []
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            begun = time.monotonic()
            await in_thread(recorder.fuzz, operation, mode, real_ids)
            recorder.seconds[f"{operation.method.upper()} {operation.path} {mode.value}"] = (
                time.monotonic() - begun)
    fuzz_calls, fuzz_seconds = recorder.calls, time.monotonic() - started
    await wait_for_run(store, failed_id)  # generated retries may have restarted it
    slow_id = await producer.push(ref="refs/heads/slow")
    await wait_for_run(store, slow_id, states=("running",))
    slow = str(slow_id)

    # 2. The answers generated requests rarely get, with real runs: successes and conflicts.
    def op(method: str, path: str) -> Any:
        return schema[path][method]

    def call(method: str, path: str, expect: int, **case: Any) -> Any:
        return recorder.run(op(method, path).Case(**case), expect=expect)

    run_path = "/api/v1/runs/{id}"

    def explicit() -> None:
        call("GET", "/health", 200)
        call("GET", "/api/v1/whoami", 200)
        page = call("GET", "/api/v1/runs", 200, query={"limit": 1})
        cursor = page.json()["next_cursor"]
        assert cursor, "a full page has a next cursor"
        call("GET", "/api/v1/runs", 200, query={"limit": 1, "cursor": cursor, "repo":
                                                  "https://git.example.com/team/app.git"})
        call("GET", "/api/v1/runs", 200, query={"state": "failed", "since":
                                                  "2000-01-01T00:00:00Z"})
        by_pipeline = call("GET", "/api/v1/runs", 200, query={"pipeline": "openapi"}).json()
        assert {succeeded, failed} <= {run["id"] for run in by_pipeline["runs"]}
        assert call("GET", "/api/v1/runs", 200, query={"pipeline": "other"}).json()["runs"] == []
        for run_id in (succeeded, failed):
            call("GET", run_path, 200, path_parameters={"id": run_id})
            call("GET", run_path, 200, path_parameters={"id": run_id}, query={"at": 2})
            call("GET", run_path + "/events", 200, path_parameters={"id": run_id})
            call("GET", run_path + "/steps/{step}/log", 200,
                 path_parameters={"id": run_id, "step": "build"})
        call("GET", run_path + "/stream", 200, path_parameters={"id": succeeded})
        events = call("GET", "/api/v1/events", 200, query={"limit": 2, "run_id": failed})
        call("GET", "/api/v1/events", 200,
             query={"limit": 2, "cursor": events.json()["next_cursor"], "type": "step.failed"})
        # operators: a failed run can be retried, a finished one not cancelled, any rerun
        call("POST", run_path + "/retry", 409, path_parameters={"id": succeeded},
             body={"reason": "nothing to retry"})
        call("POST", run_path + "/cancel", 409, path_parameters={"id": succeeded}, body={})
        call("POST", run_path + "/rerun", 201, path_parameters={"id": succeeded})
        call("POST", run_path + "/retry", 202, path_parameters={"id": failed},
             body={"from_step": "check", "reason": "schemathesis"})
        call("POST", run_path + "/cancel", 202, path_parameters={"id": slow},
             body={"reason": "enough"})

    await in_thread(explicit)

    # 3. Requests that once got a 500 (found by schemathesis or by reading api.py): now 400.
    def edge_cases() -> None:
        nobody = str(uuid.uuid4())
        for path, query in (
            (run_path, {"at": "103856938508"}),  # over events.seq's int32 (schemathesis)
            (run_path, {"at": "²"}),  # str.isdigit() says yes, int() says no
            ("/api/v1/runs", {"limit": "²"}),
            ("/api/v1/events", {"cursor": "²"}),
            ("/api/v1/events", {"cursor": "9" * 20}),  # over events.position's bigint
            ("/api/v1/runs", {"repo": "a\x00b"}),  # PostgreSQL text has no NUL
            ("/api/v1/events", {"actor": "a\x00b"}),
            ("/api/v1/runs", {"since": "0001-01-01T00:00:00+01:00"}),  # year 0 in UTC
            ("/api/v1/events", {"until": "9999-12-31T23:59:59-01:00"}),  # year 10000
        ):
            call("GET", path, 400, path_parameters={"id": nobody}, query=query)
        call("GET", run_path + "/steps/{step}/log", 400,
             path_parameters={"id": nobody, "step": "a\x00b"})
        call("GET", "/api/v1/runs", 400,
             query={"cursor": "MDAwMS0wMS0wMVQwMDowMDowMCswMTowMHx4"})  # "0001-...+01:00|x"
        for action, body in (("retry", {"from_step": "Not A Step"}),  # Control.step pattern
                             ("retry", {"reason": "x" * 2049}),  # Control.reason max_length
                             ("cancel", {"reason": "x" * 2049})):
            call("POST", run_path + "/" + action, 400, path_parameters={"id": nobody},
                 body=body)
        # JSON's NUL and lone surrogates: jsonb refuses them when the event is stored
        for reason in ("a\x00b", "\ud800"):
            raw("POST", run_path + "/cancel", 400, {"id": slow},
                json.dumps({"reason": reason}).encode(), {"Content-Type": "application/json"})
        raw("POST", run_path + "/cancel", 400, {"id": nobody}, b"[" * 100_000,  # RecursionError
            {"Content-Type": "application/json"})
        # JSON is UTF-8 whatever the charset says (an unknown one raised LookupError)
        raw("POST", run_path + "/cancel", 404, {"id": nobody}, b"{}",
            {"Content-Type": "application/json; charset=no-such-charset"})

    def raw(method: str, path: str, expect: int, path_parameters: dict[str, str],
            data: bytes, headers: dict[str, str]) -> None:
        """Bytes schemathesis would not send as they are; the answer checked all the same."""
        case = op(method, path).Case(path_parameters=path_parameters, headers=headers)
        url = base_url + path.format(**path_parameters)
        response = None
        try:
            response = recorder.session.request(method, url, data=data,
                                                headers={**AUTH, **headers}, timeout=TIMEOUT)
            recorder.calls += 1
            assert response.status_code == expect, f"expected {expect}"
            case.validate_response(response, checks=CHECKS)
        except (Exception, BaseExceptionGroup) as exc:
            recorder.failures.setdefault((path, repr(data[:40])), describe(case, response, exc))

    await in_thread(edge_cases)

    # 4. Webhooks, signed as GitHub signs them; one body longer than a read chunk.
    def webhooks() -> None:
        operation = op("POST", "/api/v1/webhooks/{provider}")
        push = {"ref": "refs/heads/main", "after": "ab" * 20, "before": "0" * 40,
                "pusher": {"name": "octocat"}, "repository": {"clone_url": "https://x/y.git"}}
        for event, payload in (("ping", {"zen": "Keep it logically awesome.", "hook_id": 1}),
                               ("push", push),
                               ("push", {**push, "commits": [{"message": "x" * 300_000}]})):
            body = json.dumps(payload).encode()
            digest = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
            headers = {"X-GitHub-Event": event, "X-GitHub-Delivery": str(uuid.uuid4()),
                       "X-Hub-Signature-256": f"sha256={digest}",
                       "Content-Type": "application/json"}
            case = operation.Case(path_parameters={"provider": "github"}, headers=headers,
                                  body=payload, media_type="application/json")
            response = recorder.session.post(f"{base_url}/api/v1/webhooks/github", data=body,
                                             headers=headers, timeout=TIMEOUT)
            try:
                assert response.status_code == 202, response.text
                case.validate_response(response, checks=CHECKS)
                answer = response.json()
                assert answer["status"] == ("ignored" if event == "ping" else "accepted")
            except (Exception, BaseExceptionGroup) as exc:
                recorder.failures.setdefault(("webhook", event, len(body)),
                                             describe(case, response, exc))

    await in_thread(webhooks)

    elapsed = time.monotonic() - started
    summary = "\n".join(f"  {label}: {dict(sorted(counts.items()))}"
                        for label, counts in sorted(recorder.statuses.items()))
    slowest = ", ".join(f"{label} {seconds:.1f} s" for label, seconds in
                        sorted(recorder.seconds.items(), key=lambda item: -item[1])[:3])
    print(f"\nschemathesis: {recorder.calls} calls ({fuzz_calls} generated in "
          f"{fuzz_seconds:.1f} s; slowest: {slowest}), {elapsed:.1f} s in all; "
          f"statuses:\n{summary}")
    assert not recorder.failures, (
        f"{len(recorder.failures)} problem(s):\n\n" + "\n\n".join(recorder.failures.values()))
    for label, counts in recorder.statuses.items():
        assert not any(status >= 500 for status in counts), (label, counts)
