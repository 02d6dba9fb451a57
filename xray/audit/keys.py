"""The run-sealing key: an Ed25519 key pair kept outside the artifacts root.

The key lives where someone who can write ``artifacts/`` cannot reach it:
``XRAY_SIGNING_KEY`` (a PEM path, used as is and never created), else
``$XRAY_KEYS_DIR/signing_key.pem``, else
``${XDG_CONFIG_HOME:-~/.config}/xray/signing_key.pem``, generated on first
use with mode 0600 in a 0700 folder. Verifiers only need the public key
(``xray keys export``).
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from xray.errors import XrayError

logger = logging.getLogger(__name__)

KEY_FILE = "signing_key.pem"


class SigningKeyError(XrayError):
    """The signing key or a public key cannot be read or is of the wrong kind."""


@dataclass(frozen=True)
class VerifyKey:
    """A public key and its id (sha256 of the raw key), which seals and ledger entries name."""

    key: Ed25519PublicKey
    key_id: str

    def valid(self, signature: bytes, message: bytes) -> bool:
        try:
            self.key.verify(signature, message)
        except InvalidSignature:
            return False
        return True

    def pem(self) -> bytes:
        return self.key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


@dataclass(frozen=True)
class SigningKey:
    key: Ed25519PrivateKey
    path: Path

    @property
    def public(self) -> VerifyKey:
        return verify_key(self.key.public_key())

    def sign(self, message: bytes) -> bytes:
        return self.key.sign(message)


def verify_key(key: Ed25519PublicKey) -> VerifyKey:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return VerifyKey(key, hashlib.sha256(raw).hexdigest())


def key_path(env: Mapping[str, str] = os.environ) -> tuple[Path, bool]:
    """(where the signing key is, whether it may be generated there)."""
    if env.get("XRAY_SIGNING_KEY"):
        return Path(env["XRAY_SIGNING_KEY"]).expanduser(), False
    if env.get("XRAY_KEYS_DIR"):
        return Path(env["XRAY_KEYS_DIR"]).expanduser() / KEY_FILE, True
    config_home = Path(env.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return config_home / "xray" / KEY_FILE, True


def load_signing_key(env: Mapping[str, str] = os.environ, create: bool = True) -> SigningKey:
    """The signing key; generated on first use at the default place unless ``create`` is False."""
    path, may_create = key_path(env)
    if not path.exists():
        if not may_create:
            raise SigningKeyError(f"XRAY_SIGNING_KEY: no such key file: {path}")
        if not create:
            raise SigningKeyError(f"no signing key at {path}: pass --public-key PEM, or set XRAY_SIGNING_KEY")
        _generate(path)
    return SigningKey(_read_private(path), path)


def load_public_key(path: Path | None, env: Mapping[str, str] = os.environ) -> VerifyKey:
    """The key to verify with: a public PEM when given, else the public half of the local signing key."""
    if path is None:
        return load_signing_key(env, create=False).public
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except OSError as exc:
        raise SigningKeyError(f"cannot read public key {path}: {exc.strerror or exc}") from None
    except ValueError:
        raise SigningKeyError(f"{path} is not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SigningKeyError(f"{path} is not an Ed25519 public key")
    return verify_key(key)


def _read_private(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise SigningKeyError(f"cannot read signing key {path}: {exc.strerror or exc}") from None
    except (ValueError, TypeError):
        raise SigningKeyError(f"{path} is not an unencrypted PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(f"{path} is not an Ed25519 private key (generate one with `xray keys export`)")
    if path.stat().st_mode & 0o077:
        logger.warning("signing key %s is readable by other users; chmod 600 it", path)
    return key


def _generate(path: Path) -> None:
    """Create the key once, even when several processes start at the same moment."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(path.parent / f".{KEY_FILE}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if path.exists():
                return
            pem = Ed25519PrivateKey.generate().private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(pem)
            os.replace(tmp, path)
    except OSError as exc:
        raise SigningKeyError(f"cannot create the signing key at {path}: {exc.strerror or exc}") from None
    logger.info("generated a new run-sealing key at %s", path)
