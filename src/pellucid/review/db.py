"""The study database: SQLAlchemy 2 models, engines with safe defaults, Alembic migrations.

SQLite (the embedded default) runs in WAL mode with a busy timeout and takes the write lock at the
start of each transaction (``BEGIN IMMEDIATE``), so concurrent submissions wait instead of failing;
PostgreSQL needs nothing special. ``migrate(url)`` brings any database to the current schema.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, sessionmaker

from pellucid.errors import ConfigError


def now() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class Study(Base):
    __tablename__ = "study"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)
    finding: Mapped[str] = mapped_column(String(200))  # the question: "is there a <finding>?"
    methods: Mapped[list] = mapped_column(JSON)
    control_fraction: Mapped[float] = mapped_column(Float, default=0.0)
    source: Mapped[dict] = mapped_column(JSON, default=dict)  # run folder, config hash, seed
    admin_token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    secret: Mapped[str] = mapped_column(String(64))  # HMAC key of the forms' CSRF tokens
    cases: Mapped[list[Case]] = relationship(back_populates="study", order_by="Case.id")


class Case(Base):
    """A de-identified case: a neutral code, the rendered image, the truth and the AI's output;
    ``source_key`` is a salted hash of the benchmark's case id and target (to join its metrics)."""

    __tablename__ = "case"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("study.id"), index=True)
    code: Mapped[str] = mapped_column(String(16))
    source_key: Mapped[str] = mapped_column(String(64))
    truth: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    ai_score: Mapped[float] = mapped_column(Float)
    ai_positive: Mapped[bool] = mapped_column(Boolean)
    image_png: Mapped[bytes] = mapped_column(LargeBinary)
    study: Mapped[Study] = relationship(back_populates="cases")
    explanations: Mapped[list[Explanation]] = relationship(order_by="Explanation.id")
    __table_args__ = (UniqueConstraint("study_id", "code"),)


class Explanation(Base):
    __tablename__ = "explanation"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    case_id: Mapped[int] = mapped_column(ForeignKey("case.id"), index=True)
    method: Mapped[str] = mapped_column(String(100))
    overlay_png: Mapped[bytes] = mapped_column(LargeBinary)  # RGBA heatmap, alpha from the map
    __table_args__ = (UniqueConstraint("case_id", "method"),)


class Rater(Base):
    __tablename__ = "rater"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("study.id"), index=True)
    label: Mapped[str] = mapped_column(String(100))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str | None] = mapped_column(String(100), nullable=True)
    years_experience: Mapped[int | None] = mapped_column(Integer, nullable=True)
    ai_familiarity: Mapped[int | None] = mapped_column(Integer, nullable=True)  # 1-5
    trust_start: Mapped[int | None] = mapped_column(Integer, nullable=True)  # 0-10
    willingness_start: Mapped[int | None] = mapped_column(Integer, nullable=True)
    trust_end: Mapped[int | None] = mapped_column(Integer, nullable=True)
    willingness_end: Mapped[int | None] = mapped_column(Integer, nullable=True)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    __table_args__ = (UniqueConstraint("study_id", "label"),)


class Assignment(Base):
    """One rater's case: its position in the rater's sequence, the random order of the
    explanations (shown as A, B, C, ...) and whether it is a no-explanation control."""

    __tablename__ = "assignment"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    rater_id: Mapped[int] = mapped_column(ForeignKey("rater.id"), index=True)
    case_id: Mapped[int] = mapped_column(ForeignKey("case.id"))
    position: Mapped[int] = mapped_column(Integer)
    control: Mapped[bool] = mapped_column(Boolean, default=False)
    order: Mapped[list] = mapped_column(JSON)  # explanation ids in display order
    case: Mapped[Case] = relationship()
    __table_args__ = (UniqueConstraint("rater_id", "case_id"), UniqueConstraint("rater_id", "position"))


class Read(Base):
    """The rater's decisions on one assignment: own read (stage 1), after the AI's prediction
    (stage 2), after the explanations (stage 3); confidence 1-5."""

    __tablename__ = "read"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    assignment_id: Mapped[int] = mapped_column(ForeignKey("assignment.id"), unique=True)
    stage: Mapped[int] = mapped_column(Integer, default=1)  # the next stage to answer (4 = done)
    finding1: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    confidence1: Mapped[int | None] = mapped_column(Integer, nullable=True)
    finding2: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    confidence2: Mapped[int | None] = mapped_column(Integer, nullable=True)
    finding3: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    confidence3: Mapped[int | None] = mapped_column(Integer, nullable=True)
    would_check: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    comment: Mapped[str | None] = mapped_column(Text, nullable=True)
    opened_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)
    seconds: Mapped[float | None] = mapped_column(Float, nullable=True)  # time on task
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)


class Rating(Base):
    """One explanation rated in one assignment: agreement of the highlighted area with clinical
    judgement (0-10), spatial correctness, usefulness and trust (Likert 1-5)."""

    __tablename__ = "rating"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    assignment_id: Mapped[int] = mapped_column(ForeignKey("assignment.id"), index=True)
    explanation_id: Mapped[int] = mapped_column(ForeignKey("explanation.id"))
    letter: Mapped[str] = mapped_column(String(2))
    agreement: Mapped[int] = mapped_column(Integer)
    spatial: Mapped[int] = mapped_column(Integer)
    usefulness: Mapped[int] = mapped_column(Integer)
    trust: Mapped[int] = mapped_column(Integer)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)
    __table_args__ = (UniqueConstraint("assignment_id", "explanation_id"),)


def database_url(db: str) -> str:
    """A SQLAlchemy URL from a URL or a plain SQLite file path."""
    if "://" in db:
        if db.startswith("postgresql://"):
            return "postgresql+psycopg://" + db[len("postgresql://"):]
        return db
    path = Path(db).expanduser().resolve()
    if path.is_dir():
        raise ConfigError(f"--db {db}: is a folder; give a SQLite file path")
    if not path.parent.is_dir():
        raise ConfigError(f"--db {db}: the folder {path.parent} does not exist")
    return f"sqlite:///{path}"


def make_engine(db: str) -> Engine:
    url = database_url(db)
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 60, "check_same_thread": False},
                               pool_size=32, max_overflow=32)

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record) -> None:
            dbapi_conn.isolation_level = None  # SQLAlchemy's begin below takes over
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=60000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _begin(conn) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    if url.startswith("postgresql"):
        return create_engine(url, pool_size=32, max_overflow=32, pool_pre_ping=True)
    raise ConfigError(f"--db: unsupported database {url.split(':')[0]!r}; use a SQLite file or "
                      f"postgresql://user@host:port/name")


def sessions(engine: Engine) -> sessionmaker:
    return sessionmaker(engine, expire_on_commit=False)


def migrate(engine: Engine) -> None:
    """Upgrade the database to the latest schema with Alembic (idempotent)."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    from sqlalchemy.exc import SQLAlchemyError

    try:
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
    except SQLAlchemyError as exc:
        first = str(exc.orig if getattr(exc, "orig", None) else exc).strip().splitlines()
        raise ConfigError(f"--db {engine.url.render_as_string(hide_password=True)}: cannot open the "
                          f"database ({first[0] if first else type(exc).__name__})") from None
