"""Secrets at rest: tokens are stored Fernet-encrypted with ``TOKEN_ENCRYPTION_KEY``.

The key may be a comma-separated list: the first key encrypts, all keys decrypt,
which lets an operator rotate keys without downtime.
"""

from __future__ import annotations

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from flask import Flask, current_app
from sqlalchemy import String, TypeDecorator


def fernet_from(keys: str) -> MultiFernet:
    """Build the cipher from the configured key list."""
    return MultiFernet([Fernet(k.strip()) for k in keys.split(",") if k.strip()])


def init_app(app: Flask) -> None:
    """Build the app's cipher from ``TOKEN_ENCRYPTION_KEY`` (config.validate checked it)."""
    app.extensions["token_cipher"] = fernet_from(app.config["TOKEN_ENCRYPTION_KEY"])


def cipher() -> MultiFernet:
    """The current app's cipher (built by :func:`init_app`)."""
    return current_app.extensions["token_cipher"]


class DecryptionError(RuntimeError):
    """A stored secret cannot be read with the configured keys."""


class EncryptedString(TypeDecorator[str]):
    """A string column whose value is encrypted before it reaches the database."""

    impl = String
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect: object) -> str | None:
        if value is None:
            return None
        return cipher().encrypt(value.encode()).decode()

    def process_result_value(self, value: str | None, dialect: object) -> str | None:
        if value is None:
            return None
        try:
            return cipher().decrypt(value.encode()).decode()
        except InvalidToken as exc:
            raise DecryptionError(
                "stored token cannot be decrypted with TOKEN_ENCRYPTION_KEY") from exc
