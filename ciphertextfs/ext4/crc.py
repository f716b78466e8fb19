"""The kernel's crc32c, as ext4 and jbd2 use it for metadata checksums."""

import google_crc32c


def crc32c(seed: int, data: bytes) -> int:
    """Return the kernel's raw crc32c(seed, data): no final inversion.

    google-crc32c works on finished CRCs (inverted before and after), so the
    raw update is the complement of its `extend` on the complemented seed.
    """
    return ~google_crc32c.extend(~seed & 0xFFFFFFFF, bytes(data)) & 0xFFFFFFFF
