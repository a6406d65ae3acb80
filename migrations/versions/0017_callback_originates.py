"""originates for web-form callbacks: the kind of originate and what a callback needs

ONEXTERNALCALLBACKSTART (issue 23 point 2, protocol §8.9) has no CALL_ID and no user: the
app chooses the employee and registers the call itself, so an originate row exists before
its CALL_ID (nullable now) and may have nobody to ring (user_id nullable). New columns: kind
(click | callback), the text and voice to play to the employee, the CRM entity of the form,
the register's EXTERNAL_CALL_ID and command id.

No new index: a callback's PBX start finds its row by (portal_id, b24_call_id) like a click's
(ix_originates_portal_call), and the register's outcome handler by the primary key.

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-07 05:40:00.000000

"""
import sqlalchemy as sa
from alembic import op

revision = '0017'
down_revision = '0016'
branch_labels = None
depends_on = None

BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade():
    with op.batch_alter_table('originates') as batch_op:
        batch_op.add_column(sa.Column('kind', sa.String(length=8), nullable=False,
                                      server_default='click'))
        batch_op.add_column(sa.Column('text', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('voice', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('crm_entity_type', sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column('crm_entity_id', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('external_call_id', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('register_command_id', BIG_ID, nullable=True))
        batch_op.alter_column('b24_call_id', existing_type=sa.String(length=128),
                              nullable=True)
        batch_op.alter_column('user_id', existing_type=sa.Integer(), nullable=True)


def downgrade():
    op.execute("DELETE FROM originates WHERE b24_call_id IS NULL OR user_id IS NULL")
    with op.batch_alter_table('originates') as batch_op:
        batch_op.alter_column('user_id', existing_type=sa.Integer(), nullable=False)
        batch_op.alter_column('b24_call_id', existing_type=sa.String(length=128),
                              nullable=False)
        batch_op.drop_column('register_command_id')
        batch_op.drop_column('external_call_id')
        batch_op.drop_column('crm_entity_id')
        batch_op.drop_column('crm_entity_type')
        batch_op.drop_column('voice')
        batch_op.drop_column('text')
        batch_op.drop_column('kind')
