"""Database tables: studies, series, instances, analysis results and the outbox.

SQLAlchemy 2 declarative models. Every stage of the pipeline takes its work
from these tables and records its outcome here, so a restart resumes where it
stopped. Keys are DICOM UIDs (PS3.5 §9), validated before they reach a path.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime

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
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

__all__ = [
    "Base",
    "Delivery",
    "DeliveryState",
    "Instance",
    "InstanceResult",
    "InstanceState",
    "OutputObject",
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
    """Where one output object stands with one destination."""

    PENDING = "pending"
    SENT = "sent"
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
    # Analysis bookkeeping (the job queue lives in these columns).
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column()
    claimed_by: Mapped[str | None] = mapped_column(String(64))
    claimed_at: Mapped[datetime | None] = mapped_column()
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
    peak: Mapped[list[int] | None] = mapped_column(JSON)
    heatmap_path: Mapped[str | None] = mapped_column(Text)
    provider: Mapped[str | None] = mapped_column(String(64))
    timings: Mapped[dict[str, float] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    instance: Mapped[Instance] = relationship(back_populates="results")

    __table_args__ = (UniqueConstraint("instance_id", "model_name", "model_version", name="uq_result_model"),)


class OutputObject(Base):
    """A DICOM object produced for a study (SR or annotated image), kept until delivered."""

    __tablename__ = "output_objects"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(16))
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64))
    file_path: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    deliveries: Mapped[list[Delivery]] = relationship(back_populates="output", cascade="all, delete-orphan")


class Delivery(Base):
    """One output object to one destination: the outbox, with retries and dead letters."""

    __tablename__ = "deliveries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    output_id: Mapped[int] = mapped_column(ForeignKey("output_objects.id", ondelete="CASCADE"))
    destination: Mapped[str] = mapped_column(String(64))
    state: Mapped[DeliveryState] = mapped_column(
        Enum(DeliveryState, native_enum=False, length=16, values_callable=lambda e: [m.value for m in e]),
        default=DeliveryState.PENDING,
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    first_attempt_at: Mapped[datetime | None] = mapped_column()
    last_error: Mapped[str | None] = mapped_column(Text)
    sent_at: Mapped[datetime | None] = mapped_column()

    output: Mapped[OutputObject] = relationship(back_populates="deliveries")

    def reset(self, now: datetime) -> None:
        """Queue this delivery again from scratch (new object, resend, dead letter revived)."""
        self.state = DeliveryState.PENDING
        self.attempts = 0
        self.next_attempt_at = now
        self.first_attempt_at = None
        self.last_error = None
        self.sent_at = None

    __table_args__ = (
        UniqueConstraint("output_id", "destination", name="uq_delivery"),
        Index("ix_deliveries_due", "state", "next_attempt_at"),
    )
