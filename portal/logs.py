"""Log context and log formats: which request, tenant, job and pool every line belongs to.

The request middleware binds the request id, API-key authentication the tenant, and the job
runner the job, tenant and pool; `LogContextFilter` stamps whatever is bound on every record.
`JsonLogFormatter` writes one JSON object per line (SLUICE_LOG_FORMAT=json, the default outside
`make run`). Both formats redact anything shaped like an API key, a webhook secret, a bearer
token or a URL's password, as a last line of defence: no code path should log one in the first
place.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Iterator
from contextvars import ContextVar
from datetime import UTC, datetime

LOG_CONTEXT_FIELDS = ("request_id", "tenant_id", "job_id", "pool")
_bound: dict[str, ContextVar] = {
    name: ContextVar(f"log_{name}", default=None) for name in LOG_CONTEXT_FIELDS
}
# `sk-<12-char prefix><secret>` API keys (portal/keys.py) keep their public prefix, which is
# how operators find the key; `whsec_<base64>` webhook secrets (inference/webhooks.py) go whole.
_SECRET = re.compile(r"\b(sk-[a-z0-9]{12}|whsec_)[A-Za-z0-9+/=]{8,}")
# The password of a URL's userinfo (`redis://:pw@host`, `postgres://user:pw@host`): the
# database and Redis URLs are secrets. The user name stays, it says which account.
_URL_PASSWORD = re.compile(r"(\b[a-z][a-z0-9+.-]*://[^\s:/@\"']*:)[^\s@/\"']+@", re.IGNORECASE)
# A bearer token other than an API key (those keep their prefix above): the metrics token.
_BEARER = re.compile(r"(\bBearer\s+)(?!sk-)[A-Za-z0-9._~+/-]+=*", re.IGNORECASE)


@contextlib.contextmanager
def log_context(**values: str | int | None) -> Iterator[None]:
    """Bind ids for the lines logged inside the block; the previous values come back after."""
    tokens = [(_bound[name], _bound[name].set(value)) for name, value in values.items()]
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


def log_context_bind(**values: str | int | None) -> None:
    """Bind ids until the enclosing `log_context` block ends (authentication inside a request)."""
    for name, value in values.items():
        _bound[name].set(value)


def log_context_get(name: str):
    return _bound[name].get()


def secrets_redact(text: str) -> str:
    text = _SECRET.sub(lambda match: f"{match.group(1)}[redacted]", text)
    text = _URL_PASSWORD.sub(lambda match: f"{match.group(1)}[redacted]@", text)
    return _BEARER.sub(lambda match: f"{match.group(1)}[redacted]", text)


class LogContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        known = []
        for name in LOG_CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value is None:
                value = _bound[name].get()
            setattr(record, name, value)
            if value is not None:
                known.append(f"{name}={value}")
        record.log_context = " ".join(known) or "-"
        return True


class PlainLogFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return secrets_redact(super().format(record))


class JsonLogFormatter(PlainLogFormatter):
    """{"time", "level", "logger", "message", request_id/tenant_id/job_id/pool when known,
    "exception" with the traceback}."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in LOG_CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value is None:
                value = _bound[name].get()  # a handler configured without the filter
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return secrets_redact(json.dumps(entry, default=str))


def transformers_logs_route() -> None:
    """transformers writes its warnings to stderr through a handler of its own ("[transformers]
    ...", not propagated) and draws a tqdm bar while it loads weights: both bypassed the JSON
    formatter, so the safety classifier's load put non-JSON lines in every web and worker pod's
    log. Its records go to the root logger's handlers instead (its level stays WARNING), and no
    bars. Imports transformers: call it where a model is loaded, not at start-up."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_default_handler()
    transformers_logging.enable_propagation()
    transformers_logging.disable_progress_bar()
