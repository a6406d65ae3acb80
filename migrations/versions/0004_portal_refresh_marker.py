"""portals: refresh-in-flight marker, the chain's user, when the status changed

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22 16:43:44.209167

"""
import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('portals', schema=None) as batch_op:
        batch_op.add_column(sa.Column('refresh_started_at', sa.DateTime(timezone=True),
                                      nullable=True))
        batch_op.add_column(sa.Column('auth_user_id', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('status_changed_at', sa.DateTime(timezone=True),
                                      nullable=True))


def downgrade():
    with op.batch_alter_table('portals', schema=None) as batch_op:
        batch_op.drop_column('status_changed_at')
        batch_op.drop_column('auth_user_id')
        batch_op.drop_column('refresh_started_at')
