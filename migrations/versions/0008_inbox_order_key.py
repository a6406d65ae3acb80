"""inbox_events.order_key: rows of one (portal, key) are handled one at a time, in id order

A PBX call's events carry their call_id as the key (app/ingress/ordering.py). The index
serves the claim's check for an earlier unfinished row of the same key; it holds only
keyed rows, so keyless intake pays nothing for it.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07 02:00:00.000000

"""
import sqlalchemy as sa
from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None

KEYED = sa.text("order_key IS NOT NULL")


def upgrade():
    op.add_column('inbox_events', sa.Column('order_key', sa.String(length=256), nullable=True))
    op.create_index('ix_inbox_events_order_key', 'inbox_events',
                    ['portal_id', 'order_key', 'id'], postgresql_where=KEYED, sqlite_where=KEYED)


def downgrade():
    op.drop_index('ix_inbox_events_order_key', table_name='inbox_events')
    with op.batch_alter_table('inbox_events') as batch_op:
        batch_op.drop_column('order_key')
