"""call replay: the start's UTC offset, and whether the call is a replay of a past call

A PBX re-sending old events and ``flask calls reprocess`` register past calls without cards
(issue 23 point 5): ``replay`` says which, ``start_offset`` keeps the offset of the start's
time so that a re-processed register sends the original CALL_START_DATE. ``flask calls
reprocess`` reads a portal's calls by their start: ix_calls_portal_started_at.

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-07 05:40:00.000000

"""
import sqlalchemy as sa
from alembic import op

revision = '0016'
down_revision = '0015'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('calls') as batch:
        batch.add_column(sa.Column('start_offset', sa.Integer(), nullable=True))
        batch.add_column(sa.Column('replay', sa.String(length=16), nullable=True))
    op.create_index('ix_calls_portal_started_at', 'calls', ['portal_id', 'started_at'])


def downgrade():
    op.drop_index('ix_calls_portal_started_at', table_name='calls')
    with op.batch_alter_table('calls') as batch:
        batch.drop_column('replay')
        batch.drop_column('start_offset')
