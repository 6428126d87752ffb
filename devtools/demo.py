"""make run's demo settings, which never override the user's, and what it says about them.

make run is a demo: without settings of your own it signs demo users in and makes up fresh
credentials (a publisher key for curl, a secret for the demo tokens). Every service setting in
the environment is the user's and wins; only the local wiring (the broker, the emulator, the
project and topic, the listen address and ports, the pod names) stays make run's. The output
names the user's settings, never their values: a key or secret given to make run is not echoed.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping

from services.api.settings import ApiSettings
from services.socket.settings import SocketSettings

DEMO_KEY = f"demo-key-{secrets.token_hex(8)}"
DEMO_ENV = {
    "API_KEYS": DEMO_KEY,
    "TOKEN_SECRET": secrets.token_urlsafe(32),
    "DEMO_TOKENS": "1",  # never in production
    "DRAIN_DELAY_S": "0",
    "DRAIN_CLOSE_WINDOW_S": "2",
}
# make run's, whatever the environment says: how its processes find each other.
WIRING = frozenset(
    {"BROKER", "PUBSUB_EMULATOR_HOST", "GOOGLE_CLOUD_PROJECT", "PUBSUB_TOPIC", "HOST", "PORT"}
    | {"POD_NAME"}  # each socket pod has its own
)
SETTINGS = frozenset(
    name.upper() for name in {*ApiSettings.model_fields, *SocketSettings.model_fields}
)


def _given(environ: Mapping[str, str]) -> dict[str, str]:
    """The service settings in the environment, by upper-case name (they are case-insensitive)."""
    return {key.upper(): value for key, value in environ.items() if key.upper() in SETTINGS}


def demo_defaults(environ: Mapping[str, str]) -> dict[str, str]:
    """The demo values for the settings the user has not set. Demo sign-in stays off when the
    user turned tokens off (TOKEN_SECRET set empty): it needs a secret to sign with."""
    given = _given(environ)
    defaults = {name: value for name, value in DEMO_ENV.items() if name not in given}
    if given.get("TOKEN_SECRET") == "":
        defaults.pop("DEMO_TOKENS", None)
    return defaults


def user_settings(environ: Mapping[str, str]) -> tuple[list[str], list[str]]:
    """(names of the user's settings in effect, names make run overrides with its wiring)."""
    given = _given(environ)
    return sorted(set(given) - WIRING), sorted(set(given) & WIRING)


def describe_credentials(environ: Mapping[str, str], defaults: Mapping[str, str]) -> list[str]:
    """Lines naming the credentials in effect; a user's own are named, never printed."""
    given = _given(environ)
    keys = defaults.get("API_KEYS", given.get("API_KEYS", ""))
    secret = defaults.get("TOKEN_SECRET", given.get("TOKEN_SECRET", ""))
    if "API_KEYS" in defaults:
        key_line = f"{DEMO_KEY} (made up for this run)"
    elif keys.strip(", "):
        key_line = "your API_KEYS"
    elif secret:
        key_line = "none (API_KEYS is empty: only client tokens publish)"
    else:
        key_line = "none: publishing is open (API_KEYS and TOKEN_SECRET are empty)"
    if "TOKEN_SECRET" in defaults:
        token_line = "signed with a secret made up for this run"
    elif secret:
        token_line = "signed with your TOKEN_SECRET"
    else:
        token_line = "not required (TOKEN_SECRET is empty)"
    demo = defaults.get("DEMO_TOKENS", given.get("DEMO_TOKENS", "0")).strip().lower()
    demo_on = demo in ("1", "true", "t", "yes", "y", "on")  # as pydantic reads a bool
    demo_line = "on: anyone signs in by name (DEMO_TOKENS)" if demo_on else "off (DEMO_TOKENS)"
    lines = [
        f"  publisher key    {key_line}",
        f"  client tokens    {token_line}",
        f"  demo sign-in     {demo_line}",
    ]
    kept, overridden = user_settings(environ)
    if kept:
        lines.append(f"  your settings    {', '.join(kept)}")
    if overridden:
        lines.append(f"  make run's own   {', '.join(overridden)} (yours are not used here)")
    return lines


def curl_authorization(defaults: Mapping[str, str], environ: Mapping[str, str]) -> str:
    """The Authorization header of the printed curl example, or "" when publishing is open."""
    given = _given(environ)
    if "API_KEYS" in defaults:
        return f"Bearer {DEMO_KEY}"
    if given.get("API_KEYS", "").strip(", "):
        return "Bearer <one of your API_KEYS>"
    if defaults.get("TOKEN_SECRET", given.get("TOKEN_SECRET", "")):
        return "Bearer <a client token>"
    return ""
