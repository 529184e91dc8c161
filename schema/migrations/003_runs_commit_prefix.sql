-- Commit prefix search (`runs list --commit 3f0c2a1`, `audit --commit`, `?commit=`) is
-- `commit LIKE $1 || '%'`. A plain btree serves LIKE only under the "C" collation, and
-- databases are created with a libc locale (PostgreSQL 15 does not treat even C.UTF-8 as
-- "C"): runs_commit_idx is never used for it and the query scans every run
-- (bench/audit.py: p99 38 ms at 55k runs). text_pattern_ops makes the prefix a range scan.
CREATE INDEX runs_commit_prefix_idx ON runs (commit text_pattern_ops);
-- It serves equality on commit too, which was all runs_commit_idx could do.
DROP INDEX runs_commit_idx;
