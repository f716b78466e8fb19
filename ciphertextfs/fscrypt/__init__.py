"""fscrypt: contexts, no-key names, key derivation and ciphers."""
