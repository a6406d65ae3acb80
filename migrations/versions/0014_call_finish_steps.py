"""calls: a finish's steps (resends after unknown outcomes, the statistics check) and the
owner Bitrix24 refused on register (the call then goes to the portal's fallback user)

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-07 05:00:00.000000

"""
import sqlalchemy as sa
from alembic import op

revision = '0014'
down_revision = '0013'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('calls') as batch:
        batch.add_column(sa.Column('refused_user_id', sa.Integer(), nullable=True))
        batch.add_column(sa.Column('finish_steps', sa.JSON(), nullable=True))


def downgrade():
    with op.batch_alter_table('calls') as batch:
        batch.drop_column('finish_steps')
        batch.drop_column('refused_user_id')
