"""The bus on RabbitMQ (aio-pika): topology, publishing, consuming, acks, and signing."""
