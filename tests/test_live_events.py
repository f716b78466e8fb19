"""The fanotify event parser on crafted buffers: what the kernel sends, and damage.

A buffer that does not parse to its end means events were lost, which the
caller must treat as an overflow (forget everything), never as no change.
"""

from __future__ import annotations

import struct

import pytest

from ciphertextfs import live
from ciphertextfs.live import (
    FAN_ATTRIB,
    FAN_CREATE,
    FAN_DELETE_SELF,
    FAN_EVENT_INFO_TYPE_DFID_NAME,
    FAN_EVENT_INFO_TYPE_FID,
    FAN_EVENT_INFO_TYPE_NEW_DFID_NAME,
    FAN_EVENT_INFO_TYPE_OLD_DFID_NAME,
    FAN_MODIFY,
    FAN_MOVED_FROM,
    FAN_ONDIR,
    FAN_Q_OVERFLOW,
    FAN_RENAME,
    FILEID_INO32_GEN,
    BadEvents,
    fold,
    parse_events,
)


def fid(info_type: int, ino: int, name: bytes | None = None, htype: int = FILEID_INO32_GEN):
    handle = struct.pack("<II", ino, 7)
    body = struct.pack("<iiIi", 0x1234, 0x5678, len(handle), htype) + handle
    if name is not None:
        body += name + b"\0"
    body += bytes(-(len(body) + 4) % 4)
    return struct.pack("<BBH", info_type, 0, 4 + len(body)) + body


def event(mask: int, *infos: bytes, vers: int = 3, fd: int = -1) -> bytes:
    rest = b"".join(infos)
    return struct.pack("<IBBHQii", 24 + len(rest), vers, 0, 24, mask, fd, 4321) + rest


def test_dirent_event_with_target():
    buf = event(
        FAN_CREATE,
        fid(FAN_EVENT_INFO_TYPE_DFID_NAME, 12, b"new"),
        fid(FAN_EVENT_INFO_TYPE_FID, 13),
    ) + event(FAN_MODIFY, fid(FAN_EVENT_INFO_TYPE_DFID_NAME, 12, b"new"), fid(1, 13))
    (create, modify) = parse_events(buf)
    assert create.mask == FAN_CREATE and create.ino == 13 and create.names == ((12, b"new"),)
    changes = fold([create, modify])
    assert changes.inodes == {12, 13}
    assert changes.names == {12: {b"new"}}
    assert not changes.everything


def test_event_on_child_does_not_touch_the_listing():
    (ev,) = parse_events(event(FAN_ATTRIB, fid(2, 12, b"f"), fid(1, 13)))
    changes = fold([ev])
    assert changes.inodes == {13}
    assert changes.names == {}


def test_directory_self_event_reports_dot():
    (ev,) = parse_events(event(FAN_DELETE_SELF | FAN_ONDIR, fid(2, 12, b".")))
    changes = fold([ev])
    assert changes.inodes == {12} and changes.names == {} and not changes.everything


def test_rename_event_names_both_sides():
    (ev,) = parse_events(
        event(
            FAN_RENAME,
            fid(FAN_EVENT_INFO_TYPE_OLD_DFID_NAME, 12, b"old"),
            fid(FAN_EVENT_INFO_TYPE_NEW_DFID_NAME, 14, b"new"),
            fid(FAN_EVENT_INFO_TYPE_FID, 13),
        )
    )
    changes = fold([ev])
    assert changes.names == {12: {b"old"}, 14: {b"new"}}
    assert changes.inodes == {12, 13, 14}


def test_moved_from_names_the_directory():
    (ev,) = parse_events(event(FAN_MOVED_FROM, fid(2, 12, b"x"), fid(1, 13)))
    assert fold([ev]).names == {12: {b"x"}}


def test_overflow_forgets_everything():
    changes = fold(parse_events(event(FAN_Q_OVERFLOW)))
    assert changes.everything


def test_event_naming_nothing_forgets_everything():
    assert fold(parse_events(event(FAN_MODIFY))).everything


def test_named_child_without_identifier_forgets_everything():
    assert fold(parse_events(event(FAN_MODIFY, fid(2, 12, b"f")))).everything


def test_64_bit_handle():
    handle = struct.pack("<QI", 1 << 40, 3)
    body = struct.pack("<iiIi", 0, 0, len(handle), live.FILEID_INO64_GEN) + handle
    rec = struct.pack("<BBH", 1, 0, 4 + len(body)) + body
    (ev,) = parse_events(event(FAN_MODIFY, rec))
    assert ev.ino == 1 << 40


GOOD = event(FAN_CREATE, fid(2, 12, b"name"), fid(1, 13))


@pytest.mark.parametrize(
    "buf",
    [
        GOOD[:10],  # metadata truncated
        GOOD[:-1],  # event runs past the buffer
        GOOD + GOOD[:30],  # a second event truncated
        event(FAN_MODIFY, fid(1, 13), vers=2),  # unknown metadata version
        struct.pack("<IBBHQii", 20, 3, 0, 24, FAN_MODIFY, -1, 0),  # event_len < metadata_len
        struct.pack("<IBBHQii", 24, 3, 0, 16, FAN_MODIFY, -1, 0),  # metadata_len too short
        struct.pack("<IBBHQii", 0, 3, 0, 24, FAN_MODIFY, -1, 0),  # zero length: no progress
        event(FAN_MODIFY, b"\x01\x00"),  # info header truncated
        event(FAN_MODIFY, struct.pack("<BBH", 1, 0, 2)),  # info length below its header
        event(FAN_MODIFY, struct.pack("<BBH", 1, 0, 64)),  # info length past the event
        event(FAN_MODIFY, struct.pack("<BBHii", 1, 0, 12, 0, 0)),  # fid shorter than fixed part
        event(FAN_MODIFY, fid(1, 13)[:4] + fid(1, 13)[4:12] + struct.pack("<Ii", 99, 1) + bytes(8)),
        event(FAN_MODIFY, fid(1, 13, htype=0x4D)),  # a handle type that is not an inode
        event(FAN_CREATE, fid(2, 12, b"")),  # empty name
    ],
)
def test_damaged_buffers_raise(buf):
    with pytest.raises(BadEvents):
        parse_events(buf)


def test_unterminated_name():
    rec = bytearray(fid(2, 12, b"abc"))
    rec[-4:] = b"defg"  # the terminator and padding overwritten
    with pytest.raises(BadEvents):
        parse_events(event(FAN_CREATE, bytes(rec)))


def test_names_end_at_their_record():
    """A name is read up to its NUL inside its own record, not past it."""
    (ev,) = parse_events(event(FAN_CREATE, fid(2, 12, b"abc"), fid(1, 13)))
    assert ev.names == ((12, b"abc"),)


def test_info_record_past_its_event_into_the_next():
    """A record whose length reaches into the next event is damage, not a longer record."""
    rec = bytearray(fid(1, 13))
    struct.pack_into("<H", rec, 2, len(rec) + 24)
    with pytest.raises(BadEvents):
        parse_events(event(FAN_MODIFY, bytes(rec)) + GOOD)
