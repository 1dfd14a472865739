"""structlog set up once per process: JSON lines on stderr, so logs stay apart from stdout output.

Everything that writes a log line goes through the same JSON renderer: the worker's own structlog calls,
the standard library's `logging` (third-party libraries: transformers, urllib3, ...), through a root
handler with structlog's `ProcessorFormatter`, and Python warnings, as one `python warning` event each. A
log shipper that parses JSON lines then never meets a raw line from a library.
"""

from __future__ import annotations

import logging
import sys
import warnings
from typing import TextIO

import structlog
from structlog.typing import Processor

_HANDLER_NAME = "ctr-worker-json"

log = structlog.get_logger("py.warnings")


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    """`warnings.showwarning` as a structured event; the `warnings` filters still decide what shows."""
    log.warning(
        "python warning", category=category.__name__, message=str(message), filename=filename, lineno=lineno
    )


def json_handler(stream: TextIO, level: int) -> logging.Handler:
    """A stdlib handler that renders each record as the same JSON line a structlog call writes."""
    pre_chain: list[Processor] = [
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    handler = logging.StreamHandler(stream)
    handler.set_name(_HANDLER_NAME)
    handler.setLevel(level)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=pre_chain,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                structlog.processors.JSONRenderer(),
            ],
        )
    )
    return handler


def configure_logging(level: str = "INFO") -> None:
    """JSON to stderr with ISO timestamps; call once at start-up (calling again just re-applies it)."""
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        numeric = logging.INFO
    root = logging.getLogger()
    for old in list(root.handlers):
        if old.get_name() == _HANDLER_NAME:
            root.removeHandler(old)
    root.addHandler(json_handler(sys.stderr, numeric))
    root.setLevel(numeric)
    logging.captureWarnings(False)
    warnings.showwarning = _show_warning
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
