"""outbox retention index: finished commands by status and completion time

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30 10:00:00.000000

The retention pass (app/dispatcher/retention.py) walks done and dead commands oldest
first; without this index PostgreSQL reads the whole outbox for every batch. The outbox
is the busiest table, so on PostgreSQL the index is built CONCURRENTLY (outside the
migration's transaction): sending goes on while it builds.
"""
from alembic import op

# revision identifiers, used by Alembic.
revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None

NAME = 'ix_outbox_commands_status_completed_at'


def upgrade():
    with op.get_context().autocommit_block():
        op.create_index(NAME, 'outbox_commands', ['status', 'completed_at', 'id'],
                        unique=False, postgresql_concurrently=True, if_not_exists=True)


def downgrade():
    with op.get_context().autocommit_block():
        op.drop_index(NAME, table_name='outbox_commands', postgresql_concurrently=True,
                      if_exists=True)
