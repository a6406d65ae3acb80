"""outbox commands (the dispatcher's durable per-portal queue of REST commands)

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23 10:00:00.000000

"""
import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None

BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade():
    op.create_table('outbox_commands',
    sa.Column('id', BIG_ID, autoincrement=True, nullable=False),
    sa.Column('portal_id', sa.Integer(), nullable=False),
    sa.Column('method', sa.String(length=128), nullable=False),
    sa.Column('params', sa.JSON(), nullable=False),
    sa.Column('key', sa.String(length=128), nullable=True),
    sa.Column('after_id', BIG_ID, nullable=True),
    sa.Column('priority', sa.SmallInteger(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('not_before', sa.DateTime(timezone=True), nullable=True),
    sa.Column('lease_until', sa.DateTime(timezone=True), nullable=True),
    sa.Column('lease_owner', sa.String(length=96), nullable=True),
    sa.Column('batch_id', sa.String(length=32), nullable=True),
    sa.Column('result', sa.JSON(), nullable=True),
    sa.Column('error', sa.JSON(), nullable=True),
    sa.Column('dead_reason', sa.Text(), nullable=True),
    sa.Column('on_done', sa.String(length=128), nullable=True),
    sa.Column('on_done_sent', sa.Boolean(), nullable=False),
    sa.Column('submitted_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('first_sent_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('completed_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('inbox_event_id', BIG_ID, nullable=True),
    sa.ForeignKeyConstraint(['portal_id'], ['portals.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('outbox_commands', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_outbox_commands_portal_id'), ['portal_id'],
                              unique=False)
        batch_op.create_index('ix_outbox_commands_ready',
                              ['portal_id', 'status', 'priority', 'id'], unique=False)
        batch_op.create_index('ix_outbox_commands_status_not_before', ['status', 'not_before'],
                              unique=False)
        batch_op.create_index('ix_outbox_commands_status_lease_until', ['status', 'lease_until'],
                              unique=False)
        batch_op.create_index('ix_outbox_commands_portal_key', ['portal_id', 'key', 'id'],
                              unique=False)
        batch_op.create_index('ix_outbox_commands_on_done_sent_status',
                              ['on_done_sent', 'status'], unique=False)


def downgrade():
    with op.batch_alter_table('outbox_commands', schema=None) as batch_op:
        batch_op.drop_index('ix_outbox_commands_on_done_sent_status')
        batch_op.drop_index('ix_outbox_commands_portal_key')
        batch_op.drop_index('ix_outbox_commands_status_lease_until')
        batch_op.drop_index('ix_outbox_commands_status_not_before')
        batch_op.drop_index('ix_outbox_commands_ready')
        batch_op.drop_index(batch_op.f('ix_outbox_commands_portal_id'))

    op.drop_table('outbox_commands')
