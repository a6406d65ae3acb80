"""portal call options: per-portal telephony options, NULL meaning the app's default

The settings page (issue 24 point 2) sets a portal's call options: the CRM source of the
leads its calls create, the chat message per call, the anonymous and internal call policies
(and the number anonymous calls are registered under), the default country of numbers
dialled without a code. Each column is nullable: NULL is the app's TELEPHONY_* setting.

Revision ID: 0019
Revises: 0018
Create Date: 2026-12-07 18:00:00.000000

"""
import sqlalchemy as sa
from alembic import op

revision = '0019'
down_revision = '0018'
branch_labels = None
depends_on = None

COLUMNS = (
    ('crm_source', sa.String(length=64)),
    ('add_to_chat', sa.Boolean()),
    ('anonymous_calls', sa.String(length=16)),
    ('anonymous_number', sa.String(length=32)),
    ('internal_calls', sa.String(length=16)),
    ('default_country', sa.String(length=2)),
)


def upgrade():
    with op.batch_alter_table('portal_settings', schema=None) as batch_op:
        for name, kind in COLUMNS:
            batch_op.add_column(sa.Column(name, kind, nullable=True))


def downgrade():
    with op.batch_alter_table('portal_settings', schema=None) as batch_op:
        for name, _ in reversed(COLUMNS):
            batch_op.drop_column(name)
