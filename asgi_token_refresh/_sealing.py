"""AEAD sealing (AES-GCM) with key rotation: how tokens are stored anywhere outside memory.

Cookies, Redis values and the file coordinator's results are sealed with the app's secret
keys: the first key seals, every key opens, so keys rotate by prepending a new one. Each use
derives its own key (``purpose``) and binds every blob to where it is stored (``aad``), so a
value cannot be replayed under another cookie name or Redis key.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ._errors import ConfigurationError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = ["Sealer"]

_NONCE = 12
_TAG = 16


class Sealer:
    """Seal and open small blobs with AES-GCM under a list of secret keys."""

    def __init__(self, secret_keys: Sequence[str | bytes], *, purpose: str, extra: str) -> None:
        try:
            from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        except ImportError:  # pragma: no cover - depends on the installation
            raise ConfigurationError(
                f"{purpose} needs the 'cryptography' package: "
                f"pip install 'asgi-token-refresh[{extra}]'"
            ) from None
        if isinstance(secret_keys, str | bytes) or not secret_keys:
            raise ConfigurationError("secret_keys must be a non-empty list of keys")
        raw = [k.encode() if isinstance(k, str) else bytes(k) for k in secret_keys]
        if any(len(k) < 32 for k in raw):
            raise ConfigurationError("every secret key must be at least 32 characters long")
        person = purpose.encode()[:16]
        self._ciphers: list[AESGCM] = [
            AESGCM(hashlib.blake2b(k, digest_size=32, person=person).digest()) for k in raw
        ]
        # A separate derived key names things (Redis keys, file names) without revealing them.
        self._naming_keys = [
            hashlib.blake2b(k, digest_size=32, person=b"atr-naming").digest() for k in raw
        ]

    def __repr__(self) -> str:
        return f"Sealer(keys={len(self._ciphers)})"

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        nonce = secrets.token_bytes(_NONCE)
        return nonce + self._ciphers[0].encrypt(nonce, plaintext, aad)

    def open(self, blob: bytes, aad: bytes) -> bytes:
        """The plaintext, or ``ValueError`` if no key authenticates ``blob`` under ``aad``."""
        from cryptography.exceptions import InvalidTag

        if len(blob) < _NONCE + _TAG:
            raise ValueError("sealed value too short")
        for cipher in self._ciphers:
            try:
                return cipher.decrypt(blob[:_NONCE], blob[_NONCE:], aad)
            except InvalidTag:
                continue
        raise ValueError("no key opens the sealed value")

    def name(self, *parts: str | None) -> str:
        """A stable, secret-keyed name for ``parts`` (the same in every process sharing the
        first key); reveals nothing about them."""
        return self._name(self._naming_keys[0], parts)

    def names(self, *parts: str | None) -> list[str]:
        """:meth:`name` under every key, the current one first: what was stored before the
        keys rotated (a new key prepended) is found under an older name."""
        return [self._name(key, parts) for key in self._naming_keys]

    @staticmethod
    def _name(key: bytes, parts: tuple[str | None, ...]) -> str:
        mac = hmac.new(key, digestmod=hashlib.sha256)
        for part in parts:
            raw = b"\x00" if part is None else b"\x01" + part.encode()
            mac.update(len(raw).to_bytes(4, "big") + raw)
        return mac.hexdigest()[:32]
