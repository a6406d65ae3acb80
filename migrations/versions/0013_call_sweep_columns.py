"""calls: the sweeper's and the duplicate rule's columns (issue 22 points 1, 3)

``seen`` (the applied events' identities: a duplicate changes nothing), ``parked_at`` (the
events before a start that did not come within TELEPHONY_START_WAIT were set aside),
``caller_name`` and ``origin_id`` from the start. Index (state, created_at) serves the
sweeper's two queries: live calls first heard of before a bound, and incomplete ones to park.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-07 05:10:00.000000

"""
import sqlalchemy as sa
from alembic import op

revision = '0013'
down_revision = '0012'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('calls') as batch:
        batch.add_column(sa.Column('seen', sa.JSON(), nullable=True))
        batch.add_column(sa.Column('parked_at', sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column('caller_name', sa.String(length=256), nullable=True))
        batch.add_column(sa.Column('origin_id', sa.String(length=256), nullable=True))
    op.create_index('ix_calls_state_created_at', 'calls', ['state', 'created_at'],
                    unique=False)


def downgrade():
    op.drop_index('ix_calls_state_created_at', table_name='calls')
    with op.batch_alter_table('calls') as batch:
        batch.drop_column('origin_id')
        batch.drop_column('caller_name')
        batch.drop_column('parked_at')
        batch.drop_column('seen')
