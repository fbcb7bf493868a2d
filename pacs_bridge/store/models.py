"""Database tables: studies, series, instances, analysis results, output objects and jobs.

SQLAlchemy 2 declarative models. Every stage of the pipeline is a ``Job``
(settle, analyse, publish, deliver) taken from the ``jobs`` table under a
lease and completed in the same transaction that records its outcome and
creates the next stage's job, so a crash at any point loses nothing and a
restart (or another node) resumes where it stopped. Keys are DICOM UIDs
(PS3.5 §9), validated before they reach a path.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

__all__ = [
    "Base",
    "DeliveryState",
    "Instance",
    "InstanceResult",
    "InstanceState",
    "Job",
    "JobKind",
    "JobState",
    "NodeRole",
    "OutputObject",
    "ResultRevision",
    "Series",
    "Study",
    "StudyState",
    "utcnow",
]


def utcnow() -> datetime:
    """Timezone-aware now; stored as UTC."""
    return datetime.now(UTC)


class StudyState(enum.StrEnum):
    """Where a study is in the pipeline."""

    RECEIVING = "receiving"
    SETTLED = "settled"
    QUEUED = "queued"
    ANALYSING = "analysing"
    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"


class InstanceState(enum.StrEnum):
    """Outcome of the analysis of one instance."""

    PENDING = "pending"
    ANALYSED = "analysed"
    FAILED = "failed"
    SKIPPED = "skipped"


class DeliveryState(enum.StrEnum):
    """Where one output object stands with one destination, as users see it (from its deliver job)."""

    PENDING = "pending"
    SENT = "sent"
    DEAD = "dead"


class JobKind(enum.StrEnum):
    """The stages of the pipeline; each piece of work is one job of one kind."""

    SETTLE = "settle"
    ANALYSE = "analyse"
    PUBLISH = "publish"
    DELIVER = "deliver"


class JobState(enum.StrEnum):
    """Where a job is: waiting (``pending``), leased by a worker (``running``), or ended."""

    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    DEAD = "dead"


class Base(DeclarativeBase):
    """Declarative base of all tables."""

    type_annotation_map = {datetime: DateTime(timezone=True)}


class Study(Base):
    """One study (Study Instance UID, PS3.3 C.7.2.1) and its pipeline state."""

    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    patient_id: Mapped[str | None] = mapped_column(String(64))
    patient_name: Mapped[str | None] = mapped_column(String(324))
    accession_number: Mapped[str | None] = mapped_column(String(16))
    study_date: Mapped[str | None] = mapped_column(String(8))
    study_description: Mapped[str | None] = mapped_column(String(64))
    modalities: Mapped[str | None] = mapped_column(String(64))
    calling_aet: Mapped[str | None] = mapped_column(String(16))
    source: Mapped[str] = mapped_column(String(16), default="dicom")
    state: Mapped[StudyState] = mapped_column(
        Enum(StudyState, native_enum=False, length=16, values_callable=lambda e: [m.value for m in e]),
        default=StudyState.RECEIVING,
    )
    state_reason: Mapped[str | None] = mapped_column(Text)
    first_received_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_received_at: Mapped[datetime] = mapped_column(default=utcnow)
    settled_at: Mapped[datetime | None] = mapped_column()
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    total_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    # How many times the study was analysed (a re-analysis or a late instance adds one).
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    analysed_at: Mapped[datetime | None] = mapped_column()
    model_name: Mapped[str | None] = mapped_column(String(64))
    model_version: Mapped[str | None] = mapped_column(String(64))
    max_probability: Mapped[float | None] = mapped_column(Float)
    positive_instances: Mapped[int | None] = mapped_column(Integer)
    fracture: Mapped[bool | None] = mapped_column(Boolean)

    series: Mapped[list[Series]] = relationship(back_populates="study", cascade="all, delete-orphan")
    instances: Mapped[list[Instance]] = relationship(back_populates="study", cascade="all, delete-orphan")

    __table_args__ = (Index("ix_studies_state", "state"),)


class Series(Base):
    """One series (PS3.3 C.7.3.1)."""

    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"))
    modality: Mapped[str | None] = mapped_column(String(16))
    body_part_examined: Mapped[str | None] = mapped_column(String(64))
    series_number: Mapped[int | None] = mapped_column(Integer)
    series_description: Mapped[str | None] = mapped_column(String(64))

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")


class Instance(Base):
    """One stored SOP instance (PS3.3 C.12.1) and the file that holds its bytes as received."""

    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"))
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"))
    instance_number: Mapped[int | None] = mapped_column(Integer)
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    file_path: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    calling_aet: Mapped[str | None] = mapped_column(String(16))
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    state: Mapped[InstanceState] = mapped_column(
        Enum(InstanceState, native_enum=False, length=16, values_callable=lambda e: [m.value for m in e]),
        default=InstanceState.PENDING,
    )

    study: Mapped[Study] = relationship(back_populates="instances")
    series: Mapped[Series] = relationship(back_populates="instances")
    results: Mapped[list[InstanceResult]] = relationship(back_populates="instance", cascade="all, delete-orphan")

    __table_args__ = (Index("ix_instances_study", "study_id"),)


class InstanceResult(Base):
    """The analysis of one instance by one model version."""

    __tablename__ = "instance_results"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id", ondelete="CASCADE"))
    model_name: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str] = mapped_column(String(64))
    ok: Mapped[bool] = mapped_column(Boolean)
    error: Mapped[str | None] = mapped_column(Text)
    probability: Mapped[float | None] = mapped_column(Float)
    fracture: Mapped[bool | None] = mapped_column(Boolean)
    threshold: Mapped[float | None] = mapped_column(Float)
    body_part: Mapped[str | None] = mapped_column(String(32))
    box: Mapped[list[int] | None] = mapped_column(JSON)
    boxes: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON)
    peak: Mapped[list[int] | None] = mapped_column(JSON)
    heatmap_path: Mapped[str | None] = mapped_column(Text)
    provider: Mapped[str | None] = mapped_column(String(64))
    timings: Mapped[dict[str, float] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    instance: Mapped[Instance] = relationship(back_populates="results")

    __table_args__ = (UniqueConstraint("instance_id", "model_name", "model_version", name="uq_result_model"),)


class OutputObject(Base):
    """A result object produced for a study (SR, capture, GSPS, summary, RIS result), kept until delivered."""

    __tablename__ = "output_objects"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(16))
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64))
    file_path: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # True once a newer revision of the same kind replaced it for this study.
    superseded: Mapped[bool] = mapped_column(Boolean, default=False)

    jobs: Mapped[list[Job]] = relationship(back_populates="output", cascade="all, delete-orphan")


class ResultRevision(Base):
    """One revision of a study's result objects: its number, content digest and content time.

    The UIDs of a revision's objects are derived from ``digest``
    (:mod:`pacs_bridge.report.revision`); a rebuild of unchanged content reuses
    the newest row, changed content adds the next one.
    """

    __tablename__ = "result_revisions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"))
    number: Mapped[int] = mapped_column(Integer)
    content_digest: Mapped[str] = mapped_column(String(64))
    digest: Mapped[str] = mapped_column(String(64))
    replaces: Mapped[str | None] = mapped_column(String(64))
    content_at: Mapped[datetime] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (UniqueConstraint("study_id", "number", name="uq_revision_number"),)


class Job(Base):
    """One piece of work of one stage, for one subject: the one queue of every stage.

    Subjects: a study (settle, analyse, publish) or an output object and a
    destination (deliver). A worker claims a due job by setting a lease
    (``lease_owner``, ``lease_expires``) and renews it while it works; a job
    whose lease expired (its worker died) may be claimed again. At most one
    pending job exists per ``dedup_key`` (the subject), and a job is not
    claimed while another job of the same subject runs under a live lease.
    """

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[JobKind] = mapped_column(
        Enum(JobKind, native_enum=False, length=16, values_callable=lambda e: [m.value for m in e])
    )
    state: Mapped[JobState] = mapped_column(
        Enum(JobState, native_enum=False, length=16, values_callable=lambda e: [m.value for m in e]),
        default=JobState.PENDING,
    )
    dedup_key: Mapped[str] = mapped_column(String(200))
    study_id: Mapped[int | None] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"))
    output_id: Mapped[int | None] = mapped_column(ForeignKey("output_objects.id", ondelete="CASCADE"))
    destination: Mapped[str | None] = mapped_column(String(64))
    not_before: Mapped[datetime] = mapped_column(default=utcnow)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires: Mapped[datetime | None] = mapped_column()
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    first_attempt_at: Mapped[datetime | None] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()

    output: Mapped[OutputObject | None] = relationship(back_populates="jobs")

    __table_args__ = (
        Index("ix_jobs_due", "state", "kind", "not_before"),
        Index("ix_jobs_study", "study_id"),
        Index("ix_jobs_output", "output_id"),
        Index(
            "uq_jobs_pending",
            "dedup_key",
            unique=True,
            sqlite_where=text("state = 'pending'"),
            postgresql_where=text("state = 'pending'"),
        ),
    )


class NodeRole(Base):
    """A role (receive, settle, analyse, publish, send, web) running on a node, with its heartbeat.

    Written by the running service every few seconds, read by ``pacs-bridge
    results`` and the health check: a role whose heartbeat stopped, or that
    recorded an error, makes the service visibly unhealthy.
    """

    __tablename__ = "node_roles"

    node: Mapped[str] = mapped_column(String(128), primary_key=True)
    role: Mapped[str] = mapped_column(String(16), primary_key=True)
    pid: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16))
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(default=utcnow)
    error: Mapped[str | None] = mapped_column(Text)
