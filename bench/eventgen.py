"""Event data for the replay and audit benchmarks, generated inside PostgreSQL.

Runs of the default `nodejs` pipeline, with the event bodies cistate writes (see
`cistate/domain/run.py`, `_Builder`): `run.requested` with steps/active/push, `step.skipped`,
`step.started`, `step.succeeded` with the outputs the handlers return, `step.failed` with an
error, `step.retry_scheduled`, `run.retried` by an operator, `run.cancel_requested`,
`run.cancelled`, `run.succeeded`, `run.failed`, and `message.rejected` (a late result).

Each kind of run is a template: a list of (seq, type, step, attempt, cause, decision,
offset). Python writes the templates into a table; one `INSERT ... SELECT` joins them with a
`generate_series` of runs and builds every `data` and `meta` with `jsonb_build_object`, so a
million events take seconds, not a million round trips. Positions follow `recorded_at`.

    plan = Plan.for_events(400_000)           # how many runs of which kind
    await generate(conn, plan, long_run=10_000)  # -> the id of the long run, or None
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg

PIPELINE = "nodejs"
STEPS = ["setup", "test", "build", "deploy", "health", "tag-release", "img-release",
         "helm-release", "gitops", "qa-sync"]
MAIN_ACTIVE = STEPS[:9]  # qa-sync ships disabled
BRANCH_ACTIVE = STEPS[:5]  # the release steps run on main only
DURATION = {"setup": 20, "test": 90, "build": 150, "deploy": 60, "health": 12,
            "tag-release": 4, "img-release": 25, "helm-release": 15, "gitops": 8}

# cause of a decision -> the actor of its events (meta.actor)
PUSH, RESULT, TIMER, OPERATOR = "push", "result", "timer", "operator"

Row = tuple[int, str, str | None, int, str, int, float]  # seq type step attempt cause dec offset


def backoff(attempt: int) -> float:
    """Seconds before `attempt` (>= 2) starts: 2 s doubling, at most 5 min."""
    return min(2.0 * 2.0 ** min(attempt - 2, 20), 300.0)


class _Template:
    """Builds one kind of run, event by event, the way the orchestrator decides them."""

    def __init__(self, main: bool) -> None:
        self.rows: list[Row] = []
        self.t = 0.0
        self.decision = 0
        self.main = main

    def add(self, type_: str, step: str | None = None, attempt: int = 0,
            cause: str = RESULT) -> None:
        self.rows.append((len(self.rows) + 1, type_, step, attempt, cause, self.decision,
                          self.t))

    def next(self, seconds: float) -> None:
        """The next message arrives `seconds` later: a new decision."""
        self.t += seconds
        self.decision += 1

    def requested(self) -> None:
        self.add("run.requested", cause=PUSH)
        for name in STEPS:
            if name not in (MAIN_ACTIVE if self.main else BRANCH_ACTIVE):
                self.add("step.skipped", name, 0, PUSH)
        self.add("step.started", "setup", 1, PUSH)

    def succeed(self, step: str, attempt: int = 1, then: str | None = None,
                then_attempt: int = 1) -> None:
        """A result for `step`; the same decision starts `then` or ends the run."""
        self.next(DURATION[step])
        self.add("step.succeeded", step, attempt)
        if then is None:
            self.add("run.succeeded")
        else:
            self.add("step.started", then, then_attempt)

    def chain(self, steps: list[str], last: str | None = None) -> None:
        """Steps that succeed in order; the last one's decision starts `last` (or ends)."""
        for i, step in enumerate(steps):
            self.succeed(step, then=steps[i + 1] if i + 1 < len(steps) else last)

    def fail(self, step: str, attempt: int, retry: bool) -> None:
        self.next(DURATION[step])
        self.add("step.failed", step, attempt)
        if retry:
            self.add("step.retry_scheduled", step, attempt + 1)
            self.next(backoff(attempt + 1))  # the backoff timer fires
            self.add("step.started", step, attempt + 1, TIMER)
        else:
            self.add("run.failed", step, attempt)


def _templates(long_events: int) -> dict[str, list[Row]]:
    out: dict[str, list[Row]] = {}

    t = _Template(main=True)  # the whole pipeline, first time
    t.requested()
    t.chain(MAIN_ACTIVE)
    out["main_ok"] = t.rows

    t = _Template(main=False)  # a feature branch: no release steps
    t.requested()
    t.chain(BRANCH_ACTIVE)
    out["branch_ok"] = t.rows

    t = _Template(main=True)  # health never got 200: the run failed at health
    t.requested()
    t.chain(["setup", "test", "build", "deploy"], last="health")
    t.fail("health", 1, retry=False)
    out["main_fail_health"] = t.rows

    t = _Template(main=True)  # the image push failed once; the retry succeeded
    t.requested()
    t.chain(["setup", "test"], last="build")
    t.fail("build", 1, retry=True)
    t.succeed("build", 2, then="deploy")
    t.chain(MAIN_ACTIVE[3:])
    out["main_build_retry"] = t.rows

    t = _Template(main=True)  # failed at health, an operator retried from health
    t.requested()
    t.chain(["setup", "test", "build", "deploy"], last="health")
    t.fail("health", 1, retry=False)
    t.next(3600)
    t.add("run.retried", cause=OPERATOR)
    t.add("step.started", "health", 2, OPERATOR)
    t.succeed("health", 2, then="tag-release")
    t.chain(MAIN_ACTIVE[5:])
    out["main_retried"] = t.rows

    t = _Template(main=False)  # npm test failed on a branch
    t.requested()
    t.chain(["setup"], last="test")
    t.fail("test", 1, retry=False)
    out["branch_fail_test"] = t.rows

    t = _Template(main=True)  # cancelled by an operator during test
    t.requested()
    t.chain(["setup"], last="test")
    t.next(30)
    t.add("run.cancel_requested", cause=OPERATOR)
    t.add("run.cancelled", cause=OPERATOR)
    out["main_cancelled"] = t.rows

    t = _Template(main=True)  # in flight: deploying
    t.requested()
    t.chain(["setup", "test", "build"], last="deploy")
    out["running"] = t.rows

    if long_events:
        # health retried thousands of times (failed, retry_scheduled, started), then the
        # release steps; late results (message.rejected) pad it to exactly long_events
        t = _Template(main=True)
        t.requested()
        t.chain(["setup", "test", "build", "deploy"], last="health")
        fixed = len(t.rows) + 2 + 2 * 4  # + health succeeded/started tag-release .. gitops
        loops = max(0, (long_events - fixed) // 3)
        for attempt in range(1, loops + 1):
            t.fail("health", attempt, retry=True)
        pad = long_events - fixed - 3 * loops
        for _ in range(max(0, pad)):
            t.next(0.5)
            t.add("message.rejected", "health", 1)
        t.succeed("health", loops + 1, then="tag-release")
        t.chain(MAIN_ACTIVE[5:])
        out["long"] = t.rows
    return out


# (kind, share in %); the `running` ones are the newest 1% instead of a share
MIX = [("main_ok", 38), ("branch_ok", 27), ("main_fail_health", 6), ("main_build_retry", 10),
       ("main_retried", 3), ("branch_fail_test", 12), ("main_cancelled", 4)]
RUNNING_SHARE = 0.01
assert sum(share for _, share in MIX) == 100


@dataclass(frozen=True)
class Plan:
    runs: int
    events: int  # without the long run
    start: datetime
    days: float

    @classmethod
    def for_events(cls, events: int, days: float = 30.0, now: datetime | None = None) -> Plan:
        """About `events` events (whole runs) spread over the last `days` days."""
        per_run = _mean_events_per_run()
        runs = max(1, round(events / per_run))
        now = now or datetime.now(UTC)
        start = now - timedelta(days=days)
        return cls(runs=runs, events=_expected_events(runs), start=start, days=days)


def _mean_events_per_run() -> float:
    lengths = {k: len(v) for k, v in _templates(0).items()}
    mixed = sum(lengths[k] * share for k, share in MIX) / 100
    return (1 - RUNNING_SHARE) * mixed + RUNNING_SHARE * lengths["running"]


def _expected_events(runs: int) -> int:
    lengths = {k: len(v) for k, v in _templates(0).items()}
    kinds = _kind_counts(runs)
    return sum(lengths[k] * n for k, n in kinds.items())


def _kind_counts(runs: int) -> dict[str, int]:
    running = _running_from(runs)
    counts: dict[str, int] = {}
    for i in range(1, runs + 1):
        kind = "running" if i >= running else _kind_of(i)
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def _running_from(runs: int) -> int:
    return runs - max(1, int(runs * RUNNING_SHARE)) + 1


def _kind_of(i: int) -> str:
    bucket = (i * 37) % 100
    for kind, share in MIX:
        if bucket < share:
            return kind
        bucket -= share
    raise AssertionError


def _kind_sql() -> str:
    """The same choice as _kind_of, in SQL, for run number i."""
    parts, low = [], 0
    for kind, share in MIX:
        parts.append(f"WHEN (i * 37) % 100 < {low + share} THEN '{kind}'")
        low += share
    return "CASE " + " ".join(parts) + " END"


LONG_RUN_I = 0  # plan row number of the long run
SPREAD = 20_000.0  # seconds left at the end of the window: the longest template fits

PLAN_SQL = f"""
CREATE TEMP TABLE bench_plan AS
SELECT i, md5('bench-run:' || i)::uuid AS id, kind,
       format('https://git.example.com/team-%s/svc-%s.git', app % 6, app) AS repo,
       'svc-' || app AS app,
       CASE WHEN kind LIKE 'branch%' THEN 'refs/heads/feature/PROJ-' || (i * 7919) % 600
            ELSE 'refs/heads/main' END AS ref,
       md5('commit:' || i) || left(md5('commit2:' || i), 8) AS commit,
       md5('commit:' || (i - 1)) || left(md5('commit2:' || (i - 1)), 8) AS before,
       (ARRAY['alice','bob','carol','dave','erin','frank','grace','heidi',
              'ivan','judy','mallory','oscar'])[1 + (i * 5) % 12] AS pusher,
       'handler:cistate-worker-5f7c9-' || (i % 4) AS handler,
       (ARRAY['cli:alice','api:deploy-bot','cli:bob','api:release-bot'])[1 + (i / 7) % 4]
         AS operator,
       $3::timestamptz + make_interval(secs => (i - 1) * $4::float8 + (i * 7) % 60) AS created_at
FROM (SELECT g AS i, (g * 13) % 60 AS app,
             CASE WHEN g = {LONG_RUN_I} THEN 'long' WHEN g >= $2 THEN 'running'
                  ELSE {_kind_sql().replace("(i * 37)", "(g * 37)")} END AS kind
      FROM generate_series($5::int, $1::int) g) s
"""

TEMPLATE_SQL = """
CREATE TEMP TABLE bench_tmpl (kind text, seq int, type text, step text, attempt int,
                              cause text, decision int, off float8, PRIMARY KEY (kind, seq))
"""

# every data shape as run.py's _Builder and the handlers write it
EVENTS_SQL = """
INSERT INTO events (run_id, seq, type, data, meta, message_id, recorded_at)
SELECT p.id, t.seq, t.type,
  CASE t.type
  WHEN 'run.requested' THEN jsonb_build_object(
    'repo', p.repo, 'ref', p.ref, 'commit', p.commit, 'pipeline', $1::text,
    'steps', $2::text::jsonb,
    'active', CASE WHEN p.ref = 'refs/heads/main' THEN $3::text::jsonb ELSE $4::text::jsonb END,
    'push', jsonb_build_object('repo', p.repo, 'ref', p.ref, 'commit', p.commit,
                               'before', p.before, 'pusher', p.pusher, 'provider', 'github'))
  WHEN 'step.skipped' THEN jsonb_build_object('step', t.step, 'attempt', 0, 'reason',
    CASE WHEN t.step = 'qa-sync' THEN 'disabled in the pipeline (enabled: false)'
         ELSE format('branch %L does not match when.branches', substr(p.ref, 12)) END)
  WHEN 'step.started' THEN jsonb_build_object('step', t.step, 'attempt', t.attempt)
  WHEN 'step.succeeded' THEN jsonb_build_object('step', t.step, 'attempt', t.attempt,
    'outputs', CASE t.step
      WHEN 'setup' THEN jsonb_build_object(
        'sha', p.commit, 'short_sha', left(p.commit, 7), 'app_name', p.app,
        'image_url', format('registry.example.com:5000/dev/%s:%s', p.app, left(p.commit, 7)),
        'release_image_repo', 'registry.example.com:5000/releases/' || p.app,
        'branch', substr(p.ref, 12))
      WHEN 'test' THEN jsonb_build_object('install', 'npm ci')
      WHEN 'build' THEN jsonb_build_object(
        'image_url', format('registry.example.com:5000/dev/%s:%s', p.app, left(p.commit, 7)),
        'image_digest', 'sha256:' || md5(p.commit || 'i') || md5(p.commit || 'j'))
      WHEN 'deploy' THEN jsonb_build_object(
        'namespace', 'dev', 'service_port', 3000, 'objects', jsonb_build_array(
          'apps/v1/Deployment dev/' || p.app, 'v1/Service dev/' || p.app,
          'networking.k8s.io/v1/Ingress dev/' || p.app))
      WHEN 'health' THEN jsonb_build_object(
        'url', format('http://%s.dev.apps.example.com/health', p.app), 'status', 200,
        'latency_ms', 12.5, 'attempts', 1 + p.i % 3)
      WHEN 'tag-release' THEN jsonb_build_object('tag', format('1.%s.%s', p.i % 9, p.i % 97))
      WHEN 'img-release' THEN jsonb_build_object(
        'release_image_url', format('registry.example.com:5000/releases/%s:1.%s.%s', p.app,
                                   p.i % 9, p.i % 97),
        'release_image_digest', 'sha256:' || md5(p.commit || 'i') || md5(p.commit || 'j'))
      WHEN 'helm-release' THEN jsonb_build_object(
        'chart_name', p.app, 'chart_version', format('1.%s.%s', p.i % 9, p.i % 97),
        'chart_url', format('https://charts.example.com/%s-1.%s.%s.tgz', p.app, p.i % 9,
                            p.i % 97),
        'chart_repo', 'https://charts.example.com')
      WHEN 'gitops' THEN jsonb_build_object('commit', md5(p.commit || 'g') || left(
        md5(p.commit || 'h'), 8), 'changed', true)
      ELSE '{}'::jsonb END)
  WHEN 'step.failed' THEN jsonb_build_object('step', t.step, 'attempt', t.attempt,
    'error', jsonb_build_object(
      'message', CASE t.step
        WHEN 'health' THEN format('GET http://%s.dev.apps.example.com/health: HTTP 503 after '
                                  '10 attempts', p.app)
        WHEN 'test' THEN 'npm test exited 1'
        ELSE format('push registry.example.com:5000/dev/%s: 502 Bad Gateway', p.app) END,
      'exit_code', CASE WHEN t.step = 'test' THEN 1 END,
      'output_tail', CASE WHEN t.step = 'test'
        THEN E'  1 failing\\n\\n  1) GET /health\\n     AssertionError: expected 200, got 500'
        ELSE '' END,
      'retryable', true, 'kind', 'error'))
  WHEN 'step.retry_scheduled' THEN jsonb_build_object('step', t.step, 'attempt', t.attempt,
    'delay', least(2.0 * 2 ^ least(t.attempt - 2, 20), 300),
    'due_at', to_char((p.created_at + make_interval(secs => t.off + least(
      2.0 * 2 ^ least(t.attempt - 2, 20), 300))) AT TIME ZONE 'UTC',
      'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"'))
  WHEN 'run.failed' THEN jsonb_build_object('step', t.step, 'attempt', t.attempt, 'reason',
    format('step %L error: %s (attempt %s of %s)', t.step,
           CASE WHEN t.step = 'test' THEN 'npm test exited 1'
                ELSE 'GET /health: HTTP 503 after 10 attempts' END, t.attempt, t.attempt))
  WHEN 'run.retried' THEN jsonb_build_object('from_step', 'health', 'actor', p.operator,
    'reason', 'the dev cluster was down')
  WHEN 'run.cancel_requested' THEN jsonb_build_object('reason', 'superseded by a newer push')
  WHEN 'run.cancelled' THEN jsonb_build_object('step', 'test',
    'reason', 'superseded by a newer push')
  WHEN 'message.rejected' THEN jsonb_build_object(
    'reason', 'result for step ''health'' attempt 1 does not match the run',
    'message_type', 'result', 'state', 'running',
    'message', jsonb_build_object('run_id', p.id, 'step', 'health', 'attempt', 1,
                                  'status', 'failed'))
  ELSE '{}'::jsonb END,
  jsonb_build_object(
    'causation_id', md5(p.id::text || ':d:' || t.decision)::uuid,
    'correlation_id', p.id,
    'actor', CASE t.cause WHEN 'push' THEN 'producer:' || p.pusher WHEN 'result' THEN p.handler
                          WHEN 'timer' THEN 'system' ELSE p.operator END)
    || CASE WHEN t.type LIKE 'step.%' AND t.type <> 'step.skipped'
            THEN jsonb_build_object('attempt', t.attempt) ELSE '{}'::jsonb END,
  md5(p.id::text || ':m:' || t.seq)::uuid,
  p.created_at + make_interval(secs => t.off)
FROM bench_plan p JOIN bench_tmpl t ON t.kind = p.kind
ORDER BY p.created_at + make_interval(secs => t.off), p.i, t.seq
"""


def long_run_id() -> uuid.UUID:
    import hashlib

    return uuid.UUID(hashlib.md5(f"bench-run:{LONG_RUN_I}".encode()).hexdigest())


async def generate(conn: asyncpg.Connection, plan: Plan, long_run: int = 0) -> int:
    """Insert the plan's runs (and a long run of `long_run` events, recorded in the middle
    of the window, if > 0) into `events`. Returns the number of events inserted."""
    templates = _templates(long_run)
    await conn.execute("DROP TABLE IF EXISTS bench_plan, bench_tmpl")
    await conn.execute(TEMPLATE_SQL)
    await conn.copy_records_to_table(
        "bench_tmpl", records=[(kind, *row) for kind, rows in templates.items() for row in rows])
    seconds_per_run = max(0.0, plan.days * 86400 - SPREAD) / plan.runs
    await conn.execute(PLAN_SQL, plan.runs, _running_from(plan.runs), plan.start,
                       seconds_per_run, LONG_RUN_I if long_run else 1)
    if long_run:  # the long run starts mid-window, not at its very beginning
        await conn.execute(
            "UPDATE bench_plan SET created_at = $1::timestamptz + make_interval(secs => $2)"
            " WHERE i = $3", plan.start, plan.days * 86400 / 2, LONG_RUN_I)
    status = await conn.execute(EVENTS_SQL, PIPELINE, _json(STEPS), _json(MAIN_ACTIVE),
                                _json(BRANCH_ACTIVE))
    # the events are written in bulk: chain their hashes as `cistate db upgrade` chains a
    # store made before the chain (migration 004's statement), or every run reads as edited
    await conn.execute(chain_statement())
    await conn.execute("DROP TABLE bench_plan, bench_tmpl")
    return int(status.split()[-1])


def chain_statement() -> str:
    """Migration 004's statement that chains every stored event's hash, as it stands there."""
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "schema" / "migrations"
            / "004_event_hash_chain.sql").read_text(encoding="utf-8")
    start = text.index("WITH RECURSIVE chain AS")
    end = text.index(";", text.index("UPDATE events SET hash", start)) + 1
    return text[start:end]


def _json(value: object) -> str:
    import json

    return json.dumps(value)
