"""The view model: what each ext4 inode looks like in the ciphertext view."""
