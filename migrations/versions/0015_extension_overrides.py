"""extension overrides: extensions UF_PHONE_INNER cannot hold, each answered by one user

A portal's 5+-digit and alphanumeric extensions and shared phones (Bitrix24 keeps 1-4
digits, protocol §8.10), set by an operator (issue 22 point 5).

The unique (portal_id, extension) is the one index: the map reads a portal's overrides, and
``flask calls extensions set`` finds the one it replaces.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-07 05:00:00.000000

"""
import sqlalchemy as sa
from alembic import op

revision = '0015'
down_revision = '0014'
branch_labels = None
depends_on = None


def upgrade():
    op.create_table('extension_overrides',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('portal_id', sa.Integer(), nullable=False),
    sa.Column('extension', sa.String(length=64), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=False),
    sa.Column('note', sa.String(length=255), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['portal_id'], ['portals.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('portal_id', 'extension', name='uq_extension_overrides_portal_extension')
    )


def downgrade():
    op.drop_table('extension_overrides')
