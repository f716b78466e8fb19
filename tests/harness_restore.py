"""Backups in the view format made from kernel-encrypted ext4, without the view.

The kernel writes the encrypted tree; the backup is then assembled from
what the kernel shows while the key is absent (no-key names, modes, owners,
times, user xattrs, the no-key form of short symlink targets) and from
debugfs (the raw context, the extents of the ciphertext, directory blocks
for the full long names, slow symlink bodies).  The plaintext tree is
captured with a walker while the key is present: the oracle a restore must
reproduce.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

from ciphertextfs.fscrypt.nokey import base64url_decode, base64url_encode, parse_nokey_name
from tests import harness

SIDE = ".fscrypt-longnames"


@dataclass(frozen=True)
class Node:
    kind: str
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    content: str | None  # sha256 of regular files, target of symlinks
    size: int
    xattrs: tuple[tuple[str, bytes], ...]
    rdev: int
    link_group: str  # smallest path of the names of the same inode, "" if alone


def walk(root: Path) -> dict[str, Node]:
    """Everything a restore must reproduce, by path relative to `root`."""
    out: dict[str, Node] = {}
    groups: dict[tuple[int, int], list[str]] = {}
    stats = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            p = Path(dirpath) / name
            rel = os.fsdecode(p.relative_to(root))
            st = stats[rel] = os.lstat(p)
            if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
                groups.setdefault((st.st_dev, st.st_ino), []).append(rel)
    for rel, st in stats.items():
        p = root / rel
        content = None
        if stat.S_ISREG(st.st_mode):
            h = hashlib.sha256()
            with open(p, "rb") as f:
                while b := f.read(1 << 20):
                    h.update(b)
            content = h.hexdigest()
        elif stat.S_ISLNK(st.st_mode):
            content = os.readlink(p)
        xattrs = tuple(
            sorted(
                (n, os.getxattr(p, n, follow_symlinks=False))
                for n in os.listxattr(p, follow_symlinks=False)
            )
        )
        group = groups.get((st.st_dev, st.st_ino))
        out[rel] = Node(
            kind=oct(stat.S_IFMT(st.st_mode)),
            mode=stat.S_IMODE(st.st_mode),
            uid=st.st_uid,
            gid=st.st_gid,
            mtime_ns=st.st_mtime_ns,
            content=content,
            size=st.st_size if not stat.S_ISDIR(st.st_mode) else 0,
            xattrs=xattrs,
            rdev=st.st_rdev,
            link_group=min(group) if group and len(group) > 1 else "",
        )
    return out


def debugfs(image: Path, commands: list[str]) -> str:
    """Run debugfs commands in one process; output with 'debugfs: CMD' separators."""
    cmdfile = image.with_suffix(".debugfs")
    cmdfile.write_text("".join(c + "\n" for c in commands))
    return harness.run("debugfs", "-f", cmdfile, image)


_EXTENT = re.compile(
    r"^\s*(\d+)/\s*(\d+)\s+\d+/\s*\d+\s+(\d+)\s+-\s+(\d+)\s+(\d+)\s+-\s+(\d+)\s+\d+\s*(.*)$"
)


def parse_extents(text: str) -> list[tuple[int, int, int, bool]]:
    """Leaf extents (lblk, pblk, len, uninit) from debugfs `ex` output."""
    out = []
    for line in text.splitlines():
        m = _EXTENT.match(line)
        if m and m.group(1) == m.group(2):
            lblk, lend, pblk = int(m.group(3)), int(m.group(4)), int(m.group(5))
            out.append((lblk, pblk, lend - lblk + 1, "Uninit" in m.group(7)))
    return out


def parse_dirents(data: bytes) -> list[tuple[int, bytes]]:
    """(inode, name) of every live entry in raw linear/htree ext4 directory blocks."""
    out = []
    pos = 0
    while pos + 8 <= len(data):
        ino, rec_len, name_len, _ = struct.unpack_from("<IHBB", data, pos)
        if rec_len < 8:
            break
        if ino:
            out.append((ino, data[pos + 8 : pos + 8 + name_len]))
        pos += rec_len
    return [(i, n) for i, n in out if n not in (b".", b"..")]


def fs_uuid(image: Path) -> bytes:
    out = harness.run("dumpe2fs", "-h", image)
    m = re.search(r"Filesystem UUID:\s+([0-9a-f-]+)", out)
    assert m
    return bytes.fromhex(m.group(1).replace("-", ""))


def make_view_copy(image: Path, locked_root: Path, out: Path, *, block_size: int = 4096) -> Path:
    """Build a view-format copy of the mounted, locked tree `locked_root` in `out`.

    `image` must be the (mounted) filesystem's image: debugfs reads it while
    mounted, so the caller syncs and drops caches first.
    """
    os.sync()
    entries: list[tuple[Path, os.stat_result]] = []
    for dirpath, dirnames, filenames in os.walk(locked_root):
        dirnames.sort()
        for name in sorted([*dirnames, *filenames]):
            p = Path(dirpath) / name
            entries.append((p, os.lstat(p)))
    root_st = os.lstat(locked_root)
    inos = {st.st_ino for _, st in entries} | {root_st.st_ino}
    work = out.parent / (out.name + ".raw")
    work.mkdir(parents=True, exist_ok=True)
    cmds = []
    for ino in sorted(inos):
        cmds += [f"ea_get -f {work}/ctx.{ino} <{ino}> c", f"ex <{ino}>"]
    for _p, st in [(locked_root, root_st), *entries]:
        if stat.S_ISDIR(st.st_mode) or (stat.S_ISLNK(st.st_mode) and st.st_size >= 60):
            cmds.append(f"dump <{st.st_ino}> {work}/raw.{st.st_ino}")
    text = debugfs(image, cmds)
    extents: dict[int, list] = {}
    for chunk in text.split("debugfs: ")[1:]:
        head, _, body = chunk.partition("\n")
        m = re.fullmatch(r"ex <(\d+)>", head.strip())
        if m:
            extents[int(m.group(1))] = parse_extents(body)
    uuid = fs_uuid(image)

    def ctx_of(ino: int) -> bytes | None:
        f = work / f"ctx.{ino}"
        return f.read_bytes() if f.exists() and f.stat().st_size else None

    def needs_ino(ctx: bytes) -> bool:
        return ctx[0] == 2 and bool(ctx[3] & 0x18)

    def fscrypt_xattrs(dst: Path, ino: int, ctx: bytes) -> None:
        os.setxattr(dst, "user.fscrypt.context", ctx)
        if needs_ino(ctx):
            os.setxattr(dst, "user.fscrypt.ino", str(ino).encode())
            os.setxattr(dst, "user.fscrypt.fs_uuid", uuid.hex().encode())

    def meta(src: Path, dst: Path, st: os.stat_result) -> None:
        for n in os.listxattr(src, follow_symlinks=False):
            os.setxattr(dst, n, os.getxattr(src, n, follow_symlinks=False), follow_symlinks=False)
        os.chown(dst, st.st_uid, st.st_gid, follow_symlinks=False)
        if not stat.S_ISLNK(st.st_mode):
            os.chmod(dst, stat.S_IMODE(st.st_mode))

    out.mkdir()
    dirs = [(locked_root, out, root_st)]
    firsts: dict[int, Path] = {}
    rctx = ctx_of(root_st.st_ino)
    if rctx:
        fscrypt_xattrs(out, root_st.st_ino, rctx)
    with open(image, "rb") as img:
        for p, st in entries:
            dst = out / p.relative_to(locked_root)
            ctx = ctx_of(st.st_ino)
            if stat.S_ISDIR(st.st_mode):
                dst.mkdir()
                if ctx:
                    fscrypt_xattrs(dst, st.st_ino, ctx)
                    longs = _side_lines(p, work / f"raw.{st.st_ino}")
                    if longs:
                        (dst / SIDE).write_bytes(longs)
                dirs.append((p, dst, st))
            elif stat.S_ISREG(st.st_mode):
                if st.st_ino in firsts:
                    os.link(firsts[st.st_ino], dst)
                    continue
                firsts[st.st_ino] = dst
                if ctx:
                    keep = -(-st.st_size // 16) * 16
                    with open(dst, "wb") as f:
                        for lblk, pblk, n, uninit in extents.get(st.st_ino, []):
                            if uninit:
                                continue
                            img.seek(pblk * block_size)
                            f.seek(lblk * block_size)
                            f.write(img.read(n * block_size))
                        f.truncate(keep)
                    fscrypt_xattrs(dst, st.st_ino, ctx)
                    os.setxattr(dst, "user.fscrypt.size", str(st.st_size).encode())
                else:
                    with open(p, "rb") as s, open(dst, "wb") as f:
                        f.write(s.read())
            elif stat.S_ISLNK(st.st_mode):
                if ctx:
                    if st.st_size >= 60:
                        body = (work / f"raw.{st.st_ino}").read_bytes()
                        ct = body[2 : 2 + struct.unpack_from("<H", body)[0]]
                    else:
                        nk = parse_nokey_name(os.readlink(p))
                        assert nk.sha256 is None
                        ct = nk.prefix
                    parts = [base64url_encode(ctx), base64url_encode(ct)]
                    if needs_ino(ctx):
                        parts += [str(st.st_ino), uuid.hex()]
                    os.symlink("fscrypt:1:" + ":".join(parts), dst)
                else:
                    os.symlink(os.readlink(p), dst)
            else:
                os.mknod(dst, st.st_mode, st.st_rdev)
            meta(p, dst, st)
            os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
    for src, dst, st in reversed(dirs):
        meta(src, dst, st)
        os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
    return out


def _side_lines(locked_dir: Path, raw_dir: Path) -> bytes:
    """The side file of one encrypted directory: kernel no-key name -> full ciphertext."""
    full_by_ino: dict[int, list[bytes]] = {}
    for ino, name in parse_dirents(raw_dir.read_bytes()):
        full_by_ino.setdefault(ino, []).append(name)
    lines = []
    for name in os.listdir(locked_dir):
        nk = parse_nokey_name(name)
        if nk.sha256 is None:
            continue
        ino = os.lstat(locked_dir / name).st_ino
        full = [f for f in full_by_ino.get(ino, []) if nk.matches(f)]
        assert len(full) == 1, name
        lines.append(f"{name} {base64url_encode(full[0])}\n")
    return "".join(sorted(lines)).encode()


def decode_check(name: str) -> bytes:
    """The ciphertext inside a short no-key name (test helper)."""
    return base64url_decode(name)[8:]
