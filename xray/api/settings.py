"""The training service's settings: read once from the environment, then passed around frozen.

Everything the app touches on disk (the artifacts root, the config) is
resolved to an absolute path here, so the worker processes it starts and the
app always agree on where runs live, whatever their working directory.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

from xray.config import DEFAULT_CONFIG_PATH, load_config
from xray.entity.config_entity import DEFAULT_MAX_UPLOAD_BYTES, DEFAULT_MODEL_NAME
from xray.errors import ConfigError

logger = logging.getLogger(__name__)

MIN_TOKEN_LENGTH = 16


@dataclass(frozen=True)
class Tokens:
    """Bearer tokens by role. ``train`` tokens may also read."""

    train: tuple[str, ...] = ()
    read: tuple[str, ...] = ()


@dataclass(frozen=True)
class AppSettings:
    artifacts_dir: Path
    config_path: Path | None  # None: the built-in defaults
    tokens: Tokens
    workdir: Path  # the worker's cwd, and what relative data paths are relative to
    bento_url: str | None = None  # predict through this Bento service instead of in-process
    model_name: str = DEFAULT_MODEL_NAME
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    cookie_secure: bool = False  # set when served over https, so the login cookie never goes out in clear
    session_hours: int = 8
    exclusive_artifacts: bool = False  # only this service (on this host) runs training into the artifacts root

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ, cwd: Path | None = None) -> AppSettings:
        """``XRAY_CONFIG``, ``XRAY_ARTIFACTS_DIR``, ``XRAY_TRAIN_TOKENS``, ``XRAY_READ_TOKENS``,
        ``XRAY_TOKENS_FILE``, ``XRAY_BENTO_URL``, ``XRAY_MAX_UPLOAD_BYTES``, ``XRAY_COOKIE_SECURE``,
        ``XRAY_EXCLUSIVE_ARTIFACTS`` (a run recorded by another host name is dead: set it in a container,
        whose host name changes when it is recreated)."""
        cwd = (cwd or Path.cwd()).resolve()
        config_path: Path | None
        if env.get("XRAY_CONFIG"):
            config_path = _absolute(Path(env["XRAY_CONFIG"]), cwd)
            if not config_path.is_file():
                raise ConfigError(f"XRAY_CONFIG: config file not found: {config_path}")
        else:
            default = cwd / DEFAULT_CONFIG_PATH
            config_path = default if default.is_file() else None
        config = load_config(config_path)
        model_name = config.push.model_name
        artifacts = env.get("XRAY_ARTIFACTS_DIR") or config.artifacts_dir or "artifacts"
        tokens = _tokens(env)
        upload = env.get("XRAY_MAX_UPLOAD_BYTES", "").strip()
        return cls(
            artifacts_dir=_absolute(Path(artifacts), cwd),
            config_path=config_path,
            tokens=tokens,
            workdir=cwd,
            bento_url=(env.get("XRAY_BENTO_URL") or "").strip().rstrip("/") or None,
            model_name=model_name,
            max_upload_bytes=int(upload) if upload else cls.max_upload_bytes,
            cookie_secure=_flag(env.get("XRAY_COOKIE_SECURE")),
            exclusive_artifacts=_flag(env.get("XRAY_EXCLUSIVE_ARTIFACTS")),
        )


def _absolute(path: Path, cwd: Path) -> Path:
    path = path.expanduser()
    return (path if path.is_absolute() else cwd / path).resolve()


def _flag(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def _split(value: str | None) -> list[str]:
    return [t.strip() for t in (value or "").split(",") if t.strip()]


def _tokens(env: Mapping[str, str]) -> Tokens:
    train = _split(env.get("XRAY_TRAIN_TOKENS"))
    read = _split(env.get("XRAY_READ_TOKENS"))
    if env.get("XRAY_TOKENS_FILE"):
        path = Path(env["XRAY_TOKENS_FILE"]).expanduser()
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"XRAY_TOKENS_FILE {path}: {exc}") from None
        if not isinstance(raw, dict) or set(raw) - {"train", "read"}:
            raise ConfigError(f"XRAY_TOKENS_FILE {path}: expected a mapping with the keys train and/or read")
        for role, target in (("train", train), ("read", read)):
            values = raw.get(role) or []
            if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
                raise ConfigError(f"XRAY_TOKENS_FILE {path}: {role} must be a list of strings")
            target.extend(v.strip() for v in values if v.strip())
    for token in (*train, *read):
        if len(token) < MIN_TOKEN_LENGTH:
            logger.warning("a configured token is shorter than %d characters: use a long random one", MIN_TOKEN_LENGTH)
            break
    if not train:
        logger.warning("no train token configured: POST /train is refused until XRAY_TRAIN_TOKENS is set")
    return Tokens(train=tuple(dict.fromkeys(train)), read=tuple(dict.fromkeys(read)))
