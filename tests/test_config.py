"""Configuration: environment over defaults, loud errors for bad secrets."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from app import config as cfg
from app import create_app
from tests.conftest import ROOT


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
    with pytest.raises(cfg.ConfigError, match="B24_AUTH_SERVERS"):
        create_app({**base_config, "B24_AUTH_SERVERS": " , "})
    with pytest.raises(cfg.ConfigError, match="TELEPHONY_INTERNAL_CALLS must be skip or"):
        create_app({**base_config, "TELEPHONY_INTERNAL_CALLS": "maybe"})
    with pytest.raises(cfg.ConfigError, match="needs TELEPHONY_ANONYMOUS_NUMBER"):
        create_app({**base_config, "TELEPHONY_ANONYMOUS_CALLS": "register"})
    with pytest.raises(cfg.ConfigError, match="TELEPHONY_DEFAULT_COUNTRY"):
        create_app({**base_config, "TELEPHONY_DEFAULT_COUNTRY": "Germany"})
    monkeypatch.setenv("MAX_BODY_BYTES", "lots")
    with pytest.raises(cfg.ConfigError, match="MAX_BODY_BYTES"):
        cfg.from_environment(Path(base_config["INSTANCE_PATH"]))


def _production_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, str]:
    """A production environment (credentials and secrets) with no shared services named."""
    env = {"B24_CLIENT_ID": "app.123", "B24_CLIENT_SECRET": "s", "SECRET_KEY": "k",
           "TOKEN_ENCRYPTION_KEY": Fernet.generate_key().decode(),
           "B24RELAY_INSTANCE": str(tmp_path)}
    for name in ("REDIS_URL", "DATABASE_URL", "B24_SANDBOX", "B24RELAY_SINGLE_HOST"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


def test_production_refuses_to_start_without_shared_redis_and_database(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    _production_env(monkeypatch, tmp_path)
    with pytest.raises(cfg.ConfigError, match=r"REDIS_URL and DATABASE_URL must be set .*"
                                              r"B24RELAY_SINGLE_HOST=1"):
        cfg.from_environment(tmp_path)
    monkeypatch.setenv("REDIS_URL", "redis://cache:6379/0")
    with pytest.raises(cfg.ConfigError, match=r"^DATABASE_URL must be set"):
        cfg.from_environment(tmp_path)
    monkeypatch.setenv("DATABASE_URL", "postgresql://u@db/x")
    assert cfg.from_environment(tmp_path)["PRODUCTION"] is True


def test_production_refuses_a_scaled_rate_bucket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    _production_env(monkeypatch, tmp_path)
    monkeypatch.setenv("REDIS_URL", "redis://cache:6379/0")
    monkeypatch.setenv("DATABASE_URL", "postgresql://u@db/x")
    monkeypatch.setenv("DISPATCH_BUCKET_SCALE", "1000")
    with pytest.raises(cfg.ConfigError, match=r"^DISPATCH_BUCKET_SCALE must be 1 in production"):
        cfg.validate(cfg.from_environment(tmp_path))  # what create_app does before anything
    monkeypatch.setenv("DISPATCH_BUCKET_SCALE", "1")
    cfg.validate(cfg.from_environment(tmp_path))
    monkeypatch.setenv("DISPATCH_BUCKET_SCALE", "1000")
    monkeypatch.setenv("B24_SANDBOX", "1")  # a benchmark against the sandbox portal may scale it
    cfg.validate(cfg.from_environment(tmp_path))


def test_single_host_opt_in_and_the_sandbox_may_run_embedded(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch):
    _production_env(monkeypatch, tmp_path)
    monkeypatch.setenv("B24RELAY_SINGLE_HOST", "1")
    assert cfg.from_environment(tmp_path)["REDIS_URL"] is None
    monkeypatch.delenv("B24RELAY_SINGLE_HOST")
    monkeypatch.setenv("B24_SANDBOX", "1")  # make run's sandbox portal: not production
    assert cfg.from_environment(tmp_path)["PRODUCTION"] is False


def test_a_production_process_without_redis_url_exits_before_starting_any_redis(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    env = {k: v for k, v in os.environ.items() if k not in {"REDIS_URL", "DATABASE_URL"}}
    env.update(_production_env(monkeypatch, tmp_path), PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-m", "flask", "--app", "wsgi", "portals", "list"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "REDIS_URL and DATABASE_URL must be set" in done.stderr
    assert not (tmp_path / "redis.sock").exists(), "no embedded Redis was started"
    assert not (tmp_path / "b24relay.db").exists(), "nor a SQLite database created"
