"""Environment variables: secrets and endpoints only (everything else is in the config file)."""

from __future__ import annotations

import os

from lpreg_core.config import ControlConfig, RedisConfig

REDIS_URL_ENV = "LPREG_REDIS_URL"
LEARNER_ADDRESS_ENV = "LPREG_LEARNER_ADDRESS"
STORE_HOST_ENV = "LPREG_BROADCAST_STORE_HOST"


def redis_url(config: RedisConfig) -> str:
    return os.environ.get(REDIS_URL_ENV) or config.url


def redis_password(config: RedisConfig) -> str | None:
    return os.environ.get(config.password_env) or None


def learner_address(config: ControlConfig) -> str:
    return os.environ.get(LEARNER_ADDRESS_ENV) or config.learner_address


def store_host_override() -> str | None:
    """Address generators dial for the learner's TCPStore, when the one the learner advertises
    is not routable from here (e.g. behind a Kubernetes Service)."""
    return os.environ.get(STORE_HOST_ENV) or None
