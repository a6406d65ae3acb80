"""portals and portal settings

Revision ID: 0001
Revises: 
Create Date: 2026-11-22 16:35:48.566411

"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade():
    op.create_table('portals',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('member_id', sa.String(length=64), nullable=False),
    sa.Column('domain', sa.String(length=255), nullable=False),
    sa.Column('client_endpoint', sa.String(length=512), nullable=False),
    sa.Column('server_endpoint', sa.String(length=512), nullable=True),
    sa.Column('access_token', sa.String(length=1024), nullable=True),
    sa.Column('refresh_token', sa.String(length=1024), nullable=True),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('token_version', sa.Integer(), nullable=False),
    sa.Column('application_token', sa.String(length=1024), nullable=True),
    sa.Column('scope', sa.String(length=512), nullable=True),
    sa.Column('app_status', sa.String(length=4), nullable=True),
    sa.Column('plan', sa.String(length=16), nullable=False),
    sa.Column('rate_per_second', sa.Double(), nullable=False),
    sa.Column('rate_burst', sa.Integer(), nullable=False),
    sa.Column('status', sa.String(length=32), nullable=False),
    sa.Column('status_reason', sa.Text(), nullable=True),
    sa.Column('language', sa.String(length=8), nullable=True),
    sa.Column('installed_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_refresh_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_activity_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('portals', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_portals_member_id'), ['member_id'], unique=True)
        batch_op.create_index(batch_op.f('ix_portals_status'), ['status'], unique=False)

    op.create_table('portal_settings',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('portal_id', sa.Integer(), nullable=False),
    sa.Column('event_mode', sa.String(length=16), nullable=False),
    sa.Column('lines', sa.JSON(), nullable=False),
    sa.Column('default_user_id', sa.Integer(), nullable=True),
    sa.Column('crm_create', sa.Boolean(), nullable=False),
    sa.Column('max_batches_in_flight', sa.Integer(), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['portal_id'], ['portals.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('portal_settings', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_portal_settings_portal_id'), ['portal_id'], unique=True)



def downgrade():
    with op.batch_alter_table('portal_settings', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_portal_settings_portal_id'))

    op.drop_table('portal_settings')
    with op.batch_alter_table('portals', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_portals_status'))
        batch_op.drop_index(batch_op.f('ix_portals_member_id'))

    op.drop_table('portals')
