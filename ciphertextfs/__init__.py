"""ciphertextfs: back up fscrypt-encrypted ext4 files without the owner's key."""

__version__ = "0.1.0"
