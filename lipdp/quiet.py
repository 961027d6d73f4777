"""Keep harmless library warnings out of a learner's output."""

import contextlib
import logging


@contextlib.contextmanager
def quiet(logger_name: str, level: int = logging.ERROR):
    """Raise a Python logger's level for the duration of a block."""
    logger = logging.getLogger(logger_name)
    previous = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(previous)
