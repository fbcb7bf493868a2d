"""one job queue for every stage; node heartbeats; result boxes

Moves the outbox's deliveries and the analysis queue kept in ``studies`` into
the ``jobs`` table, so every stage is claimed, leased, retried and dead-lettered
the same way.

Revision ID: 3c5a9e1f7d20
Revises: eb292205a526
Create Date: 2026-11-22 08:40:00
"""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision = "3c5a9e1f7d20"
down_revision = "eb292205a526"
branch_labels = None
depends_on = None

_PENDING = sa.text("state = 'pending'")


def upgrade() -> None:
    jobs = op.create_table(
        "jobs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column(
            "kind",
            sa.Enum("settle", "analyse", "publish", "deliver", name="jobkind", native_enum=False, length=16),
            nullable=False,
        ),
        sa.Column(
            "state",
            sa.Enum("pending", "running", "done", "dead", name="jobstate", native_enum=False, length=16),
            nullable=False,
        ),
        sa.Column("dedup_key", sa.String(length=200), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=True),
        sa.Column("output_id", sa.Integer(), nullable=True),
        sa.Column("destination", sa.String(length=64), nullable=True),
        sa.Column("not_before", sa.DateTime(timezone=True), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("lease_owner", sa.String(length=128), nullable=True),
        sa.Column("lease_expires", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("first_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["study_id"], ["studies.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["output_id"], ["output_objects.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_jobs_due", "jobs", ["state", "kind", "not_before"])
    op.create_index("ix_jobs_study", "jobs", ["study_id"])
    op.create_index("ix_jobs_output", "jobs", ["output_id"])
    op.create_index(
        "uq_jobs_pending", "jobs", ["dedup_key"], unique=True, sqlite_where=_PENDING, postgresql_where=_PENDING
    )
    op.create_table(
        "node_roles",
        sa.Column("node", sa.String(length=128), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("node", "role"),
    )
    with op.batch_alter_table("instance_results") as batch:
        batch.add_column(sa.Column("boxes", sa.JSON(), nullable=True))
    with op.batch_alter_table("output_objects") as batch:
        batch.add_column(sa.Column("superseded", sa.Boolean(), nullable=False, server_default=sa.false()))

    # Carry the work in hand over to the new queue.
    conn = op.get_bind()
    now = datetime.now(UTC)
    rows = []
    for output_id, destination, state, attempts, next_at, first_at, error in conn.execute(
        sa.text(
            "SELECT output_id, destination, state, attempts, next_attempt_at, first_attempt_at, last_error "
            "FROM deliveries"
        )
    ):
        rows.append(
            {
                "kind": "deliver",
                "state": {"pending": "pending", "sent": "done", "dead": "dead"}.get(state, "pending"),
                "dedup_key": f"deliver:{output_id}:{destination}",
                "output_id": output_id,
                "destination": destination,
                "not_before": next_at or now,
                "attempts": attempts or 0,
                "last_error": error,
                "created_at": now,
                "updated_at": now,
                "first_attempt_at": first_at,
            }
        )
    for study_id, state in conn.execute(
        sa.text("SELECT id, state FROM studies WHERE state IN ('receiving', 'settled', 'queued', 'analysing')")
    ):
        kind = "settle" if state == "receiving" else "analyse"
        rows.append(
            {
                "kind": kind,
                "state": "pending",
                "dedup_key": f"{kind}:{study_id}",
                "study_id": study_id,
                "not_before": now,
                "attempts": 0,
                "created_at": now,
                "updated_at": now,
            }
        )
    if rows:
        columns = [c.name for c in jobs.columns if c.name != "id"]
        op.bulk_insert(jobs, [{c: row.get(c) for c in columns} for row in rows])
    conn.execute(sa.text("UPDATE studies SET state = 'queued' WHERE state IN ('settled', 'analysing')"))

    op.drop_table("deliveries")
    with op.batch_alter_table("studies") as batch:
        batch.drop_column("next_attempt_at")
        batch.drop_column("claimed_by")
        batch.drop_column("claimed_at")


def downgrade() -> None:
    with op.batch_alter_table("studies") as batch:
        batch.add_column(sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("claimed_by", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=True))
    op.create_table(
        "deliveries",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("output_id", sa.Integer(), nullable=False),
        sa.Column("destination", sa.String(length=64), nullable=False),
        sa.Column(
            "state",
            sa.Enum("pending", "sent", "dead", name="deliverystate", native_enum=False, length=16),
            nullable=False,
        ),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("first_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["output_id"], ["output_objects.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("output_id", "destination", name="uq_delivery"),
    )
    op.execute(
        "INSERT INTO deliveries (output_id, destination, state, attempts, next_attempt_at, first_attempt_at, "
        "last_error, sent_at) SELECT output_id, destination, CASE state WHEN 'done' THEN 'sent' WHEN 'dead' "
        "THEN 'dead' ELSE 'pending' END, attempts, not_before, first_attempt_at, last_error, finished_at "
        "FROM jobs WHERE kind = 'deliver' AND id IN (SELECT MAX(id) FROM jobs WHERE kind = 'deliver' "
        "GROUP BY output_id, destination)"
    )
    with op.batch_alter_table("output_objects") as batch:
        batch.drop_column("superseded")
    with op.batch_alter_table("instance_results") as batch:
        batch.drop_column("boxes")
    op.drop_table("node_roles")
    op.drop_table("jobs")
