"""Restore: decrypt a backup of the view (a directory tree or a tar archive)."""
