"""ACL text (acl(5), as bsdtar archives it) to the kernel's binary xattr form.

Oracles: GNU tar writes each ACL twice, as SCHILY.acl.* text and as the
binary SCHILY.xattr.system.posix_acl_* value the kernel gave it; and the
kernel accepts the converted value on a real file, giving back the same
ACL through getfacl.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from ciphertextfs import posix_acl
from ciphertextfs.restore.tarstream import parse_pax, pax_xattrs
from tests import harness


def _acl_tree(root: Path) -> list[Path]:
    root.mkdir()
    f = root / "f"
    f.write_bytes(b"x")
    d = root / "d"
    d.mkdir()
    harness.run("setfacl", "-m", "u:1001:r-x,u:1003:rw-,g:1002:rw-,m::rwx", f)
    harness.run("setfacl", "-d", "-m", "u:1001:r-x,g:1004:r--", d)
    harness.run("setfacl", "-m", "u:1001:rwx", d)
    return [f, d]


def _pax_headers(archive: Path) -> list[dict[bytes, bytes]]:
    """Every pax extended header of an uncompressed archive, in order."""
    data = archive.read_bytes()
    out = []
    pos = 0
    while pos + 512 <= len(data):
        header = data[pos : pos + 512]
        if not header.strip(b"\0"):
            break
        size = int(header[124:136].strip(b"\0 ") or b"0", 8)
        body = data[pos + 512 : pos + 512 + size]
        if header[156:157] == b"x":
            out.append(parse_pax(body))
        pos += 512 + -(-size // 512) * 512
    return out


def test_text_form_matches_the_binary_form_gnu_tar_stores(tmp_path: Path) -> None:
    _acl_tree(tmp_path / "t")
    archive = tmp_path / "a.tar"
    harness.run(
        "tar", "--acls", "--xattrs", "--xattrs-include=*", "-cf", archive, "-C", tmp_path, "t"
    )
    compared = 0
    for pax in _pax_headers(archive):
        for kind in (b"access", b"default"):
            text = pax.get(b"SCHILY.acl." + kind)
            binary = pax.get(b"SCHILY.xattr.system.posix_acl_" + kind)
            if text is not None and binary is not None:
                assert posix_acl.from_text(text) == binary, text
                compared += 1
    assert compared >= 3


def test_bsdtar_acls_reach_the_xattrs_and_the_kernel_takes_them(tmp_path: Path) -> None:
    paths = _acl_tree(tmp_path / "t")
    archive = tmp_path / "b.tar"
    harness.run("bsdtar", "--format", "pax", "--acls", "-cf", archive, "-C", tmp_path, "t")
    headers = _pax_headers(archive)
    assert not any(k.startswith(b"SCHILY.xattr.system.posix_acl") for h in headers for k in h)
    got = [pax_xattrs(h) for h in headers if b"SCHILY.acl.access" in h]
    by_value = {v for x in got for v in x.values()}
    for p in paths:
        for name in ("system.posix_acl_access", "system.posix_acl_default"):
            try:
                want = os.getxattr(p, name)
            except OSError:
                continue
            assert want in by_value, (p, name)
    # The kernel accepts each converted value and shows the same ACL again.
    probe = tmp_path / "probe"
    probe.write_bytes(b"")
    value = next(
        x[b"system.posix_acl_access"] for x in got if len(x[b"system.posix_acl_access"]) > 28
    )
    os.setxattr(probe, "system.posix_acl_access", value)
    show = subprocess.run(["getfacl", "-cn", probe], capture_output=True, text=True, check=True)
    assert "user:1001:r-x" in show.stdout and "group:1002:rw-" in show.stdout


@pytest.mark.parametrize(
    "text",
    [
        b"user::rw-,group::r--",  # no other
        b"user::rw-,user:1001:r--,group::r--,other::r--",  # named entry without a mask
        b"user::rw-,user:alice:r--,group::r--,mask::r--,other::r--",  # a name, no id
        b"user::rwz,group::r--,other::r--",
        b"user::rw-,user::r--,group::r--,other::r--",
        b"mask:x:rw-,user::rw-,group::r--,other::r--",
        b"user::rw-,group::r--,other::r--,user:1001:r--:1001,user:1001:rw-,mask::rw-",
        b"bogus",
    ],
)
def test_bad_text_is_refused(text: bytes) -> None:
    with pytest.raises(posix_acl.AclError):
        posix_acl.from_text(text)


def test_named_qualifier_uses_the_numeric_id_libarchive_appends() -> None:
    value = posix_acl.from_text(b"user::rw-,user:alice:r-x:1001,group::r--,mask::r-x,other::---")
    assert value == posix_acl.from_text(b"u::rw-,u:1001:r-x,g::r--,m::r-x,o::---")


def test_minimal_access_acl_is_only_the_mode() -> None:
    """GNU tar writes SCHILY.acl.access for a directory with only a default ACL."""
    pax = {
        b"SCHILY.acl.access": b"user::rwx,group::r-x,other::r-x",
        b"SCHILY.acl.default": b"user::rwx,group::r-x,other::r-x",
    }
    got = pax_xattrs(pax)
    assert b"system.posix_acl_access" not in got
    assert posix_acl.is_minimal(got[b"system.posix_acl_default"])
