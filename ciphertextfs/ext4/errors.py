"""Errors of the ext4 layer.

A damaged object must cost that object only: the reader raises
`CorruptError` for it and the caller (the view) answers EIO, while every
other object stays reachable.
"""


class Ext4Error(Exception):
    """Base class of every error the ext4 layer raises on bad input."""


class CorruptError(Ext4Error):
    """One on-disk object (inode, directory, extent tree, xattr) is damaged."""


class NotExt4Error(Ext4Error):
    """The source holds no usable ext4 superblock."""
