"""The ext4 on-disk format, read directly from a block device or an image."""
