"""Tokens are unreadable in the database without TOKEN_ENCRYPTION_KEY."""

from __future__ import annotations

import pytest
from cryptography.fernet import Fernet
from sqlalchemy import text

from app.crypto import DecryptionError
from app.extensions import db
from app.tenants.models import Portal


def test_tokens_are_encrypted_at_rest(app, make_app):
    portal = Portal(member_id="m" * 32, domain="acme.bitrix24.com",
                    client_endpoint="https://acme.bitrix24.com/rest/",
                    access_token="access-plain-123", refresh_token="refresh-plain-456",
                    application_token="apptoken-789")
    db.session.add(portal)
    db.session.commit()
    row = db.session.execute(text(
        "SELECT access_token, refresh_token, application_token FROM portals")).one()
    for stored, plain in zip(row, ["access-plain-123", "refresh-plain-456", "apptoken-789"],
                             strict=True):
        assert plain not in stored
    db.session.remove()

    other = make_app(TOKEN_ENCRYPTION_KEY=Fernet.generate_key().decode())
    with other.app_context():
        with pytest.raises(DecryptionError):
            Portal.by_member_id("m" * 32).access_token  # noqa: B018
        db.session.remove()


def test_key_rotation_reads_old_tokens(app, base_config, make_app):
    db.session.add(Portal(member_id="r" * 32, domain="d", client_endpoint="https://d/rest/",
                          access_token="before-rotation"))
    db.session.commit()
    db.session.remove()
    rotated = f"{Fernet.generate_key().decode()},{base_config['TOKEN_ENCRYPTION_KEY']}"
    with make_app(TOKEN_ENCRYPTION_KEY=rotated).app_context():
        assert Portal.by_member_id("r" * 32).access_token == "before-rotation"
        db.session.remove()
