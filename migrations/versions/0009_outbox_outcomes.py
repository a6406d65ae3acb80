"""outbox outcomes: handler, context and settled replace on_done; three priorities; sync status

- ``outcome`` (done, dead, unknown) says how a finished command ended; existing dead rows
  whose reason starts "unknown outcome" become ``unknown``, the other dead ones ``dead``.
- ``handler``/``context``/``settled``/``settle_sent_at`` replace ``on_done``/``on_done_sent``:
  the old follow-up actor names map to the tags their handlers own now (an unknown name is
  kept as a tag, and settled as unhandled). Rows that died before this change are marked
  settled: nobody was ever to be told of them, and their outcomes now would come as a flood.
- ``inbox_event_id`` goes: nothing ever read it (a handler that needs its event can put it
  in the command's context).
- priorities: REALTIME 0, NORMAL 1 (new), BULK 2 (was 1).
- ``portals.users_sync_status``/``_error``/``_at``: where the last user sync stands.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07 02:00:00.000000

"""
import sqlalchemy as sa
from alembic import op

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None

BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TAGS = {"tenants_setup_read": "installation.setup_read",
        "tenants_users_page": "installation.users_page",
        "tenants_user_fetched": "installation.user_fetched"}
T = sa.table('outbox_commands', sa.column('status', sa.String), sa.column('priority', sa.Integer),
             sa.column('dead_reason', sa.Text), sa.column('outcome', sa.String),
             sa.column('on_done', sa.String), sa.column('on_done_sent', sa.Boolean),
             sa.column('handler', sa.String), sa.column('settled', sa.Boolean))


def upgrade():
    with op.batch_alter_table('outbox_commands') as batch_op:
        batch_op.add_column(sa.Column('outcome', sa.String(length=8), nullable=True))
        batch_op.add_column(sa.Column('handler', sa.String(length=128), nullable=True))
        batch_op.add_column(sa.Column('context', sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column('settled', sa.Boolean(), nullable=True))
        batch_op.add_column(sa.Column('settle_sent_at', sa.DateTime(timezone=True),
                                      nullable=True))
    _fill_outcomes()
    with op.batch_alter_table('outbox_commands') as batch_op:
        batch_op.alter_column('settled', existing_type=sa.Boolean(), nullable=False)
        batch_op.drop_index('ix_outbox_commands_on_done_sent_status')
        batch_op.create_index('ix_outbox_commands_settled_status', ['settled', 'status'],
                              unique=False)
        batch_op.drop_column('on_done')
        batch_op.drop_column('on_done_sent')
        batch_op.drop_column('inbox_event_id')
    with op.batch_alter_table('portals') as batch_op:
        batch_op.add_column(sa.Column('users_sync_status', sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column('users_sync_error', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('users_sync_at', sa.DateTime(timezone=True),
                                      nullable=True))


def _fill_outcomes():
    op.execute(T.update().where(T.c.status == 'done').values(outcome='done'))
    op.execute(T.update().where(T.c.status == 'dead', T.c.dead_reason.like('unknown outcome%'))
               .values(outcome='unknown'))
    op.execute(T.update().where(T.c.status == 'dead', T.c.outcome.is_(None))
               .values(outcome='dead'))
    op.execute(T.update().where(T.c.on_done.is_not(None)).values(
        handler=sa.case(*((T.c.on_done == old, new) for old, new in TAGS.items()),
                        else_=T.c.on_done)))
    op.execute(T.update().values(settled=sa.case((T.c.status == 'dead', sa.true()),
                                                 else_=T.c.on_done_sent)))
    op.execute(T.update().where(T.c.priority == 1).values(priority=2))


def downgrade():
    # Not recreated on SQLite (it drops these plain columns itself since 3.35): dropping the
    # old portals table would cascade into every table that references it.
    with op.batch_alter_table('portals', recreate='never') as batch_op:
        batch_op.drop_column('users_sync_at')
        batch_op.drop_column('users_sync_error')
        batch_op.drop_column('users_sync_status')
    with op.batch_alter_table('outbox_commands') as batch_op:
        batch_op.add_column(sa.Column('on_done', sa.String(length=128), nullable=True))
        batch_op.add_column(sa.Column('on_done_sent', sa.Boolean(), nullable=True))
        batch_op.add_column(sa.Column('inbox_event_id', BIG_ID, nullable=True))
    old = {new: name for name, new in TAGS.items()}
    op.execute(T.update().where(T.c.handler.is_not(None)).values(
        on_done=sa.case(*((T.c.handler == new, name) for new, name in old.items()),
                        else_=T.c.handler)))
    op.execute(T.update().values(on_done_sent=T.c.settled))
    op.execute(T.update().where(T.c.priority == 1).values(priority=0))  # normal: real-time
    op.execute(T.update().where(T.c.priority == 2).values(priority=1))
    with op.batch_alter_table('outbox_commands') as batch_op:
        batch_op.alter_column('on_done_sent', existing_type=sa.Boolean(), nullable=False)
        batch_op.drop_index('ix_outbox_commands_settled_status')
        batch_op.create_index('ix_outbox_commands_on_done_sent_status',
                              ['on_done_sent', 'status'], unique=False)
        batch_op.drop_column('settle_sent_at')
        batch_op.drop_column('settled')
        batch_op.drop_column('context')
        batch_op.drop_column('handler')
        batch_op.drop_column('outcome')
