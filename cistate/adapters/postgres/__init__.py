"""The event store on PostgreSQL (asyncpg): append, queries, projections, migrations."""
