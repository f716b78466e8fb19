"""Subcommands of the `ciphertextfs` command line; see ciphertextfs.cli."""

PROG = "ciphertextfs"


class CommandError(Exception):
    """A failure reported as one line `ciphertextfs: error: MESSAGE`."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code
