"""The control plane's domain errors. Servicers and the registry raise them; the gRPC layer
(``services.common.grpc_status``) maps each to one status code and back.

  UnknownGenerator -> NOT_FOUND         the generator id was never registered, was removed, or the
                                        session id is stale (a newer registration replaced it);
                                        the generator's answer is always the same: register again.
  InvalidArgument  -> INVALID_ARGUMENT  a malformed request or one that cannot fit this run (e.g. a
                                        vocabulary size that differs from the learner's model).
  Unauthenticated  -> UNAUTHENTICATED   a missing or wrong bearer token.
  Unavailable      -> UNAVAILABLE       the learner is shutting down (or, on the client, stayed
                                        unreachable through every retry).
"""

from __future__ import annotations


class ControlError(Exception):
    """A control-plane request the learner refuses; subclasses pick the gRPC status code."""


class UnknownGenerator(ControlError):
    """The generator id is not registered, or the session id is not its current session."""


class InvalidArgument(ControlError):
    """The request is malformed or does not fit this run."""


class Unauthenticated(ControlError):
    """The call carries no bearer token or a wrong one."""


class Unavailable(ControlError):
    """The learner is shutting down, or could not be reached."""
