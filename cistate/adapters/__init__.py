"""The outside world: PostgreSQL (the event store), RabbitMQ (topology, signing, acks), HTTP
(the API and webhooks) and the command line."""
