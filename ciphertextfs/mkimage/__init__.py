"""Keyless restore: a backup of the view written, still encrypted, into a new ext4.

`plan` turns the backup's entries into a tree of inodes (checked entry by
entry, nothing written), `libext2fs` binds the few e2fsprogs calls that own
allocation and the bitmaps, group descriptors and superblock of the new
filesystem, and `writer` makes the filesystem with mke2fs and fills it,
encoding every structure with the reader's own on-disk definitions.
"""
