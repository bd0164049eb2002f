"""Logging set-up; every line carries the id of the request it belongs to (and of its
API key, when the server has keys)."""

from __future__ import annotations

import contextvars
import logging

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
# The id (never the key) of the API key a request came with; "" without keys.
key_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("key_id", default="")


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"


class RequestContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        key = key_id_var.get()
        record.request_id = f"{request_id_var.get()} {key}" if key else request_id_var.get()
        return True


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler()
    handler.addFilter(RequestContextFilter())
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
