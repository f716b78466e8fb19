"""Restoring with what fscrypt users hold, against the real `fscrypt` tool.

The world: a "root" ext4 image (FSCRYPT_ROOT_MNT, where login protectors
live) and a data image set up by `fscrypt setup`; under data/home one
directory per protector type fscrypt writes (custom passphrase, raw key,
login passphrase with its recovery passphrase, a policy with two
protectors, a v1 policy), each holding files, a long name, symlinks and a
hard link.  fscrypt locks them; backups are made through the view rooted
at the filesystem root and at home/, with tar and rsync; the plaintext
walked before locking is the oracle for every restore.
"""

from __future__ import annotations

import contextlib
import json
import os
import pty
import re
import select
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ciphertextfs.fscrypt import kernel
from tests import harness, trees
from tests.harness_restore import walk
from tests.harness_view import CLI, daemon_pids, run_cli, stop_view

TAR = ("tar", "--xattrs", "--xattrs-include=*", "--acls")
PASS = {"cust": b"pass one", "first": b"first pass", "second": b"second pass", "v1": b"v1 pass"}
LOGIN_PW = "Login-pw-7"


@dataclass
class World:
    base: Path
    data: Path  # the mounted data filesystem (locked)
    root_meta: Path  # a copy of the root filesystem's .fscrypt
    env: dict[str, str]
    plain: dict  # walk() of data/home while unlocked
    keys: dict[str, tuple[int, str]]  # dir -> (policy version, key descriptor hex)
    raw_key: Path
    recovery: bytes
    secrets: dict[str, Path] = field(default_factory=dict)
    backups: dict[str, Path] = field(default_factory=dict)
    mount_stderr: dict[str, str] = field(default_factory=dict)


def fscrypt(env: dict[str, str], *args: str | os.PathLike[str], stdin: bytes = b"") -> str:
    proc = subprocess.run(
        ["fscrypt", *map(os.fspath, args)], input=stdin, env=env, capture_output=True, timeout=60
    )
    if proc.returncode != 0:
        raise RuntimeError(f"fscrypt {args}: {proc.stderr.decode()} {proc.stdout.decode()}")
    return proc.stdout.decode()


def set_conf(path: Path, **options: str) -> None:
    conf = json.loads(path.read_text())
    conf["options"].update(options)
    conf["use_fs_keyring_for_v1_policies"] = True
    path.write_text(json.dumps(conf))


def fill(d: Path) -> None:
    """Files, a long name, symlinks (short and long targets), a hard link, a subdirectory."""
    (d / "a.txt").write_bytes(b"alpha\n" * 10)
    (d / "big.bin").write_bytes(os.urandom(70000))
    (d / "empty").write_bytes(b"")
    (d / ("L" * 200)).write_bytes(b"long name\n")
    (d / "sub").mkdir()
    (d / "sub" / "f").write_bytes(b"in sub\n")
    os.symlink("a.txt", d / "s")
    os.symlink("t" * 300, d / "slong")
    os.link(d / "a.txt", d / "hl")
    os.chmod(d / "a.txt", 0o640)


@contextlib.contextmanager
def throwaway_user():
    name = f"ctfs-protect-{os.getpid() % 100000}"
    subprocess.run(["userdel", name], capture_output=True)
    harness.run("useradd", "-M", "-s", "/usr/sbin/nologin", name)
    try:
        harness.run("chpasswd", input=f"{name}:{LOGIN_PW}\n".encode())
        yield name
    finally:
        subprocess.run(["userdel", "-f", name], capture_output=True)


@contextlib.contextmanager
def view(source: Path, mnt: Path, *extra: str):
    """`ciphertextfs mount [EXTRA] SOURCE MNT`; yields its stderr."""
    mnt.mkdir(parents=True, exist_ok=True)
    proc = run_cli("mount", *extra, source, mnt)
    try:
        if proc.returncode != 0:
            raise RuntimeError(f"mount failed: {proc.stderr}")
        yield proc.stderr
    finally:
        pids = daemon_pids(mnt)
        stop_view(mnt, pids[0] if pids else None)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    harness.require_fuse()
    if shutil.which("fscrypt") is None:
        raise harness.KernelUnavailable("the fscrypt tool is not installed (.ci/install)")
    base = tmp_path_factory.mktemp("protect")
    root_img = harness.mkfs(base / "root.img", size_mb=16, features=())
    data_img = harness.mkfs(base / "data.img", size_mb=64, features=("encrypt",))
    with contextlib.ExitStack() as stack:
        _d, root = stack.enter_context(harness.mounted(root_img, base / "root"))
        _d, data = stack.enter_context(harness.mounted(data_img, base / "data"))
        user = stack.enter_context(throwaway_user())
        conf = base / "fscrypt.conf"
        env = {**os.environ, "FSCRYPT_CONF": os.fspath(conf), "FSCRYPT_ROOT_MNT": os.fspath(root)}
        fscrypt(env, "setup", "--time=1ms", "--quiet", "--force")
        set_conf(conf, policy_version="2")
        fscrypt(env, "setup", data, "--quiet", "--force")
        home = data / "home"
        home.mkdir()
        (home / "plain.txt").write_bytes(b"not encrypted\n")
        for name in ("cust", "raw", "login", "two", "v1"):
            (home / name).mkdir()
        raw_key = base / "raw.key"
        raw_key.write_bytes(os.urandom(32))
        q = "--quiet"
        fscrypt(
            env,
            "encrypt",
            home / "cust",
            "--source=custom_passphrase",
            "--name=mypass",
            q,
            stdin=PASS["cust"],
        )
        fscrypt(
            env, "encrypt", home / "raw", "--source=raw_key", "--name=rawp", f"--key={raw_key}", q
        )
        fscrypt(
            env,
            "encrypt",
            home / "login",
            "--source=pam_passphrase",
            f"--user={user}",
            q,
            stdin=LOGIN_PW.encode(),
        )
        fscrypt(
            env,
            "encrypt",
            home / "two",
            "--source=custom_passphrase",
            "--name=first",
            q,
            stdin=PASS["first"],
        )
        fscrypt(
            env,
            "metadata",
            "create",
            "protector",
            data,
            "--source=custom_passphrase",
            "--name=second",
            q,
            stdin=PASS["second"],
        )
        pol_two = kernel.get_policy(home / "two").key_spec.hex()
        status = fscrypt(env, "status", data)
        second_desc = re.search(r"^([0-9a-f]{16})\s+No\s+custom protector \"second\"", status, re.M)
        assert second_desc, status
        fscrypt(
            env,
            "metadata",
            "add-protector-to-policy",
            f"--protector={data}:{second_desc.group(1)}",
            f"--policy={data}:{pol_two}",
            f"--unlock-with={data}:{first_protector(env, data)}",
            q,
            stdin=PASS["second"] + b"\n" + PASS["first"] + b"\n",
        )
        set_conf(conf, policy_version="1")
        fscrypt(
            env,
            "encrypt",
            home / "v1",
            "--source=custom_passphrase",
            "--name=v1p",
            q,
            stdin=PASS["v1"],
        )
        for name in ("cust", "raw", "login", "two", "v1"):
            fill(home / name)
        readme = (home / "login" / "fscrypt_recovery_readme.txt").read_text()
        recovery = re.search(r"^\s+([a-z]{20})\s*$", readme, re.M)
        assert recovery, readme
        keys = {}
        for name in ("cust", "raw", "login", "two", "v1"):
            pol = kernel.get_policy(home / name)
            keys[name] = (1 if pol.version == 0 else 2, pol.key_spec.hex())
        assert keys["v1"][0] == 1 and keys["cust"][0] == 2
        trees.stamp_mtimes(data)
        os.sync()
        plain = walk(home)
        for name in ("cust", "raw", "login", "two", "v1"):
            fscrypt(env, "lock", home / name, "--all-users", q)
        harness.drop_caches()
        for name in ("cust", "raw", "login", "two", "v1"):
            assert "a.txt" not in os.listdir(home / name), f"{name} still unlocked"
        root_meta = base / "rootmeta"
        shutil.copytree(root / ".fscrypt", root_meta, symlinks=True)
        w = World(base, data, root_meta, env, plain, keys, raw_key, recovery.group(1).encode())
        for k, v in {
            **PASS,
            "login": LOGIN_PW.encode(),
            "recovery": w.recovery,
            "wrong": b"not it",
        }.items():
            p = base / f"{k}.pass"
            p.write_bytes(v + b"\n")
            w.secrets[k] = p
        # The backups, made now: a later test changes a passphrase.
        with view(data, base / "v-root"):
            w.backups["root.tar"] = base / "root.tar"
            harness.run(*TAR, "-C", base / "v-root", "-cf", base / "root.tar", ".")
        with view(data, base / "v-root2", f"--fscrypt-linked={root_meta}") as err:
            w.mount_stderr["root-linked"] = err
            harness.run("rsync", "-aHAX", f"{base / 'v-root2'}/", f"{base / 'root-rsync'}/")
            w.backups["root-rsync"] = base / "root-rsync"
        with view(home, base / "v-sub", f"--fscrypt-linked={root_meta}") as err:
            w.mount_stderr["sub-linked"] = err
            harness.run("rsync", "-aHAX", f"{base / 'v-sub'}/", f"{base / 'sub-rsync'}/")
            w.backups["sub-rsync"] = base / "sub-rsync"
        with view(home, base / "v-sub2") as err:
            w.mount_stderr["sub"] = err
            harness.run(*TAR, "-C", base / "v-sub2", "-cf", base / "sub.tar", ".")
            w.backups["sub.tar"] = base / "sub.tar"
        yield w


def first_protector(env: dict[str, str], data: Path) -> str:
    status = fscrypt(env, "status", data)
    m = re.search(r"^([0-9a-f]{16})\s+No\s+custom protector \"first\"", status, re.M)
    assert m, status
    return m.group(1)


def decrypt(w: World, source: Path, dest: Path | None, *args: str | os.PathLike[str]):
    argv = ["decrypt", *map(os.fspath, args), source]
    if dest is None:
        argv.insert(1, "--verify")
    else:
        argv.append(dest)
    return run_cli(*argv, timeout=120)


def restored(dest: Path) -> dict:
    return walk(dest)


def test_root_view_tar_every_protector_type(world: World, tmp_path: Path) -> None:
    """One restore with every secret: each key opened by the protector it was given for."""
    s = world.secrets
    dest = tmp_path / "out"
    proc = decrypt(
        world,
        world.backups["root.tar"],
        dest,
        "--passphrase-file",
        s["cust"],
        "--passphrase-file",
        s["second"],
        "--passphrase-file",
        s["v1"],
        "--passphrase-file",
        s["login"],
        "--protector-key",
        world.raw_key,
        "--fscrypt-metadata",
        world.root_meta,
    )
    assert proc.returncode == 0, proc.stderr
    assert restored(dest / "home") == world.plain
    err = proc.stderr
    assert (
        f'v2 key identifier {world.keys["cust"][1]}: opened with custom protector "mypass"' in err
    )
    assert f'v2 key identifier {world.keys["two"][1]}: opened with custom protector "second"' in err
    assert f'v2 key identifier {world.keys["raw"][1]}: opened with raw key protector "rawp"' in err
    assert f'v1 key descriptor {world.keys["v1"][1]}: opened with custom protector "v1p"' in err
    assert f"v2 key identifier {world.keys['login'][1]}: opened with login protector of uid" in err


def test_sub_view_rsync_login_passphrase_from_the_view_alone(world: World, tmp_path: Path) -> None:
    """A view of home/ with --fscrypt-linked carries the login protector: no other metadata."""
    src = world.backups["sub-rsync"]
    meta = src / ".ciphertextfs-fscrypt"
    assert sorted(os.listdir(meta)) == ["linked", "policies", "protectors"]
    for sub in ("policies", "protectors", "linked"):
        for name in os.listdir(meta / sub):
            st = os.lstat(meta / sub / name)
            assert st.st_mode & 0o077 == 0, (sub, name, oct(st.st_mode))
    assert "lives on another filesystem" not in world.mount_stderr["sub-linked"]
    dest = tmp_path / "out"
    proc = decrypt(world, src, dest, "--passphrase-file", world.secrets["login"])
    assert proc.returncode == 1, proc.stderr
    assert "login protector of uid" in proc.stderr
    got = restored(dest)
    want = {k: v for k, v in world.plain.items() if k == "login" or k.startswith("login/")}
    assert {k: v for k, v in got.items() if k in want} == want
    assert ".ciphertextfs-fscrypt" not in os.listdir(dest)
    assert "missing key:" in proc.stderr and "ciphertextfs keys SOURCE" in proc.stderr


def test_root_view_with_linked_protectors(world: World, tmp_path: Path) -> None:
    """At the filesystem root the entry holds only the linked protectors."""
    src = world.backups["root-rsync"]
    assert os.listdir(src / ".ciphertextfs-fscrypt") == ["linked"]
    assert "lives on another filesystem" not in world.mount_stderr["root-linked"]
    dest = tmp_path / "out"
    proc = decrypt(world, src, dest, "--passphrase-file", world.secrets["login"])
    assert "opened with login protector of uid" in proc.stderr, proc.stderr
    got = restored(dest / "home")
    want = {k: v for k, v in world.plain.items() if k == "login" or k.startswith("login/")}
    assert {k: v for k, v in got.items() if k in want} == want


def test_sub_view_without_linked_warns_and_recovery_passphrase_works(
    world: World, tmp_path: Path
) -> None:
    err = world.mount_stderr["sub"]
    assert "lives on another filesystem" in err and "--fscrypt-linked" in err, err
    src = world.backups["sub.tar"]
    proc = decrypt(world, src, None, "--passphrase-file", world.secrets["login"])
    assert proc.returncode == 1
    assert "is a link to another filesystem" in proc.stderr, proc.stderr
    dest = tmp_path / "out"
    proc = decrypt(
        world,
        src,
        dest,
        "--passphrase-file",
        world.secrets["recovery"],
        "--passphrase-file",
        world.secrets["first"],
    )
    assert 'opened with custom protector "Recovery passphrase for login"' in proc.stderr
    assert 'opened with custom protector "first"' in proc.stderr
    got = restored(dest)
    for d in ("login", "two"):
        want = {k: v for k, v in world.plain.items() if k == d or k.startswith(d + "/")}
        assert {k: v for k, v in got.items() if k in want} == want
    # Adding the root filesystem's metadata at restore time serves the login passphrase too.
    proc = decrypt(
        world,
        src,
        None,
        "--passphrase-file",
        world.secrets["login"],
        "--fscrypt-metadata",
        world.root_meta,
    )
    assert "opened with login protector of uid" in proc.stderr, proc.stderr
    # ... or a tar backup of it.
    meta_tar = tmp_path / "rootmeta.tar"
    harness.run("tar", "-C", world.root_meta, "-cf", meta_tar, ".")
    proc = decrypt(
        world,
        src,
        None,
        "--passphrase-file",
        world.secrets["login"],
        "--fscrypt-metadata",
        meta_tar,
    )
    assert "opened with login protector of uid" in proc.stderr, proc.stderr


def test_keys_command(world: World) -> None:
    proc = run_cli("keys", "--json", world.backups["sub.tar"])
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    by_spec = {k["key_spec"]: k for k in doc["keys"]}
    assert set(by_spec) == {spec for _v, spec in world.keys.values()}
    login = by_spec[world.keys["login"][1]]
    assert login["policy_version"] == 2 and login["entries"] >= 10
    kinds = {(p["available"], p.get("type")) for p in login["protectors"]}
    assert (True, "custom_passphrase") in kinds and (False, None) in kinds
    assert any(
        "link to another filesystem" in p.get("reason", "") or "only a .link" in p.get("reason", "")
        for p in login["protectors"]
    )
    assert by_spec[world.keys["v1"][1]]["policy_version"] == 1
    assert {p["name"] for p in by_spec[world.keys["two"][1]]["protectors"]} == {"first", "second"}
    assert by_spec[world.keys["raw"][1]]["protectors"][0]["type"] == "raw_key"
    text = run_cli("keys", world.backups["root.tar"], "--fscrypt-metadata", world.root_meta)
    assert text.returncode == 0, text.stdout + text.stderr
    assert "login protector of uid" in text.stdout


def test_wrong_passphrase_reported_rest_restored(world: World, tmp_path: Path) -> None:
    dest = tmp_path / "out"
    proc = decrypt(
        world,
        world.backups["root.tar"],
        dest,
        "--passphrase-file",
        world.secrets["wrong"],
        "--protector-key",
        world.raw_key,
    )
    assert proc.returncode == 1
    assert re.search(
        r'custom protector "mypass" .*wrong passphrase \(the HMAC check failed\)', proc.stderr
    ), proc.stderr
    got = restored(dest / "home")
    want = {k: v for k, v in world.plain.items() if k == "raw" or k.startswith("raw/")}
    assert {k: v for k, v in got.items() if k in want} == want
    assert got["plain.txt"] == world.plain["plain.txt"]


def test_missing_and_tampered_metadata(world: World, tmp_path: Path) -> None:
    src = tmp_path / "copy"
    shutil.copytree(world.backups["sub-rsync"], src, symlinks=True)
    meta = src / ".ciphertextfs-fscrypt"
    from ciphertextfs.fscrypt.protector import parse_policy

    cust_pol = meta / "policies" / world.keys["cust"][1]
    (desc,) = [w.protector_descriptor for w in parse_policy(cust_pol.read_bytes()).wrapped_keys]
    (meta / "protectors" / desc).unlink()
    v1_pol = meta / "policies" / world.keys["v1"][1]
    data = bytearray(v1_pol.read_bytes())
    pol = parse_policy(bytes(data))
    enc = pol.wrapped_keys[0].wrapped_key.encrypted_key
    i = bytes(data).index(enc)
    data[i + 5] ^= 1
    v1_pol.write_bytes(bytes(data))
    proc = decrypt(
        world,
        src,
        None,
        "--passphrase-file",
        world.secrets["cust"],
        "--passphrase-file",
        world.secrets["v1"],
    )
    assert proc.returncode == 1
    assert f"protector {desc}: its file is missing from the backup" in proc.stderr, proc.stderr
    assert "fails its HMAC check with the right protector key (tampered metadata)" in proc.stderr


def test_ask_passphrase_on_a_terminal(world: World, tmp_path: Path) -> None:
    pid, fd = pty.fork()
    if pid == 0:
        os.execv(
            CLI[0],
            [*CLI, "decrypt", "--verify", "--ask-passphrase", os.fspath(world.backups["root.tar"])],
        )
    out = b""
    answered = set()
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            r, _, _ = select.select([fd], [], [], 1)
            if not r:
                continue
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
            for m in re.finditer(rb"Enter (login )?passphrase for ([^\r\n]*?): ", out):
                if m.start() in answered:
                    continue
                answered.add(m.start())
                answer = PASS["cust"] if b'"mypass"' in m.group(2) else b""
                os.write(fd, answer + b"\n")
    finally:
        _, status = os.waitpid(pid, 0)
    text = out.decode(errors="replace")
    assert os.waitstatus_to_exitcode(status) == 1, text
    assert 'Enter passphrase for custom protector "mypass"' in text
    assert "Enter login passphrase for login protector of uid" not in text  # linked, no file
    assert 'Enter passphrase for custom protector "Recovery passphrase for login"' in text
    assert 'opened with custom protector "mypass"' in text
    assert "pass one" not in text  # no echo


def test_save_keys_then_raw_key(world: World, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    proc = decrypt(
        world,
        world.backups["sub.tar"],
        None,
        "--passphrase-file",
        world.secrets["cust"],
        "--save-keys",
        keys,
    )
    saved = keys / world.keys["cust"][1]
    assert saved.stat().st_mode & 0o777 == 0o600 and len(saved.read_bytes()) == 64, proc.stderr
    dest = tmp_path / "out"
    proc = decrypt(world, world.backups["sub.tar"], dest, "--key", saved)
    got = restored(dest)
    want = {k: v for k, v in world.plain.items() if k == "cust" or k.startswith("cust/")}
    assert {k: v for k, v in got.items() if k in want} == want


def test_passphrase_changed_after_the_backup(world: World, tmp_path: Path) -> None:
    """Last: the old backup needs the old passphrase; the current metadata the new one."""
    status = fscrypt(world.env, "status", world.data)
    m = re.search(r"^([0-9a-f]{16})\s+No\s+custom protector \"mypass\"", status, re.M)
    assert m, status
    fscrypt(
        world.env,
        "metadata",
        "change-passphrase",
        f"--protector={world.data}:{m.group(1)}",
        "--quiet",
        stdin=PASS["cust"] + b"\nnew pass one\n",
    )
    new = tmp_path / "new.pass"
    new.write_bytes(b"new pass one\n")
    src = world.backups["root.tar"]
    proc = decrypt(world, src, None, "--passphrase-file", new)
    assert "wrong passphrase" in proc.stderr, proc.stderr
    proc = decrypt(world, src, None, "--passphrase-file", world.secrets["cust"])
    assert 'opened with custom protector "mypass"' in proc.stderr
    proc = decrypt(world, src, None, "--passphrase-file", new, "--fscrypt-metadata", world.data)
    assert re.search(
        rf'opened with custom protector "mypass" \({re.escape(str(world.data))}', proc.stderr
    ), proc.stderr


def test_view_metadata_entry_rules(ext4, tmp_path: Path) -> None:
    """Shown below the root only, with the originals' modes and owners; a real entry of
    its name makes the mount fail (or, with --no-fscrypt-metadata, passes and is restored)."""
    with ext4(name="m", size_mb=16) as (_image, _dev, mnt):
        meta = mnt / ".fscrypt"
        (meta / "policies").mkdir(parents=True)
        (meta / "protectors").mkdir()
        pol = meta / "policies" / ("ab" * 16)
        pol.write_bytes(b"policy bytes")
        os.chmod(pol, 0o600)
        os.chown(pol, 1234, 5678)
        (mnt / "d").mkdir()
        (mnt / "d" / "f").write_bytes(b"f")
        (mnt / "c" / ".ciphertextfs-fscrypt").mkdir(parents=True)
        (mnt / "c" / ".ciphertextfs-fscrypt" / "mine").write_bytes(b"user data")
        os.sync()
        with view(mnt / "d", tmp_path / "v1"):
            v = tmp_path / "v1"
            assert sorted(os.listdir(v)) == [".ciphertextfs-fscrypt", "f"]
            shown = v / ".ciphertextfs-fscrypt" / "policies" / ("ab" * 16)
            st = os.lstat(shown)
            assert (st.st_mode, st.st_uid, st.st_gid) == (0o100600, 1234, 5678)
            assert shown.read_bytes() == b"policy bytes"
            assert os.getxattr(v / ".ciphertextfs-fscrypt", "user.ciphertextfs.fscrypt_metadata")
            assert sorted(os.listdir(v / ".ciphertextfs-fscrypt")) == ["policies", "protectors"]
        with view(mnt, tmp_path / "v2"):
            assert ".ciphertextfs-fscrypt" not in os.listdir(tmp_path / "v2")
        (tmp_path / "v3").mkdir()
        proc = run_cli("mount", mnt / "c", tmp_path / "v3")
        assert (
            proc.returncode == 2 and "holds a real entry named .ciphertextfs-fscrypt" in proc.stderr
        )
        assert not daemon_pids(tmp_path / "v3")
        with view(mnt / "c", tmp_path / "v4", "--no-fscrypt-metadata") as err:
            assert "--no-fscrypt-metadata is given" in err
            harness.run("rsync", "-aHAX", f"{tmp_path / 'v4'}/", f"{tmp_path / 'copy'}/")
    pw = tmp_path / "pw"
    pw.write_bytes(b"x\n")
    dest = tmp_path / "out"
    proc = run_cli("decrypt", "--passphrase-file", pw, tmp_path / "copy", dest)
    assert proc.returncode == 0, proc.stderr
    assert (dest / ".ciphertextfs-fscrypt" / "mine").read_bytes() == b"user data"


def test_metadata_read_as_the_entries_pass(world: World) -> None:
    """What a tar stream gets: the metadata entry comes first and is read in passing."""
    from ciphertextfs.restore.backup import open_backup
    from ciphertextfs.restore.fscrypt_metadata import Metadata, WithoutMetadataEntry

    meta = Metadata()
    backup = WithoutMetadataEntry(open_backup(world.backups["sub.tar"]), meta=meta)
    paths = [e.path for e in backup.entries()]
    assert set(meta.policies) == {spec for _v, spec in world.keys.values()}
    assert not [p for p in paths if p[:1] == (b".ciphertextfs-fscrypt",)]
    members = harness.run("tar", "-tf", world.backups["sub.tar"]).splitlines()
    assert members[1] == "./.ciphertextfs-fscrypt/", members[:3]


def test_tar_stream_with_the_metadata_entry(world: World, tmp_path: Path) -> None:
    """A stream is read once: the metadata entry, listed first, is met before the trees."""
    dest = tmp_path / "out"
    with open(world.backups["sub.tar"], "rb") as f:
        proc = subprocess.run(
            [*CLI, "decrypt", "--passphrase-file", os.fspath(world.secrets["cust"]), "-", dest],
            stdin=f,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert 'opened with custom protector "mypass"' in proc.stderr, proc.stderr
    got = walk(dest)
    want = {k: v for k, v in world.plain.items() if k == "cust" or k.startswith("cust/")}
    assert {k: v for k, v in got.items() if k in want} == want
