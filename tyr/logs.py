"""One logging scheme for every `tyr` command, through the stdlib `logging` module.

Where output goes (decided once, here):

- **stdout** holds a command's *result*, printed: `tyr status` lines, `tyr eval`'s JSON or table, `tyr build`'s
  supernet summary, the final line of `tyr run`, `tyr report` and `tyr export`. So `tyr eval --json > out.json`
  holds only the result.
- **stderr** holds everything about how the command is going: the messages of the logger named "tyr" and its
  children (`tyr.run`, `tyr.cluster`, `tyr.supernet.builder`, ...: every module logs to
  `logging.getLogger(__name__)`), progress bars, and the CLI's final `tyr: error: ...` line.

Each message is one plain line: `[tyr] message` at INFO, `[tyr] warning: message` (or `debug:`, `error:`) at
the other levels. The level comes from `--log-level`, else `--quiet` (warnings only) or `--verbose` (debug),
else INFO. Progress bars are drawn only on a terminal and without `--quiet` (`progress_bars`): a redirected
log holds plain lines, and the per-generation line of the search is its progress.

The Python API logs to the same loggers but installs no handler; call `setup()` (or configure `logging`
yourself) to see its INFO lines.
"""

from __future__ import annotations

import logging
import os
import sys

LOGGER_NAME = "tyr"
LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info:
            message = f"{message}\n{self.formatException(record.exc_info)}"
        if record.levelno == logging.INFO:
            return f"[tyr] {message}"
        return f"[tyr] {record.levelname.lower()}: {message}"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time of each message (pytest's capture, a redirect)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:  # assigned by StreamHandler.__init__; the property follows sys.stderr
        pass


def level_for(log_level: str | None = None, quiet: bool = False, verbose: bool = False) -> int:
    """The logging level of the CLI's flags: an explicit `--log-level` wins over `--quiet` / `--verbose`."""
    if log_level is not None:
        return LEVELS[log_level]
    if verbose:
        return logging.DEBUG
    return logging.WARNING if quiet else logging.INFO


def setup(level: int = logging.INFO) -> logging.Logger:
    """Send the "tyr" logger's messages at `level` and above to stderr, one plain line each.

    Idempotent: a second call replaces the handler of the first (the CLI's `main` may run many times in one
    process, as in the tests).
    """
    logger = logging.getLogger(LOGGER_NAME)
    for handler in [h for h in logger.handlers if isinstance(h, _StderrHandler)]:
        logger.removeHandler(handler)
    handler = _StderrHandler()
    handler.setFormatter(_Formatter())
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False  # one line per message even when the root logger has a handler too
    return logger


def progress_bars(quiet: bool = False) -> bool:
    """Whether to draw progress bars: not with `--quiet`, and only when stderr (where tqdm draws) is a terminal."""
    isatty = getattr(sys.stderr, "isatty", None)
    return not quiet and isatty is not None and isatty()


def silence_library_bars() -> None:
    """No progress bars from huggingface_hub and transformers either (loading and saving weights): the
    environment switch for libraries not imported yet, their own switches for those already imported."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    hub = sys.modules.get("huggingface_hub")
    if hub is not None:
        hub.utils.disable_progress_bars()
    transformers = sys.modules.get("transformers")
    if transformers is not None:
        transformers.utils.logging.disable_progress_bar()
