"""What each role does with a message: the orchestrator (decide, store, outbox), the worker
(run a handler for a command), the relay (publish the outbox), and their metrics."""
