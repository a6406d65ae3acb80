"""portals.application_token_hash: a keyed hash beside the encrypted application_token

Intake compares against it instead of decrypting the token (app/ingress/token_hash.py).
Existing rows are left NULL: the key comes from SECRET_KEY, which a migration does not
know, so intake fills each row's hash the first time it checks one of its events.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30 06:00:00.000000

"""
import sqlalchemy as sa
from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('portals') as batch_op:
        batch_op.add_column(sa.Column('application_token_hash', sa.String(length=80),
                                      nullable=True))


def downgrade():
    with op.batch_alter_table('portals') as batch_op:
        batch_op.drop_column('application_token_hash')
