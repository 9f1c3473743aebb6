"""JSON log lines on stdout through structlog.

One line per event, ``{"event": "listening", "level": "info", "timestamp": ...}``;
nothing is logged per request above debug level, so logging costs nothing on
the hot path at the default level.
"""

from __future__ import annotations

import logging
import sys

import structlog

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


#: Fields every line of this process carries (a worker's number), kept
#: across ``configure`` calls: SIGHUP reconfigures the level.
_TAGS: dict[str, object] = {}


def tag(**fields: object) -> None:
    """Add ``fields`` to every later line of this process, from any thread."""
    _TAGS.update(fields)


def _add_tags(
    logger: object, method: str, event: structlog.typing.EventDict
) -> structlog.typing.EventDict:
    for key, value in _TAGS.items():
        event.setdefault(key, value)
    return event


def configure(level: str = "info") -> None:
    """Set up structlog for JSON lines at ``level`` (debug|info|warning|error)."""
    structlog.configure(
        processors=[
            _add_tags,
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        # one write per line: the lines of several workers sharing stdout
        # never interleave (a pipe write of up to PIPE_BUF bytes is atomic)
        logger_factory=structlog.WriteLoggerFactory(sys.stdout),
        cache_logger_on_first_use=False,
    )
