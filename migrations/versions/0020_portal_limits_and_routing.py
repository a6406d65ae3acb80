"""portal dispatcher limits and routing rules: per portal, NULL meaning the app's default

The settings page (issue 24 point 2) sets a portal's dispatcher limits and routing rules.

- ``max_batches_in_flight`` (K) becomes nullable, NULL meaning automatic (the app's rule:
  DISPATCH_MAX_INFLIGHT, else the plan's burst plus its real-time slots). Its old default, 4,
  was never read by anyone, so every existing row is set to NULL: nothing changes for a
  portal whose administrator never chose a number.
- ``sequential``: one batch in flight at a time (K=1); NULL: the app's DISPATCH_MODE.
- ``route_priority``: the CRM kinds routing ranks, in order (``contact,company,lead``; empty:
  never route); NULL: the app's TELEPHONY_ROUTE_PRIORITY.
- ``route_skip_absent``: skip a responsible not at work; NULL: TELEPHONY_ROUTE_SKIP_ABSENT.

Revision ID: 0020
Revises: 0019
Create Date: 2026-12-07 19:00:00.000000

"""
import sqlalchemy as sa
from alembic import op

revision = '0020'
down_revision = '0019'
branch_labels = None
depends_on = None

COLUMNS = (
    ('sequential', sa.Boolean()),
    ('route_priority', sa.String(length=32)),
    ('route_skip_absent', sa.Boolean()),
)


def upgrade():
    with op.batch_alter_table('portal_settings', schema=None) as batch_op:
        batch_op.alter_column('max_batches_in_flight', existing_type=sa.Integer(),
                              nullable=True)
        for name, kind in COLUMNS:
            batch_op.add_column(sa.Column(name, kind, nullable=True))
    op.execute("UPDATE portal_settings SET max_batches_in_flight = NULL")


def downgrade():
    op.execute("UPDATE portal_settings SET max_batches_in_flight = 4 "
               "WHERE max_batches_in_flight IS NULL")
    with op.batch_alter_table('portal_settings', schema=None) as batch_op:
        for name, _ in reversed(COLUMNS):
            batch_op.drop_column(name)
        batch_op.alter_column('max_batches_in_flight', existing_type=sa.Integer(),
                              nullable=False)
