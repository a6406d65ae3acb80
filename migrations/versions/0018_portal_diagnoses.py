"""portal diagnoses: each portal's last self-diagnosis report

The read-only round of issue 24 point 6 (app/installation/diagnosis.py): one row per portal,
replaced by each run, with when it ran, what started it, its worst level and the findings
(message keys and facts, JSON). The unique index on portal_id is the only one: the page and
the CLI read a portal's row, each run replaces it.

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-08 09:00:00.000000

"""
import sqlalchemy as sa
from alembic import op

revision = '0018'
down_revision = '0017'
branch_labels = None
depends_on = None


def upgrade():
    op.create_table('portal_diagnoses',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('portal_id', sa.Integer(), nullable=False),
    sa.Column('checked_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('level', sa.String(length=8), nullable=False),
    sa.Column('trigger', sa.String(length=16), nullable=False),
    sa.Column('report', sa.JSON(), nullable=False),
    sa.ForeignKeyConstraint(['portal_id'], ['portals.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('portal_diagnoses', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_portal_diagnoses_portal_id'), ['portal_id'],
                              unique=True)


def downgrade():
    with op.batch_alter_table('portal_diagnoses', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_portal_diagnoses_portal_id'))
    op.drop_table('portal_diagnoses')
