"""Pseudonyms: the salted, keyed hashes that stand for subjects and scans everywhere medgen writes.

Shared by ingestion (which makes them) and by whatever joins a researcher's table to the manifest
(medgen.datasets.covariates), so a BIDS label becomes the same pseudonym in both.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from pathlib import Path

from medgen.io.atomic import write_text_atomic

BIDS_SUBJECT = re.compile(r"^sub-[A-Za-z0-9]+$")


def ingest_salt(state: Path, salt: str | None) -> str:
    """The secret behind the pseudonyms: given, from MEDGEN_SUBJECT_SALT, or made once and kept."""
    if salt:
        return salt
    if os.environ.get("MEDGEN_SUBJECT_SALT"):
        return os.environ["MEDGEN_SUBJECT_SALT"]
    f = state / "salt"
    if not f.exists():
        write_text_atomic(f, secrets.token_hex(32))
        f.chmod(0o600)
    return f.read_text().strip()


def digest(salt: str, message: str) -> str:
    return hmac.new(salt.encode(), message.encode(), hashlib.sha256).hexdigest()[:16]


def subject_id(salt: str, key: str) -> str:
    return "sub-" + digest(salt, "subject:" + key) if key else ""
