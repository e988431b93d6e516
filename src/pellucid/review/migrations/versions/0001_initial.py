"""The review study schema: studies, de-identified cases, explanations, raters, assignments,
reads and ratings.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None


def _ts(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "study",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        _ts("created_at"),
        sa.Column("finding", sa.String(200), nullable=False),
        sa.Column("methods", sa.JSON, nullable=False),
        sa.Column("control_fraction", sa.Float, nullable=False),
        sa.Column("source", sa.JSON, nullable=False),
        sa.Column("admin_token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("secret", sa.String(64), nullable=False),
    )
    op.create_table(
        "case",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("study_id", sa.Integer, sa.ForeignKey("study.id"), nullable=False, index=True),
        sa.Column("code", sa.String(16), nullable=False),
        sa.Column("source_key", sa.String(64), nullable=False),
        sa.Column("truth", sa.Boolean, nullable=True),
        sa.Column("ai_score", sa.Float, nullable=False),
        sa.Column("ai_positive", sa.Boolean, nullable=False),
        sa.Column("image_png", sa.LargeBinary, nullable=False),
        sa.UniqueConstraint("study_id", "code"),
    )
    op.create_table(
        "explanation",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("case_id", sa.Integer, sa.ForeignKey("case.id"), nullable=False, index=True),
        sa.Column("method", sa.String(100), nullable=False),
        sa.Column("overlay_png", sa.LargeBinary, nullable=False),
        sa.UniqueConstraint("case_id", "method"),
    )
    op.create_table(
        "rater",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("study_id", sa.Integer, sa.ForeignKey("study.id"), nullable=False, index=True),
        sa.Column("label", sa.String(100), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("role", sa.String(100)),
        sa.Column("years_experience", sa.Integer),
        sa.Column("ai_familiarity", sa.Integer),
        sa.Column("trust_start", sa.Integer),
        sa.Column("willingness_start", sa.Integer),
        sa.Column("trust_end", sa.Integer),
        sa.Column("willingness_end", sa.Integer),
        _ts("started_at", True),
        _ts("finished_at", True),
        sa.UniqueConstraint("study_id", "label"),
    )
    op.create_table(
        "assignment",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("rater_id", sa.Integer, sa.ForeignKey("rater.id"), nullable=False, index=True),
        sa.Column("case_id", sa.Integer, sa.ForeignKey("case.id"), nullable=False),
        sa.Column("position", sa.Integer, nullable=False),
        sa.Column("control", sa.Boolean, nullable=False),
        sa.Column("order", sa.JSON, nullable=False),
        sa.UniqueConstraint("rater_id", "case_id"),
        sa.UniqueConstraint("rater_id", "position"),
    )
    op.create_table(
        "read",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("assignment_id", sa.Integer, sa.ForeignKey("assignment.id"), nullable=False,
                  unique=True),
        sa.Column("stage", sa.Integer, nullable=False),
        sa.Column("finding1", sa.Boolean),
        sa.Column("confidence1", sa.Integer),
        sa.Column("finding2", sa.Boolean),
        sa.Column("confidence2", sa.Integer),
        sa.Column("finding3", sa.Boolean),
        sa.Column("confidence3", sa.Integer),
        sa.Column("would_check", sa.Boolean),
        sa.Column("comment", sa.Text),
        _ts("opened_at"),
        sa.Column("seconds", sa.Float),
        _ts("updated_at"),
    )
    op.create_table(
        "rating",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("assignment_id", sa.Integer, sa.ForeignKey("assignment.id"), nullable=False,
                  index=True),
        sa.Column("explanation_id", sa.Integer, sa.ForeignKey("explanation.id"), nullable=False),
        sa.Column("letter", sa.String(2), nullable=False),
        sa.Column("agreement", sa.Integer, nullable=False),
        sa.Column("spatial", sa.Integer, nullable=False),
        sa.Column("usefulness", sa.Integer, nullable=False),
        sa.Column("trust", sa.Integer, nullable=False),
        _ts("updated_at"),
        sa.UniqueConstraint("assignment_id", "explanation_id"),
    )


def downgrade() -> None:
    for table in ("rating", "read", "assignment", "rater", "explanation", "case", "study"):
        op.drop_table(table)
