-- Audit queries: events by step and by run, runs by ref and by (state, step).
CREATE INDEX events_step_idx     ON events ((data->>'step'), position DESC);
CREATE INDEX events_run_pos_idx  ON events (run_id, position DESC);
CREATE INDEX runs_ref_idx        ON runs (ref, created_at DESC, id DESC);
CREATE INDEX runs_state_step_idx ON runs (state, step, created_at DESC, id DESC);
