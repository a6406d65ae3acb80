"""calls: the PBX recording of a call and how its attachment went (issue 22, point 3)

Index: (record_state, record_next_at) finds the queued recordings that are due (the
sweep that re-queues lost jobs).

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07 05:00:00.000000

"""
import sqlalchemy as sa
from alembic import op

revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None

BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade():
    with op.batch_alter_table('calls') as batch:
        batch.add_column(sa.Column('record_url', sa.Text(), nullable=True))
        batch.add_column(sa.Column('record_voicemail', sa.Boolean(), nullable=False,
                                   server_default=sa.false()))
        batch.add_column(sa.Column('record_state', sa.String(length=8), nullable=True))
        batch.add_column(sa.Column('record_attempts', sa.Integer(), nullable=False,
                                   server_default='0'))
        batch.add_column(sa.Column('record_next_at', sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column('record_file_id', BIG_ID, nullable=True))
        batch.add_column(sa.Column('record_error', sa.Text(), nullable=True))
        batch.create_index('ix_calls_record_due', ['record_state', 'record_next_at'],
                           unique=False)


def downgrade():
    with op.batch_alter_table('calls') as batch:
        batch.drop_index('ix_calls_record_due')
        for name in ('record_error', 'record_file_id', 'record_next_at', 'record_attempts',
                     'record_state', 'record_voicemail', 'record_url'):
            batch.drop_column(name)
