"""Fixtures every suite shares: a channel and a room no other test uses, and client tokens.

A suite's own conftest.py keeps what only it needs (its cluster, its clients); a suite whose
socket pods check tokens with another secret overrides `token_secret`.
"""

from __future__ import annotations

import functools

import pytest

from tests.support import TOKEN_SECRET, Mint, mint, unique_channel


@pytest.fixture
def channel(request: pytest.FixtureRequest) -> str:
    """A channel (`test:<test's name>-<serial>-<pid>`) no other test uses."""
    return unique_channel("test", request.node.name)


@pytest.fixture
def room(request: pytest.FixtureRequest) -> str:
    """A socket.io room (`room:<test's name>-<serial>-<pid>`) no other test uses."""
    return unique_channel("room", request.node.name)


@pytest.fixture(scope="session")
def token_secret() -> str:
    """The secret the suite's socket pods and api check client tokens with."""
    return TOKEN_SECRET


@pytest.fixture
def token(token_secret: str) -> Mint:
    """Mints client tokens with `token_secret`: token(sub="ann", channels=("room:*",),
    publish=(), ttl_s=600)."""
    return functools.partial(mint, secret=token_secret)
