"""Credentials out of messages: URLs in text shown to users, logs and open probes.

A tracking URI may carry a password (`postgresql://mlflow:pw@host/db`), a token
(`https://token@host`) or a secret query value (`?token=...`); MLflow's own error text repeats
it. `redact` masks them wherever they appear. Standard library only (serving imports it).
"""

from __future__ import annotations

import re
from urllib.parse import unquote

__all__ = ["redact", "without_userinfo_secret"]

_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>]+")
# `scheme://user:password@` (the password up to the last `@`: an unencoded `@` in it must not
# leak its end) or `scheme://token@`.
_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*://)([^:/?#@]*)(?::(.*))?@")
_QUERY_SECRET = re.compile(
    r"(?i)([?&;][^=&#;]*(?:pass|pwd|token|secret|key|sig|auth|cred)[^=&#;]*=)([^&#;]*)"
)
_MASK = "***"


def redact(text: str, uri: str | None = None) -> str:
    """`text` with URL credentials replaced by `***`: those of every URL in it
    (`postgresql://mlflow:***@host/db`, `https://***@host`, `?token=***`) and, when `uri` (the
    tracking URI) is given, its password, token and secret query values wherever they appear.
    `redact(uri, uri)` is the URI safe to show."""
    for secret in sorted(_secrets(uri) if uri else set(), key=len, reverse=True):
        text = text.replace(secret, _MASK)
    return _URL.sub(lambda match: _redact_url(match.group()), text)


def _secrets(uri: str) -> set[str]:
    """The credentials of `uri`, as written and percent-decoded."""
    found: list[str] = []
    userinfo = _USERINFO.match(uri)
    if userinfo is not None:
        user, password = userinfo.group(2), userinfo.group(3)
        found.append(user if password is None else password)
    found += [match.group(2) for match in _QUERY_SECRET.finditer(uri)]
    return {s for raw in found for s in (raw, unquote(raw)) if s and s != _MASK}


def without_userinfo_secret(uri: str) -> str:
    """`uri` with the password of its userinfo (or the token of `scheme://token@`) masked and
    everything else as written: which store and which user, not the credential. Masked by
    position, so a password that also spells the host or the database leaves those intact."""
    return _USERINFO.sub(_mask_userinfo, uri, count=1)


def _mask_userinfo(match: re.Match[str]) -> str:
    scheme, user, password = match.groups()
    return f"{scheme}{_MASK}@" if password is None else f"{scheme}{user}:{_MASK}@"


def _redact_url(url: str) -> str:
    url = without_userinfo_secret(url)
    return _QUERY_SECRET.sub(lambda match: match.group(1) + _MASK, url)
