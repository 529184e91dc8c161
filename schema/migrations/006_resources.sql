-- Concurrency groups and locks (issue 13). A resource (`group:<name>`, `lock:<name>`) is an
-- aggregate of its own: its events are a stream beside the runs' (resource, seq unique, so
-- two orchestrators appending to one resource agree on one order: arrival order), and its
-- row is the projection of them (who holds it, who waits, in order). A run's side of each
-- claim (waiting, held, released) is in its own events and in runs.holds.
CREATE TABLE resource_events (
    position    bigserial PRIMARY KEY,
    resource    text        NOT NULL,
    seq         integer     NOT NULL,
    type        text        NOT NULL,
    data        jsonb       NOT NULL,
    meta        jsonb       NOT NULL DEFAULT '{}',
    message_id  uuid        UNIQUE,           -- a redelivered request inserts nothing
    recorded_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (resource, seq)                    -- one writer per version
);
CREATE INDEX resource_events_type_idx ON resource_events (type, position DESC);

CREATE TABLE resources (
    name       text        PRIMARY KEY,
    version    integer     NOT NULL,
    holder     jsonb,                         -- {claim, run_id, step} or null
    waiting    jsonb       NOT NULL,          -- [{claim, run_id, step}, ...] in arrival order
    holder_superseded boolean NOT NULL DEFAULT false,
    updated_at timestamptz NOT NULL
);

ALTER TABLE runs ADD COLUMN holds jsonb NOT NULL DEFAULT '{}';
