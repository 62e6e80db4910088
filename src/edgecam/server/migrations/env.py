"""Alembic environment: the connection comes from :func:`edgecam.server.db.migrate`."""

from __future__ import annotations

from alembic import context

from edgecam.server.db import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through edgecam.server.db.migrate")
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
