"""The training service's settings: read once from the environment, then passed around frozen.

Everything the app touches on disk (the artifacts root, the config) is
resolved to an absolute path here, so the worker processes it starts and the
app always agree on where runs live, whatever their working directory.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from xray.config import DEFAULT_CONFIG_PATH, load_config
from xray.data.sources.base import Allowlist
from xray.data.sources.registry import allowlists
from xray.entity.config_entity import DEFAULT_MAX_UPLOAD_BYTES, DEFAULT_MODEL_NAME
from xray.errors import ConfigError

logger = logging.getLogger(__name__)

MIN_TOKEN_LENGTH = 16


@dataclass(frozen=True)
class Tokens:
    """Bearer tokens by role. ``admin`` may do all ``train`` may, ``train`` all ``read`` may."""

    train: tuple[str, ...] = ()
    read: tuple[str, ...] = ()
    admin: tuple[str, ...] = ()  # may also override the gate, push, S3 and other server-held keys


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
    # what POST /train may read, per allowlist the data sources declare (XRAY_DATA_ROOTS: local folders,
    # XRAY_DATA_BUCKETS: S3 buckets); none set: only the demo data
    data_allowed: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    max_json_bytes: int = 64 * 1024  # any request body that is not a multipart upload
    auth_max_failures: int = 10  # failed token attempts per client within auth_window_s before 429
    auth_window_s: int = 60

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ, cwd: Path | None = None) -> AppSettings:
        """``XRAY_CONFIG``, ``XRAY_ARTIFACTS_DIR``, ``XRAY_TRAIN_TOKENS``, ``XRAY_READ_TOKENS``,
        ``XRAY_TOKENS_FILE``, ``XRAY_BENTO_URL``, ``XRAY_MAX_UPLOAD_BYTES``, ``XRAY_COOKIE_SECURE``,
        ``XRAY_EXCLUSIVE_ARTIFACTS`` (a run recorded by another host name is dead: set it in a container,
        whose host name changes when it is recreated), ``XRAY_ADMIN_TOKENS``, ``XRAY_DATA_ROOTS``
        (colon- or comma-separated folders), ``XRAY_DATA_BUCKETS``, ``XRAY_MAX_JSON_BYTES``,
        ``XRAY_AUTH_MAX_FAILURES``, ``XRAY_AUTH_WINDOW_S``."""
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
        return cls(
            artifacts_dir=_absolute(Path(artifacts), cwd),
            config_path=config_path,
            tokens=tokens,
            workdir=cwd,
            bento_url=(env.get("XRAY_BENTO_URL") or "").strip().rstrip("/") or None,
            model_name=model_name,
            max_upload_bytes=_positive_int(env, "XRAY_MAX_UPLOAD_BYTES", cls.max_upload_bytes),
            cookie_secure=_flag(env.get("XRAY_COOKIE_SECURE")),
            exclusive_artifacts=_flag(env.get("XRAY_EXCLUSIVE_ARTIFACTS")),
            data_allowed={a.env: _allowlist(env.get(a.env), a, cwd) for a in allowlists()},
            max_json_bytes=_positive_int(env, "XRAY_MAX_JSON_BYTES", cls.max_json_bytes),
            auth_max_failures=_positive_int(env, "XRAY_AUTH_MAX_FAILURES", cls.auth_max_failures),
            auth_window_s=_positive_int(env, "XRAY_AUTH_WINDOW_S", cls.auth_window_s),
        )


def _absolute(path: Path, cwd: Path) -> Path:
    path = path.expanduser()
    return (path if path.is_absolute() else cwd / path).resolve()


def _allowlist(value: str | None, allowlist: Allowlist, cwd: Path) -> tuple[str, ...]:
    """An allowlist's entries: folders (colon- or comma-separated) made absolute, or names (comma-separated)."""
    if allowlist.folders:
        return tuple(str(_absolute(Path(p), cwd)) for p in _split(value, ",:"))
    return tuple(_split(value))


def _flag(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def _split(value: str | None, separators: str = ",") -> list[str]:
    text = value or ""
    for extra in separators[1:]:
        text = text.replace(extra, separators[0])
    return [t.strip() for t in text.split(separators[0]) if t.strip()]


def _positive_int(env: Mapping[str, str], name: str, default: int) -> int:
    text = env.get(name, "").strip()
    if not text:
        return default
    if not text.isdigit() or int(text) < 1:
        raise ConfigError(f"{name} must be a positive integer, got {text!r}")
    return int(text)


def _tokens(env: Mapping[str, str]) -> Tokens:
    train = _split(env.get("XRAY_TRAIN_TOKENS"))
    read = _split(env.get("XRAY_READ_TOKENS"))
    admin = _split(env.get("XRAY_ADMIN_TOKENS"))
    if env.get("XRAY_TOKENS_FILE"):
        path = Path(env["XRAY_TOKENS_FILE"]).expanduser()
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"XRAY_TOKENS_FILE {path}: {exc}") from None
        if not isinstance(raw, dict) or set(raw) - {"train", "read", "admin"}:
            raise ConfigError(f"XRAY_TOKENS_FILE {path}: expected a mapping with the keys train, read and/or admin")
        for role, target in (("train", train), ("read", read), ("admin", admin)):
            values = raw.get(role) or []
            if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
                raise ConfigError(f"XRAY_TOKENS_FILE {path}: {role} must be a list of strings")
            target.extend(v.strip() for v in values if v.strip())
    for token in (*train, *read, *admin):
        if len(token) < MIN_TOKEN_LENGTH:
            logger.warning("a configured token is shorter than %d characters: use a long random one", MIN_TOKEN_LENGTH)
            break
    if not train and not admin:
        logger.warning("no train token configured: POST /train is refused until XRAY_TRAIN_TOKENS is set")
    return Tokens(
        train=tuple(dict.fromkeys(train)), read=tuple(dict.fromkeys(read)), admin=tuple(dict.fromkeys(admin))
    )
