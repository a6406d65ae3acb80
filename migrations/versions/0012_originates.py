"""originates: click-to-call's originate requests; a portal's pbx_originate_url, pbx_secret

Indexes: (portal_id, b24_call_id, id) finds a click's originate in flight and a PBX start's
origin_id; (state, sent_at) serves the sweep of originates the PBX never reported.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-07 05:10:00.000000

"""
import sqlalchemy as sa
from alembic import op

revision = '0012'
down_revision = '0011'
branch_labels = None
depends_on = None

BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade():
    op.create_table('originates',
    sa.Column('id', BIG_ID, autoincrement=True, nullable=False),
    sa.Column('portal_id', sa.Integer(), nullable=False),
    sa.Column('b24_call_id', sa.String(length=128), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=False),
    sa.Column('extension', sa.String(length=32), nullable=True),
    sa.Column('phone', sa.String(length=64), nullable=False),
    sa.Column('dtmf', sa.String(length=64), nullable=True),
    sa.Column('line', sa.String(length=50), nullable=True),
    sa.Column('is_mobile', sa.Boolean(), nullable=False),
    sa.Column('state', sa.String(length=8), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('pbx_call_id', sa.String(length=256), nullable=True),
    sa.Column('inbox_event_id', BIG_ID, nullable=True),
    sa.Column('finish_command_id', BIG_ID, nullable=True),
    sa.Column('finish_outcome', sa.String(length=8), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('sent_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['portal_id'], ['portals.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index('ix_originates_portal_call', 'originates',
                    ['portal_id', 'b24_call_id', 'id'], unique=False)
    op.create_index('ix_originates_state_sent', 'originates', ['state', 'sent_at'],
                    unique=False)
    with op.batch_alter_table('portal_settings', recreate='never') as batch_op:
        batch_op.add_column(sa.Column('pbx_originate_url', sa.String(length=1024), nullable=True))
        batch_op.add_column(sa.Column('pbx_secret', sa.String(length=512),
                                      nullable=True))


def downgrade():
    with op.batch_alter_table('portal_settings', recreate='never') as batch_op:
        batch_op.drop_column('pbx_secret')
        batch_op.drop_column('pbx_originate_url')
    op.drop_index('ix_originates_state_sent', table_name='originates')
    op.drop_index('ix_originates_portal_call', table_name='originates')
    op.drop_table('originates')
