-- What the outside is told of a run (issue 14): commit statuses and notifications.
-- runs.notices: per status context (or notification key), the notice last sent and what
-- became of it (its events: notice.sent, notice.delivered, notice.failed,
-- notice.superseded), for runs show.
ALTER TABLE runs ADD COLUMN notices jsonb NOT NULL DEFAULT '{}';

-- The notifier's order per commit status target (host, repo, commit, context): the newest
-- notice (by when its run's push was recorded, then the run's seq) that was delivered or is
-- being delivered. A notice older than it is superseded, never sent: a newer state is never
-- overwritten by an older one, whichever notifier process holds which notice. The row is
-- locked while a notice of its target is being delivered.
CREATE TABLE notice_targets (
    target     text        PRIMARY KEY,
    order_at   timestamptz NOT NULL,
    seq        integer     NOT NULL,
    notice     uuid        NOT NULL,
    state      text,
    updated_at timestamptz NOT NULL DEFAULT now()
);
