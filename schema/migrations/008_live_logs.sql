-- Live step logs (issue 15): the pieces of a running step's output as the worker sends them
-- (masked), so that `runs logs --follow` and the API can show them before the step ends. The
-- whole log is still stored with the step's result (step_logs), as before; these rows are for
-- watching, and are pruned after a day. id: the order they arrived in (what a follower reads
-- on from); a redelivered piece (same execution and seq) is stored once.
CREATE TABLE step_log_chunks (
    id          bigserial   PRIMARY KEY,
    run_id      uuid        NOT NULL,
    step        text        NOT NULL,
    attempt     integer     NOT NULL,
    execution   uuid        NOT NULL,
    seq         integer     NOT NULL,
    text        text        NOT NULL,
    final       boolean     NOT NULL DEFAULT false,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (run_id, step, attempt, execution, seq)
);
CREATE INDEX step_log_chunks_step_idx ON step_log_chunks (run_id, step, id);
CREATE INDEX step_log_chunks_recorded_idx ON step_log_chunks (recorded_at);
