"""What the FUSE adapter may ask of a view, and nothing more.

`View` and `MetadataView` both answer it; `ciphertextfs.fuse` is typed
against it and imports nothing from ext4/, so a view that adds synthetic
inodes must answer every member itself or fail to type-check.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from ciphertextfs.view.model import Attr, Invalidations
    from ciphertextfs.view.names import Entry


@dataclass(frozen=True, slots=True)
class StatfsFigures:
    """The figures statfs reports for a view, as the kernel's ext4 would report them."""

    block_size: int
    blocks: int
    free_blocks: int
    available_blocks: int
    """Free blocks less those reserved for root and for extent tree splits."""
    files: int
    free_files: int
    name_max: int


@runtime_checkable
class ViewProtocol(Protocol):
    """The view as the adapter uses it; inode numbers are the view's (ext4 or synthetic)."""

    root_ino: int
    """The inode number of the view's root directory."""
    cache_timeout: float
    """Seconds the kernel may cache entries and attributes."""
    live: bool
    """The source is a mounted filesystem: its contents may change under the view."""
    watched: bool
    """... and its changes are reported to `apply_changes` (ciphertextfs.live)."""

    def attr(self, ino: int) -> Attr: ...

    def entries(self, dir_ino: int) -> Sequence[Entry]: ...

    def attrs_ahead(self, dir_ino: int, entries: Sequence[Entry]) -> None:
        """The attributes of these entries of `dir_ino` will be asked for next: a hint."""
        ...

    def damage(self, dir_ino: int) -> Sequence[str]: ...

    def lookup(self, dir_ino: int, name: bytes) -> int: ...

    def xattr_names(self, ino: int) -> list[bytes]: ...

    def xattr(self, ino: int, name: bytes) -> bytes: ...

    def readlink(self, ino: int) -> bytes: ...

    def read(self, ino: int, offset: int, length: int) -> bytes: ...

    def small_contents(self, ino: int) -> bytes | None: ...

    def statfs(self) -> StatfsFigures: ...

    def apply_changes(
        self, inodes: set[int], names: dict[int, set[bytes]], everything: bool = False
    ) -> Invalidations: ...
