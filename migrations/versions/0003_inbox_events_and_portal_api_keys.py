"""inbox events (the incoming event queue) and per-portal PBX API keys

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22 16:41:41.671900

"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade():
    op.create_table('inbox_events',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('portal_id', sa.Integer(), nullable=True),
    sa.Column('member_id', sa.String(length=64), nullable=False),
    sa.Column('source', sa.String(length=8), nullable=False),
    sa.Column('event_type', sa.String(length=64), nullable=False),
    sa.Column('dedupe_key', sa.String(length=64), nullable=False),
    sa.Column('payload', sa.JSON(), nullable=False),
    sa.Column('unverified', sa.Boolean(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.Column('received_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('claimed_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('processed_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['portal_id'], ['portals.id'], ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('member_id', 'source', 'dedupe_key', name='uq_inbox_events_dedupe')
    )
    with op.batch_alter_table('inbox_events', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_inbox_events_portal_id'), ['portal_id'], unique=False)
        batch_op.create_index('ix_inbox_events_status_received_at', ['status', 'received_at'], unique=False)

    op.create_table('portal_api_keys',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('portal_id', sa.Integer(), nullable=False),
    sa.Column('key_hash', sa.String(length=64), nullable=False),
    sa.Column('prefix', sa.String(length=12), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['portal_id'], ['portals.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('portal_api_keys', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_portal_api_keys_key_hash'), ['key_hash'], unique=True)
        batch_op.create_index(batch_op.f('ix_portal_api_keys_portal_id'), ['portal_id'], unique=True)



def downgrade():
    with op.batch_alter_table('portal_api_keys', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_portal_api_keys_portal_id'))
        batch_op.drop_index(batch_op.f('ix_portal_api_keys_key_hash'))

    op.drop_table('portal_api_keys')
    with op.batch_alter_table('inbox_events', schema=None) as batch_op:
        batch_op.drop_index('ix_inbox_events_status_received_at')
        batch_op.drop_index(batch_op.f('ix_inbox_events_portal_id'))

    op.drop_table('inbox_events')
