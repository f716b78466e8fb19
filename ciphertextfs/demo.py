"""The built-in demo: back up an encrypted directory without its key, then restore it.

It plays the whole story with the real kernel and the real tools, in a
scratch directory: the owner encrypts a directory and locks it, the admin
mounts the view and runs plain `tar --xattrs`, and the owner later restores
the archive with the key.  Every command it runs is printed, so the demo
doubles as a tutorial.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ciphertextfs import EXIT_FATAL, EXIT_OK
from ciphertextfs.fscrypt import kernel

DEMO_FILES = {
    "notes.txt": b"The owner's notes: only the owner's key can read these.\n",
    "photos/holiday.jpg": os.urandom(150_000),
    "photos/a name long enough to make the kernel's no-key name lossy "
    + "x" * 120: b"long names survive the backup too\n",
    "empty": b"",
}


class DemoError(RuntimeError):
    """A step of the demo failed; the message says which."""


def _say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def _run(*argv: str | os.PathLike[str], show: bool = True, check: bool = True) -> str:
    cmd = [os.fspath(a) for a in argv]
    if show:
        print("$ " + shlex.join(cmd), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace")
    if show:
        for text in (proc.stdout, proc.stderr if not check else ""):
            if text:
                print(text, end="" if text.endswith("\n") else "\n", flush=True)
    if check and proc.returncode != 0:
        raise DemoError(f"{shlex.join(cmd)} failed: {proc.stderr.strip()}")
    return proc.stdout


def _ciphertextfs(*args: str | os.PathLike[str], check: bool = True) -> str:
    return _run(sys.executable, "-m", "ciphertextfs", *args, check=check)


@contextlib.contextmanager
def _loop_mount(image: Path, mnt: Path) -> Iterator[None]:
    dev = _run("losetup", "--find", "--show", image, show=False).strip()
    try:
        _run("mount", "-t", "ext4", dev, mnt, show=False)
        try:
            yield
        finally:
            _run("umount", mnt, show=False, check=False)
    finally:
        _run("losetup", "-d", dev, show=False, check=False)


def _write_plaintext(root: Path) -> None:
    for rel, data in DEMO_FILES.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    os.symlink("notes.txt", root / "link-to-notes")


def _check_requirements() -> None:
    if os.geteuid() != 0:
        raise DemoError("the demo needs root (loop devices, mount, fscrypt ioctls)")
    if not Path("/sys/fs/ext4/features/encryption").exists():
        raise DemoError("this kernel's ext4 has no encryption support")
    if not Path("/dev/fuse").exists():
        raise DemoError("no /dev/fuse: FUSE is unavailable")


def run_demo(workdir: Path) -> None:
    image = workdir / "disk.img"
    mnt = workdir / "ext4"
    view = workdir / "view"
    keyfile = workdir / "owner.key"
    original = workdir / "original"
    restored = workdir / "restored"
    archive = workdir / "backup.tar"
    for d in (mnt, view, original):
        d.mkdir()

    _say("The owner makes an ext4 filesystem with encryption and a directory only their key opens")
    with open(image, "wb") as f:
        f.truncate(64 << 20)
    _run("mke2fs", "-q", "-t", "ext4", "-b", "4096", "-O", "encrypt", image)
    key = os.urandom(64)
    keyfile.write_bytes(key)
    keyfile.chmod(0o600)
    _write_plaintext(original)
    with _loop_mount(image, mnt):
        identifier = kernel.add_key(mnt, key)
        vault = mnt / "vault"
        vault.mkdir()
        kernel.set_policy_v2(vault, identifier)
        print(f"(v2 policy, AES-256-XTS + AES-256-CTS, key identifier {identifier.hex()})")
        _write_plaintext(vault)
        os.sync()
        kernel.remove_key(mnt, identifier, all_users=True)
        _say("The owner logs out: the key is gone, and the kernel refuses to open the files")
        _run("ls", "-la", vault)
        some = sorted(p for p in vault.iterdir() if p.is_file())
        if some:
            _run("cat", some[0], check=False)

    _say("The admin mounts the ciphertext view over the disk image and backs it up with plain tar")
    _ciphertextfs("mount", image, view)
    try:
        _run("ls", "-la", view / "vault")
        first = sorted(p for p in (view / "vault").iterdir() if p.is_file())[0]
        _run("getfattr", "-d", "-m", "-", "-e", "hex", first)
        _run("tar", "--xattrs", "--xattrs-include=*", "-cf", archive, "-C", view, ".")
        print(f"backup: {archive} ({archive.stat().st_size} bytes)")
    finally:
        _run("fusermount3", "-u", view, check=False)

    _say("Disaster, then recovery: the owner restores the archive anywhere, with the key")
    _ciphertextfs("decrypt", "--key", keyfile, archive, restored)
    _run("ls", "-la", restored / "vault")
    if _snapshot(original) != _snapshot(restored / "vault"):
        raise DemoError("the restored tree differs from the original")
    _say("The restored tree equals the original, byte for byte")


def _snapshot(root: Path) -> dict[str, tuple[str, bytes]]:
    """Every entry below root: its type and its content or link target."""
    out: dict[str, tuple[str, bytes]] = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(dirpath) / name
            rel = os.fspath(path.relative_to(root))
            if path.is_symlink():
                out[rel] = ("link", os.fsencode(os.readlink(path)))
            elif path.is_dir():
                out[rel] = ("dir", b"")
            else:
                out[rel] = ("file", path.read_bytes())
    return out


def main(keep: Path | None = None) -> int:
    try:
        _check_requirements()
        if keep is not None:
            keep.mkdir(parents=True, exist_ok=True)
            run_demo(Path(tempfile.mkdtemp(prefix="ciphertextfs-demo-", dir=keep)))
        else:
            with tempfile.TemporaryDirectory(prefix="ciphertextfs-demo-") as d:
                run_demo(Path(d))
    except DemoError as e:
        print(f"ciphertextfs: demo failed: {e}", file=sys.stderr)
        return EXIT_FATAL
    return EXIT_OK
