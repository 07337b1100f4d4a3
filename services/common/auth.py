"""Bearer-token authentication of the control plane.

The learner and every generator share one token (a Kubernetes Secret, or a random one that
``lpreg local`` generates). Clients send it as ``authorization: Bearer <token>`` metadata on every
call; the server compares it in constant time. The token is never logged or put in an error.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Mapping, Sequence

from lpreg_core.config import ControlConfig

AUTHORIZATION_KEY = "authorization"
BEARER_SCHEME = "bearer"


class AuthConfigError(ValueError):
    """The auth settings cannot work (e.g. auth is required but no token is configured)."""


def load_auth_token(config: ControlConfig, environ: Mapping[str, str] | None = None) -> str | None:
    """The bearer token from the environment variable ``config.auth_token_env``.

    Returns None when the variable is unset or empty and ``config.require_auth`` is false. Raises
    AuthConfigError when auth is required and there is no token, or when the token could not be
    sent as a gRPC metadata value.
    """
    env = os.environ if environ is None else environ
    token = env.get(config.auth_token_env, "").strip()
    if not token:
        if config.require_auth:
            raise AuthConfigError(
                f"control.require_auth is true but the environment variable "
                f"{config.auth_token_env} (control.auth_token_env) is unset or empty: set it to the "
                "shared bearer token (the Helm chart mounts it from a Secret), or set "
                "control.require_auth=false for an unauthenticated run on a trusted network"
            )
        return None
    # A metadata value must be printable ASCII; anything else would fail on every call instead.
    if not (token.isascii() and token.isprintable()) or any(c.isspace() for c in token):
        raise AuthConfigError(
            f"the bearer token in {config.auth_token_env} must be printable ASCII without spaces"
        )
    return token


def bearer_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """Call metadata that carries ``token`` (nothing when there is no token)."""
    if token is None:
        return ()
    return ((AUTHORIZATION_KEY, f"Bearer {token}"),)


def bearer_token_error(
    metadata: Sequence[tuple[str, str | bytes]] | None, expected_token: str
) -> str | None:
    """Why a call's metadata does not authenticate it, or None when it carries the expected token.

    The comparison takes the same time wherever the presented token first differs, so the token
    cannot be guessed byte by byte from response times.
    """
    values = [value for key, value in metadata or () if key.lower() == AUTHORIZATION_KEY]
    if not values:
        return "missing bearer token (send 'authorization: Bearer <token>' metadata)"
    if len(values) > 1:
        return "more than one authorization header"
    value = values[0]
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    scheme, _, presented = text.strip().partition(" ")
    if scheme.lower() != BEARER_SCHEME or not presented.strip():
        return "authorization metadata is not of the form 'Bearer <token>'"
    if not hmac.compare_digest(presented.strip().encode(), expected_token.encode()):
        return "invalid bearer token"
    return None
