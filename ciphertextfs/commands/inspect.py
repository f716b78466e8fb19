"""`ciphertextfs inspect`: decode the fscrypt metadata of entries of the view or a backup.

Reads only what a backup keeps: the user.fscrypt.* attributes of files and
directories (and the block size of their directory; a directory's hash
algorithm and seed), the target of encrypted symlinks, and the no-key name of
an entry of an encrypted directory (with its side file for long names and
long symlink targets).  No key is needed.  An
entry of an encrypted directory that has no context of its own is reported
as "context missing": its xattrs were lost on the way into the backup.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import stat
import sys
import uuid
from typing import Any

import xattr

from ciphertextfs import EXIT_OK, EXIT_PARTIAL, PROG
from ciphertextfs.commands import exit_status_help

EPILOG = exit_status_help(
    "every PATH inspected",
    "some PATH could not be read or decoded (each reported on stderr)",
    None,
)


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "inspect",
        help="show the fscrypt metadata of entries of the view or of a backup",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--json", action="store_true", help="one JSON array instead of text")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.set_defaults(run=run)
    return p


def _xattrs(path: str) -> dict[bytes, bytes]:
    try:
        names = xattr.list(path, nofollow=True)
    except OSError:
        return {}
    out = {}
    for n in names:
        if n.startswith(b"user.fscrypt."):
            try:
                out[n] = xattr.get(path, n, nofollow=True)
            except OSError:
                continue
    return out


_KINDS = {
    stat.S_IFDIR: "directory",
    stat.S_IFREG: "regular file",
    stat.S_IFLNK: "symlink",
    stat.S_IFIFO: "fifo",
    stat.S_IFCHR: "character device",
    stat.S_IFBLK: "block device",
    stat.S_IFSOCK: "socket",
}


def _kind(mode: int) -> str:
    return _KINDS.get(stat.S_IFMT(mode), "unknown")


def _side_file(parent: str):
    from ciphertextfs.viewformat import SIDE_FILE_MAX, SIDE_FILE_NAME, decode_side_file

    side_path = os.path.join(parent, os.fsdecode(SIDE_FILE_NAME))
    if not os.path.isfile(side_path):
        return None
    with open(side_path, "rb") as f:
        return decode_side_file(f.read(SIDE_FILE_MAX))


def inspect_path(path: str) -> dict[str, Any]:
    """Everything decodable about one entry, as a JSON-ready dict."""
    from ciphertextfs.fscrypt.errors import FscryptError
    from ciphertextfs.fscrypt.nokey import base64url_encode, parse_nokey_name
    from ciphertextfs.viewformat import (
        DIRHASH_ALGORITHMS,
        SIDE_FILE_NAME,
        SYMLINK_REF_PREFIX,
        XATTR_FSCRYPT_CONTEXT,
        XATTR_FSCRYPT_DIRHASH,
        FormatError,
        decode_dirhash,
        decode_symlink,
        decode_xattrs,
        is_encrypted_symlink_target,
    )

    st = os.lstat(path)
    info: dict[str, Any] = {"path": path, "type": _kind(st.st_mode)}
    problems: list[str] = []
    parent = os.path.dirname(os.path.abspath(path))
    name = os.fsencode(os.path.basename(os.path.abspath(path)))
    parent_encrypted = XATTR_FSCRYPT_CONTEXT in _xattrs(parent)
    side = None
    if parent_encrypted and name != SIDE_FILE_NAME:
        try:
            nk = parse_nokey_name(name)
            n: dict[str, Any] = {
                "dirhash": f"{nk.hash:08x}",
                "minor_hash": f"{nk.minor_hash:08x}",
                "long": nk.sha256 is not None,
            }
            if nk.sha256 is None:
                n["ciphertext_length"] = len(nk.prefix)
            else:
                n["sha256"] = nk.sha256.hex()
                side = _side_file(parent)
                full = side.names.get(name) if side is not None else None
                n["side_file"] = full is not None
                if full is not None:
                    n["ciphertext_length"] = len(full)
                    n["side_file_matches"] = nk.matches(full)
                    n["ciphertext"] = base64url_encode(full)
            info["nokey_name"] = n
        except FscryptError as e:
            problems.append(f"name is not a no-key name: {e}")
    try:
        if stat.S_ISLNK(st.st_mode):
            target = os.readlink(os.fsencode(path))
            if is_encrypted_symlink_target(target):
                if target.startswith(SYMLINK_REF_PREFIX) and side is None:
                    side = _side_file(parent)
                link = decode_symlink(target, side)
                info["context"] = link.context.to_json()
                info["description"] = link.context.describe()
                info["symlink"] = {
                    "ciphertext_length": len(link.ciphertext),
                    "in_side_file": target.startswith(SYMLINK_REF_PREFIX),
                }
                if link.ino is not None:
                    info["ino"] = link.ino
                    info["fs_uuid"] = link.fs_uuid.hex() if link.fs_uuid else None
            else:
                info["symlink"] = {"target": os.fsdecode(target)}
        else:
            own = _xattrs(path)
            if XATTR_FSCRYPT_DIRHASH in own:
                try:
                    version, seed = decode_dirhash(own[XATTR_FSCRYPT_DIRHASH])
                    info["dirhash"] = {
                        "algorithm": DIRHASH_ALGORITHMS[version],
                        "seed": str(uuid.UUID(bytes=seed)),
                    }
                except FormatError as e:
                    problems.append(str(e))
            attrs = decode_xattrs(own, regular=stat.S_ISREG(st.st_mode))
            if attrs.block_size is None and stat.S_ISREG(st.st_mode):
                # Format 2 gives the block size to the directory, not the file.
                attrs = dataclasses.replace(
                    attrs, block_size=decode_xattrs(_xattrs(parent), regular=False).block_size
                )
            if attrs.context is None:
                if parent_encrypted and (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
                    info["context_missing"] = True
                    problems.append(
                        "context missing: no user.fscrypt.context inside an encrypted "
                        "directory (xattrs lost: copied without rsync -X or tar --xattrs?)"
                    )
            else:
                info["context"] = attrs.context.to_json()
                info["description"] = attrs.context.describe()
                if attrs.size is not None:
                    info["size"] = attrs.size
                    info["ciphertext_size"] = st.st_size
                if attrs.ino is not None:
                    info["ino"] = attrs.ino
                if attrs.fs_uuid is not None:
                    info["fs_uuid"] = attrs.fs_uuid.hex()
                if attrs.block_size is not None:
                    info["block_size"] = attrs.block_size
    except (FormatError, FscryptError) as e:
        problems.append(str(e))
    info["encrypted"] = "context" in info
    if problems:
        info["problems"] = problems
    return info


def _text(info: dict[str, Any]) -> str:
    lines = [f"{info['path']}:", f"  type: {info['type']}"]
    if "description" in info:
        lines.append(f"  context: {info['description']}")
    elif info.get("context_missing"):
        lines.append("  context missing")
    else:
        lines.append("  not encrypted" if "problems" not in info else "  context: unreadable")
    if "size" in info:
        lines.append(f"  size: {info['size']} (ciphertext {info['ciphertext_size']} bytes)")
    if "ino" in info:
        lines.append(f"  inode: {info['ino']}, filesystem uuid {info.get('fs_uuid')}")
    n = info.get("nokey_name")
    if n:
        if not n["long"]:
            text = f"{n['ciphertext_length']}-byte ciphertext name"
        elif n["side_file"]:
            ok = "matches" if n["side_file_matches"] else "DOES NOT MATCH"
            text = f"long ({n['ciphertext_length']} bytes), side file entry {ok} its SHA-256"
        else:
            text = "long, NOT in the directory's side file"
        lines.append(f"  name: no-key, dirhash {n['dirhash']}/{n['minor_hash']}, {text}")
    if "dirhash" in info:
        d = info["dirhash"]
        lines.append(f"  directory hash: {d['algorithm']}, seed {d['seed']}")
    s = info.get("symlink")
    if s:
        if "target" in s:
            lines.append(f"  symlink target: {s['target']}")
        else:
            where = ", kept in the directory's side file" if s.get("in_side_file") else ""
            lines.append(
                f"  symlink: encrypted target, {s['ciphertext_length']}-byte ciphertext{where}"
            )
    for p in info.get("problems", []):
        lines.append(f"  problem: {p}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    results = []
    status = EXIT_OK
    for path in args.paths:
        try:
            info = inspect_path(path)
        except OSError as e:
            print(f"{PROG}: {path}: {e.strerror}", file=sys.stderr)
            status = EXIT_PARTIAL
            continue
        if "problems" in info:
            status = EXIT_PARTIAL
        results.append(info)
        if not args.json:
            print(_text(info))
    if args.json:
        json.dump(results, sys.stdout, indent=2)
        print()
    return status
