"""make run's demo settings give way to the user's; its output names the user's, never shows them."""

from __future__ import annotations

from pathlib import Path

import pytest

from devtools import cluster as cluster_module
from devtools.cluster import ClusterConfig, LocalCluster
from devtools.demo import (
    DEMO_ENV,
    DEMO_KEY,
    curl_authorization,
    demo_defaults,
    describe_credentials,
)


def test_no_settings_of_your_own_gives_the_whole_demo() -> None:
    assert demo_defaults({"PATH": "/bin"}) == DEMO_ENV


def test_every_setting_you_give_wins() -> None:
    environ = {"API_KEYS": "k", "ALLOWED_ORIGINS": "https://a.example", "drain_delay_s": "5"}
    defaults = demo_defaults(environ)
    assert "API_KEYS" not in defaults and "DRAIN_DELAY_S" not in defaults  # case-insensitive
    assert defaults["TOKEN_SECRET"] == DEMO_ENV["TOKEN_SECRET"]


def test_tokens_turned_off_turns_demo_sign_in_off() -> None:
    """TOKEN_SECRET set empty: no demo tokens (they need a secret), not a pod that won't start."""
    defaults = demo_defaults({"TOKEN_SECRET": ""})
    assert "TOKEN_SECRET" not in defaults and "DEMO_TOKENS" not in defaults


@pytest.fixture
def no_emulator_lookup(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cluster_module, "emulator_launcher", lambda: None)


def test_cluster_env_defaults_under_the_environment_wiring_over_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, no_emulator_lookup: None
) -> None:
    monkeypatch.setenv("API_KEYS", "mine")
    monkeypatch.setenv("PUBSUB_TOPIC", "elsewhere")
    monkeypatch.setenv("POD_NAME", "mine")
    config = ClusterConfig(default_env={"API_KEYS": "demo", "DEMO_TOKENS": "1"})
    local = LocalCluster(config, work_dir=tmp_path)
    for service in (local.api, *local.sockets):
        assert service.env["API_KEYS"] == "mine"
        assert service.env["DEMO_TOKENS"] == "1"
        assert service.env["PUBSUB_TOPIC"] == cluster_module.TOPIC
    assert [s.env["POD_NAME"] for s in local.sockets] == ["socket-1", "socket-2"]


def test_the_output_names_your_credentials_and_never_shows_them() -> None:
    environ = {"API_KEYS": "secret-key-1,secret-key-2", "TOKEN_SECRET": "secret-signer"}
    defaults = demo_defaults(environ)
    text = "\n".join(describe_credentials(environ, defaults)) + curl_authorization(
        defaults, environ
    )
    assert "secret-" not in text
    assert "your API_KEYS" in text and "your TOKEN_SECRET" in text
    assert "your settings    API_KEYS, TOKEN_SECRET" in text


def test_the_output_shows_the_key_it_made_up() -> None:
    defaults = demo_defaults({})
    lines = describe_credentials({}, defaults)
    assert any(DEMO_KEY in line for line in lines)
    assert DEMO_ENV["TOKEN_SECRET"] not in "\n".join(lines)
    assert curl_authorization(defaults, {}) == f"Bearer {DEMO_KEY}"


def test_the_output_says_which_of_your_settings_it_does_not_use() -> None:
    environ = {"BROKER": "memory", "PUBSUB_TOPIC": "t"}
    lines = describe_credentials(environ, demo_defaults(environ))
    assert "  make run's own   BROKER, PUBSUB_TOPIC (yours are not used here)" in lines


def test_open_publishing_is_said_so() -> None:
    environ = {"API_KEYS": "", "TOKEN_SECRET": ""}
    defaults = demo_defaults(environ)
    text = "\n".join(describe_credentials(environ, defaults))
    assert "publishing is open" in text and "demo sign-in     off" in text
    assert curl_authorization(defaults, environ) == ""
