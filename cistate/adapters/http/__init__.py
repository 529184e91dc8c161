"""The HTTP API (aiohttp) and the git hosts' webhooks."""
