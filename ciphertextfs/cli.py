"""The `ciphertextfs` command: one subcommand per module in ciphertextfs.commands.

Each command module provides `register(subparsers)`, which adds its parser
and sets `run` as the parser's default; `run(args)` returns the exit code or
raises `CommandError`.  Adding a command means adding its name to COMMANDS.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
from collections.abc import Sequence

from ciphertextfs import EXIT_SIGNAL_BASE, PROG, __version__
from ciphertextfs.commands import CommandError
from ciphertextfs.commands.mount import helper_argv

COMMANDS = ("mount", "decrypt", "restore_image", "keys", "inspect", "demo")
#: What each command is called on the command line: its module name, with "-" for "_".
COMMAND_NAMES = tuple(name.replace("_", "-") for name in COMMANDS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Back up fscrypt-encrypted ext4 files without the owner's key: a read-only "
            "view of the ciphertext, and the restore that decrypts a backup of it."
        ),
        epilog=f"Run '{PROG} COMMAND --help' for the options of each command.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"ciphertextfs.commands.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(helper_argv(sys.argv[1:] if argv is None else argv, COMMAND_NAMES))
    try:
        return int(args.run(args) or 0)
    except CommandError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return EXIT_SIGNAL_BASE + signal.SIGINT


if __name__ == "__main__":
    sys.exit(main())
