"""API key material: generation, parsing and digests. No database access here.

A key reads `sk-<prefix><secret>`: a 12-character public prefix that finds the row, then a
40-character secret of which only an HMAC-SHA256 digest (keyed by API_KEY_HASH_SECRET) is
stored. The secret has 238 bits of entropy, so a fast keyed hash is the right tool (a slow
password hash would only add latency to every request).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import string
from dataclasses import dataclass

from django.conf import settings

KEY_PREFIX_LEN = 12
KEY_SECRET_LEN = 40
_PREFIX_ALPHABET = string.ascii_lowercase + string.digits
_SECRET_ALPHABET = string.ascii_letters + string.digits
_KEY_PATTERN = re.compile(
    rf"^sk-(?P<prefix>[a-z0-9]{{{KEY_PREFIX_LEN}}})(?P<secret>[A-Za-z0-9]{{{KEY_SECRET_LEN}}})$"
)


@dataclass(frozen=True)
class KeyMaterial:
    prefix: str
    secret: str

    @property
    def full_key(self) -> str:
        return f"sk-{self.prefix}{self.secret}"


def key_material_generate() -> KeyMaterial:
    return KeyMaterial(
        prefix="".join(secrets.choice(_PREFIX_ALPHABET) for _ in range(KEY_PREFIX_LEN)),
        secret="".join(secrets.choice(_SECRET_ALPHABET) for _ in range(KEY_SECRET_LEN)),
    )


def key_material_parse(raw_key: str) -> KeyMaterial | None:
    match = _KEY_PATTERN.match(raw_key)
    if match is None:
        return None
    return KeyMaterial(prefix=match["prefix"], secret=match["secret"])


def secret_digest(secret: str) -> str:
    return hmac.new(
        settings.API_KEY_HASH_SECRET.encode(), secret.encode(), hashlib.sha256
    ).hexdigest()


def secret_matches(secret: str, stored_digest: str) -> bool:
    return hmac.compare_digest(secret_digest(secret), stored_digest)
