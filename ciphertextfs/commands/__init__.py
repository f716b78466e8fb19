"""Subcommands of the `ciphertextfs` command line; see ciphertextfs.cli."""

import signal
import textwrap

from ciphertextfs import EXIT_FATAL, EXIT_OK, EXIT_PARTIAL, EXIT_SIGNAL_BASE


class CommandError(Exception):
    """A failure reported as one line `ciphertextfs: error: MESSAGE`."""

    def __init__(self, message: str, exit_code: int = EXIT_FATAL) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def exit_status_help(
    ok: str, partial: str | None, fatal: str | None, *, signals: str | None = None
) -> str:
    """The "exit status:" section of a command's --help, from the one convention.

    `fatal` names what stops the command besides a usage error, `partial`
    what it leaves undone; None where the command has no such outcome.
    """
    rows = [(str(EXIT_OK), ok)]
    if partial is not None:
        rows.append((str(EXIT_PARTIAL), partial))
    rows.append((str(EXIT_FATAL), "usage error" + (f", or {fatal}" if fatal else "")))
    if signals is not None:
        codes = (EXIT_SIGNAL_BASE + signal.SIGINT, EXIT_SIGNAL_BASE + signal.SIGTERM)
        rows.append((", ".join(map(str, codes)), signals))
    lines = ["exit status:"]
    for code, text in rows:
        lines += textwrap.wrap(
            text, width=78, initial_indent=f"  {code}  ", subsequent_indent="     "
        )
    return "\n".join(lines)
