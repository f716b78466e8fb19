"""ciphertextfs: back up fscrypt-encrypted ext4 files without the owner's key."""

__version__ = "0.1.0"

PROG = "ciphertextfs"
"""The command's name, in its messages and its man page."""

# The exit status of every command, with the meanings GNU tar and diff give
# them, and argparse's 2 for a usage error: scripts test one convention.
EXIT_OK = 0
"""Everything done."""
EXIT_PARTIAL = 1
"""Done, except some entries, keys or paths, each reported on stderr."""
EXIT_FATAL = 2
"""Usage error, or a failure that stopped the command before its work."""
EXIT_SIGNAL_BASE = 128
"""Stopped by signal N after cleaning up: EXIT_SIGNAL_BASE + N, as the shell reports it."""
