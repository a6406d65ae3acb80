"""Configuration: environment over defaults, loud errors for bad secrets."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from app import config as cfg
from app import create_app


def test_embedded_defaults_when_nothing_is_set(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch):
    names = ("DATABASE_URL", "REDIS_URL", "B24_CLIENT_ID", "SECRET_KEY", "TOKEN_ENCRYPTION_KEY")
    for name in names:
        monkeypatch.delenv(name, raising=False)
    settings = cfg.from_environment(tmp_path)
    assert settings["SQLALCHEMY_DATABASE_URI"] == f"sqlite:///{tmp_path / 'b24relay.db'}"
    assert settings["REDIS_URL"] is None
    assert settings["APP_PUBLIC_URL"] == "http://127.0.0.1:8000"
    # Generated dev secrets are stable across restarts of the same instance.
    again = cfg.from_environment(tmp_path)
    assert settings["SECRET_KEY"] == again["SECRET_KEY"]
    assert settings["TOKEN_ENCRYPTION_KEY"] == again["TOKEN_ENCRYPTION_KEY"]
    Fernet(settings["TOKEN_ENCRYPTION_KEY"])


def test_environment_overrides_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("DATABASE_URL", "postgres://u@db:5432/x")
    monkeypatch.setenv("REDIS_URL", "redis://cache:6379/2")
    monkeypatch.setenv("BROKER_URL", "amqp://guest:guest@mq:5672/")
    monkeypatch.setenv("APP_PUBLIC_URL", "https://relay.example.com/")
    monkeypatch.setenv("B24_OAUTH_TOKEN_URL", "https://oauth.example/oauth/token/")
    settings = cfg.from_environment(tmp_path)
    assert settings["SQLALCHEMY_DATABASE_URI"] == "postgresql+psycopg://u@db:5432/x"
    assert settings["REDIS_URL"] == "redis://cache:6379/2"
    assert settings["BROKER_URL"] == "amqp://guest:guest@mq:5672/"
    assert settings["APP_PUBLIC_URL"] == "https://relay.example.com"
    assert settings["B24_OAUTH_TOKEN_URL"] == "https://oauth.example/oauth/token/"


def test_production_requires_secrets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("B24_CLIENT_ID", "app.123")
    monkeypatch.setenv("B24_CLIENT_SECRET", "s")
    monkeypatch.delenv("SECRET_KEY", raising=False)
    monkeypatch.delenv("TOKEN_ENCRYPTION_KEY", raising=False)
    with pytest.raises(cfg.ConfigError, match="SECRET_KEY"):
        cfg.from_environment(tmp_path)
    monkeypatch.setenv("SECRET_KEY", "k")
    with pytest.raises(cfg.ConfigError, match="TOKEN_ENCRYPTION_KEY"):
        cfg.from_environment(tmp_path)


def test_malformed_values_name_the_setting(base_config: dict, monkeypatch: pytest.MonkeyPatch):
    with pytest.raises(cfg.ConfigError, match="TOKEN_ENCRYPTION_KEY"):
        create_app({**base_config, "TOKEN_ENCRYPTION_KEY": "not-a-fernet-key"})
    with pytest.raises(cfg.ConfigError, match="BROKER_URL"):
        create_app({**base_config, "BROKER_URL": "kafka://x"})
    monkeypatch.setenv("MAX_BODY_BYTES", "lots")
    with pytest.raises(cfg.ConfigError, match="MAX_BODY_BYTES"):
        cfg.from_environment(Path(base_config["INSTANCE_PATH"]))
