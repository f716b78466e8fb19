"""Restore: decrypt a backup of the view (a directory tree or a tar archive)."""

DEFAULT_BLOCK_SIZE = 4096
"""The original filesystem's block size where a backup does not record it (view
format 1, or outside every encrypted directory): ext4's default.  Here rather
than in a submodule so that the command line's --help needs no cipher imports."""
