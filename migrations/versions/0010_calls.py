"""calls: one row per PBX call of a portal, the telephony state machine's memory (issue 22)

Indexes: the unique (portal_id, pbx_call_id) finds a PBX event's call; (portal_id,
b24_call_id) finds another call bound to the CALL_ID a register returned (a collision);
(state, id) lists the newest calls in a state (``flask calls show --state``).

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07 02:40:00.000000

"""
import sqlalchemy as sa
from alembic import op

revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None

BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade():
    op.create_table('calls',
    sa.Column('id', BIG_ID, autoincrement=True, nullable=False),
    sa.Column('portal_id', sa.Integer(), nullable=False),
    sa.Column('pbx_call_id', sa.String(length=256), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('direction', sa.String(length=3), nullable=True),
    sa.Column('phone', sa.String(length=64), nullable=True),
    sa.Column('line', sa.String(length=50), nullable=True),
    sa.Column('b24_call_id', sa.String(length=128), nullable=True),
    sa.Column('owner_user_id', sa.Integer(), nullable=True),
    sa.Column('ringing', sa.JSON(), nullable=False),
    sa.Column('shown', sa.JSON(), nullable=False),
    sa.Column('hidden', sa.JSON(), nullable=False),
    sa.Column('answerer_user_id', sa.Integer(), nullable=True),
    sa.Column('handler_user_id', sa.Integer(), nullable=True),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('answered_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('ended_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('end_status', sa.String(length=16), nullable=True),
    sa.Column('duration', sa.Integer(), nullable=True),
    sa.Column('pending', sa.JSON(), nullable=False),
    sa.Column('skip_reason', sa.Text(), nullable=True),
    sa.Column('crm_entity_type', sa.String(length=16), nullable=True),
    sa.Column('crm_entity_id', sa.Integer(), nullable=True),
    sa.Column('lead_error', sa.Text(), nullable=True),
    sa.Column('collision', sa.Boolean(), nullable=False),
    sa.Column('register_command_id', BIG_ID, nullable=True),
    sa.Column('register_error', sa.Text(), nullable=True),
    sa.Column('finish_params', sa.JSON(), nullable=True),
    sa.Column('finish_command_id', BIG_ID, nullable=True),
    sa.Column('finish_outcome', sa.String(length=8), nullable=True),
    sa.Column('finish_error', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['portal_id'], ['portals.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('portal_id', 'pbx_call_id', name='uq_calls_portal_pbx_call')
    )
    with op.batch_alter_table('calls', schema=None) as batch_op:
        batch_op.create_index('ix_calls_portal_b24_call_id', ['portal_id', 'b24_call_id'],
                              unique=False)
        batch_op.create_index('ix_calls_state_id', ['state', 'id'], unique=False)


def downgrade():
    with op.batch_alter_table('calls', schema=None) as batch_op:
        batch_op.drop_index('ix_calls_state_id')
        batch_op.drop_index('ix_calls_portal_b24_call_id')
    op.drop_table('calls')
