-- A run pins its pipeline: run.requested (or run.pipeline_pinned, for a repository's own
-- pipeline) records the parsed spec and its sha256, and every later decision of the run uses
-- that spec. The runs row keeps the hash, so the orchestrator finds the spec it needs (in
-- the pinning event) without reading the events of every run it decides. Runs recorded
-- before this have none (NULL) and are decided with the deployment's pipeline, as before.
ALTER TABLE runs ADD COLUMN pipeline_sha256 text;
