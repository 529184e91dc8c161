-- The event store: one append-only table; everything else is a projection of it.
CREATE TABLE events (
    position    bigserial PRIMARY KEY,
    run_id      uuid        NOT NULL,
    seq         integer     NOT NULL,
    type        text        NOT NULL,
    data        jsonb       NOT NULL,
    meta        jsonb       NOT NULL DEFAULT '{}',
    message_id  uuid        UNIQUE,           -- a redelivered message inserts nothing
    recorded_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (run_id, seq)                      -- optimistic concurrency: one writer per version
);
CREATE INDEX events_type_idx     ON events (type, position DESC);
CREATE INDEX events_recorded_idx ON events (recorded_at DESC, position DESC);
CREATE INDEX events_actor_idx    ON events ((meta->>'actor'), position DESC);

-- One row per run, updated in the same transaction as its events; rebuildable from them.
CREATE TABLE runs (
    id            uuid PRIMARY KEY,
    repo          text        NOT NULL,
    ref           text        NOT NULL,
    commit        text        NOT NULL,
    pipeline      text        NOT NULL,
    state         text        NOT NULL,   -- queued | running | succeeded | failed | cancelled
    step          text,                   -- running step, or the step the run ended in
    machine_state text        NOT NULL,
    steps         jsonb       NOT NULL,
    active        jsonb       NOT NULL,
    push          jsonb       NOT NULL,
    version       integer     NOT NULL,
    created_at    timestamptz NOT NULL,
    updated_at    timestamptz NOT NULL
);
CREATE INDEX runs_created_idx ON runs (created_at DESC, id DESC);
CREATE INDEX runs_repo_idx    ON runs (repo, created_at DESC, id DESC);
CREATE INDEX runs_state_idx   ON runs (state, created_at DESC, id DESC);
CREATE INDEX runs_commit_idx  ON runs (commit);

-- Messages to publish, written in the same transaction as the events that decided them.
-- not_before: a delayed message (retry backoff, timeout), or the grace an orchestrator takes
-- to publish its own rows before the relay does.
CREATE TABLE outbox (
    id          bigserial PRIMARY KEY,
    message_id  uuid        NOT NULL UNIQUE,
    routing_key text        NOT NULL,
    body        jsonb       NOT NULL,
    not_before  timestamptz,
    created_at  timestamptz NOT NULL DEFAULT now(),
    sent_at     timestamptz
);
CREATE INDEX outbox_due_idx ON outbox (not_before) WHERE sent_at IS NULL;

-- Each step attempt's full output (bounded), sent by the worker with its result.
CREATE TABLE step_logs (
    run_id      uuid        NOT NULL,
    step        text        NOT NULL,
    attempt     integer     NOT NULL,
    log         text        NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, step, attempt)
);
