-- Tamper evidence (DESIGN.md "Trust model"): each event stores a hash chained to the event
-- before it in its run, so that an edited, deleted, inserted or moved event is found by
-- `cistate audit verify` and `cistate projections rebuild`.
--
-- An event's canonical form is made here, from the values as stored, not in Python from the
-- values written: jsonb normalises what it stores (object keys reordered, 1e16 read back as
-- 10000000000000000), so a form of what Python wrote would not match the same form of what
-- is read back. One line per field, type last: no other field can hold a newline (jsonb's
-- text output escapes them; uuids, numbers and the time have none), so no two events share
-- a form, and it costs a third of a JSON object's to make (every rebuild makes it for every
-- event). jsonb's text output is fixed, and recorded_at is written in UTC whatever the
-- session's TimeZone. recorded_at is in: the fold reads it (run and step times). position is
-- not: the database assigns it (bigserial) after the hash is computed, and it orders every
-- run's events for audits (with gaps, committed out of order), not a run's history; seq does,
-- and it is in.
CREATE FUNCTION cistate_event_canonical(run_id uuid, seq integer, type text, data jsonb,
                                        meta jsonb, message_id uuid, recorded_at timestamptz)
RETURNS bytea LANGUAGE sql STABLE PARALLEL SAFE
RETURN convert_to(run_id::text || E'\n' || seq::text || E'\n' || data::text || E'\n'
                  || meta::text || E'\n' || COALESCE(message_id::text, '') || E'\n'
                  || to_char(recorded_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US')
                  || E'\n' || type, 'UTF8');

-- An event's hash: SHA-256 over the hash of the run's event seq - 1 (empty for seq 1, and
-- when that event is missing) and the event's canonical form. cistate.events.link is the
-- same, for the verifier.
CREATE FUNCTION cistate_event_hash(prev bytea, canonical bytea)
RETURNS bytea LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN sha256(COALESCE(prev, '') || canonical);

-- Not NOT NULL: that stops no one who can write rows (any bytes pass it), and a missing hash
-- is reported like a wrong one.
ALTER TABLE events ADD COLUMN hash bytea;

-- Chain what is already there, run by run in seq order: from each event with no event
-- seq - 1 (a run's first), one seq at a time. An event missing before this migration shows
-- as a gap, and the event after it as a broken link, like one deleted afterwards. Each step
-- looks up the next event of each run by (run_id, seq), through the unique index: OFFSET 0
-- keeps the planner from making that a join that reads the whole table once per step (a
-- step per event of the longest run).
WITH RECURSIVE chain AS (
    SELECT e.position, e.run_id, e.seq,
           cistate_event_hash(NULL, cistate_event_canonical(
               e.run_id, e.seq, e.type, e.data, e.meta, e.message_id, e.recorded_at)) AS hash
    FROM events e
    WHERE NOT EXISTS (SELECT FROM events p WHERE p.run_id = e.run_id AND p.seq = e.seq - 1)
  UNION ALL
    SELECT e.position, e.run_id, e.seq,
           cistate_event_hash(c.hash, cistate_event_canonical(
               e.run_id, e.seq, e.type, e.data, e.meta, e.message_id, e.recorded_at))
    FROM chain c, LATERAL (SELECT * FROM events n
                           WHERE n.run_id = c.run_id AND n.seq = c.seq + 1 OFFSET 0) e
)
UPDATE events SET hash = chain.hash FROM chain WHERE events.position = chain.position;
