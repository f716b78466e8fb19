"""The fscrypt layer against the kernel: what it wrote to disk, we must decrypt.

The kernel encrypts files, names and symlinks under known keys and every
policy it accepts here; then, with the key removed and the filesystem
unmounted, the raw contexts, ciphertext blocks and symlink bodies are taken
from the image with debugfs and plain reads of the image at the block
numbers debugfs reports (never through our own ext4 reader).  The no-key
names the kernel lists in the locked directories are the oracle for
filename encryption.

This kernel has only AES-256-XTS and AES-256-CTS-CBC: files under
AES-128-CBC-ESSIV, Adiantum, HCTR2 and SM4 policies fail with ENOPKG, and
DIRECT_KEY requires Adiantum, so those are covered by the pure tests and
the cipher layer's published vectors only.
"""

from __future__ import annotations

import errno
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ciphertextfs.fscrypt import crypto, fname, kernel, keysetup, nokey, policy
from ciphertextfs.fscrypt.errors import FscryptError
from tests import harness, trees

XTS, CTS = policy.FSCRYPT_MODE_AES_256_XTS, policy.FSCRYPT_MODE_AES_256_CTS
LBLK64, LBLK32 = (
    policy.FSCRYPT_POLICY_FLAG_IV_INO_LBLK_64,
    policy.FSCRYPT_POLICY_FLAG_IV_INO_LBLK_32,
)

FILE_SIZES = (0, 1, 15, 16, 17, 511, 513, 1023, 1025, 4095, 4096, 4097, 9000)
ASCII_NAME_LENGTHS = (1, 2, 15, 16, 17, 31, 32, 33, 63, 100, 148, 149, 150, 200, 254, 255)
UTF8_NAMES = (
    "héllo wörld ✓".encode(),
    ("é" * 127 + "a").encode(),  # 255 bytes
    "日本語のファイル名".encode(),
)
SYMLINK_TARGETS = (
    b"t",  # fast symlink
    "../ü/x".encode(),  # fast
    b"./" + b"s" * 70,  # slow: body over 59 bytes
    b"/" + b"long/" * 200,  # slow, 1001 bytes
)


@dataclass
class Case:
    """One encrypted directory and what the kernel told us about it."""

    name: str
    version: int
    flags: int
    log2_du: int = 0
    full_names: bool = False
    dir_ino: int = 0
    kpolicy: kernel.KernelPolicy | None = None
    nonces: dict[str, bytes] = field(default_factory=dict)  # relpath -> nonce (ioctl)
    inos: dict[str, int] = field(default_factory=dict)  # relpath -> inode number
    files: dict[str, bytes] = field(default_factory=dict)  # relpath -> plaintext
    names: dict[str, list[bytes]] = field(default_factory=dict)  # dir relpath -> names
    symlinks: dict[str, bytes] = field(default_factory=dict)  # relpath -> target
    listing: dict[str, list[str]] = field(default_factory=dict)  # locked dir -> no-key names
    readlinks: dict[str, str] = field(default_factory=dict)  # locked symlink -> no-key target


@dataclass
class Built:
    image: Path
    block_size: int
    uuid: bytes
    master_v1: keysetup.MasterKey
    master_v2: keysetup.MasterKey
    kernel_identifier: bytes
    hashed_dirs: bool
    cases: list[Case]
    verdicts: dict[str, bool]  # policy tried -> kernel accepted it


def _rng_bytes(seed: str, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def _populate(case: Case, root: Path, block_size: int) -> None:
    rel_dir = case.name
    names: list[bytes] = []
    sizes = [s for s in FILE_SIZES if s <= 2 * block_size + 1000]
    for size in sizes:
        n = f"size{size}".encode()
        data = _rng_bytes(f"{case.name}/{size}", size)
        (root / os.fsdecode(n)).write_bytes(data)
        case.files[f"{rel_dir}/{os.fsdecode(n)}"] = data
        names.append(n)
    # Sparse: data, two hole blocks, data at an odd offset.
    sparse = bytearray(3 * block_size + 205)
    sparse[:100] = _rng_bytes(case.name + "sparse1", 100)
    sparse[3 * block_size + 5 :] = _rng_bytes(case.name + "sparse2", 200)
    with open(root / "sparse", "wb") as f:
        f.write(sparse[:100])
        f.seek(3 * block_size + 5)
        f.write(sparse[3 * block_size + 5 :])
    case.files[f"{rel_dir}/sparse"] = bytes(sparse)
    names.append(b"sparse")
    # Preallocated: unwritten extents inside i_size, and beyond it.
    for nm, keep in (("prealloc", False), ("prealloc_keep", True)):
        data = _rng_bytes(case.name + nm, block_size + 1000)
        argv = ["fallocate", "-l", str(4 * block_size)] + (["-n"] if keep else [])
        (root / nm).touch()
        harness.run(*argv, root / nm)
        fd = os.open(root / nm, os.O_WRONLY)
        try:
            os.pwrite(fd, data, 0)
        finally:
            os.close(fd)
        case.files[f"{rel_dir}/{nm}"] = data + bytes(0 if keep else 4 * block_size - len(data))
        names.append(nm.encode())
    if case.full_names:
        empty = [(f"n{n}_" + "abcdefghij" * 26)[:n].encode() for n in ASCII_NAME_LENGTHS if n > 4]
        empty += [b"x", b"xy"] + list(UTF8_NAMES)
    else:
        empty = [b"a", b"b" * 16, b"c" * 33, b"d" * 150]
    for nm in empty:
        (root / os.fsdecode(nm)).touch()
    names += empty
    for i, target in enumerate(SYMLINK_TARGETS):
        nm = f"link{i}"
        os.symlink(os.fsdecode(target), root / nm)
        case.symlinks[f"{rel_dir}/{nm}"] = target
        names.append(nm.encode())
    sub = root / "sub"
    sub.mkdir()
    (sub / "inner").write_bytes(b"inner data")
    case.files[f"{rel_dir}/sub/inner"] = b"inner data"
    case.names[f"{rel_dir}/sub"] = [b"inner"]
    names.append(b"sub")
    case.names[rel_dir] = names


def _try_policy(mnt: Path, label: str, master: keysetup.MasterKey, **kw: int) -> bool:
    d = mnt / f"try_{label}"
    d.mkdir()
    try:
        kernel.set_policy_v2(d, master.identifier, **kw)
    except OSError as e:
        assert e.errno == errno.EINVAL, e
        return False
    return True


def _build(tmp: Path, *, block_size: int, dir_index: bool, cases: list[Case]) -> Built:
    features = ["encrypt", "stable_inodes"] + ([] if dir_index else ["^dir_index"])
    image = harness.mkfs(tmp / "fs.img", size_mb=24, block_size=block_size, features=features)
    m1 = keysetup.MasterKey(_rng_bytes(f"v1key{block_size}", 64))
    m2 = keysetup.MasterKey(_rng_bytes(f"v2key{block_size}", 64))
    verdicts: dict[str, bool] = {}
    with harness.mounted(image, tmp / "mnt") as (_dev, mnt):
        ident = kernel.add_key(mnt, m2.raw)
        kernel.add_key(mnt, m1.raw, descriptor=m1.descriptor)
        for case in cases:
            root = mnt / case.name
            root.mkdir()
            if case.version == 1:
                kernel.set_policy_v1(root, m1.descriptor, flags=case.flags)
            else:
                kernel.set_policy_v2(
                    root, ident, flags=case.flags, log2_data_unit_size=case.log2_du
                )
            case.kpolicy = kernel.get_policy(root)
            case.dir_ino = os.stat(root).st_ino
            _populate(case, root, block_size)
            for dirpath, dirnames, filenames in os.walk(root):
                for n in dirnames + filenames + ["."]:
                    p = Path(dirpath) / n
                    rel = os.path.normpath(p.relative_to(mnt)).replace(os.sep, "/")
                    case.inos[rel] = os.lstat(p).st_ino
                    if not p.is_symlink():
                        case.nonces[rel] = kernel.get_nonce(p)
        if block_size == 4096:
            for label, kw in {
                "direct_key_xts": {"flags": policy.FSCRYPT_POLICY_FLAG_DIRECT_KEY},
                "du9_lblk64": {"flags": LBLK64, "log2_data_unit_size": 9},
                "du9_lblk32": {"flags": LBLK32, "log2_data_unit_size": 9},
                "du12_lblk32": {"flags": LBLK32, "log2_data_unit_size": 12},
                "du13": {"log2_data_unit_size": 13},
                "du8": {"log2_data_unit_size": 8},
                "lblk_both": {"flags": LBLK32 | LBLK64},
            }.items():
                verdicts[label] = _try_policy(mnt, label, m2, **kw)
        os.sync()
        for spec in (ident, m1.descriptor):
            flags = kernel.remove_key(mnt, spec)
            assert flags == 0, f"key removal left files busy: {flags:#x}"
            st = kernel.key_status(mnt, spec)
            assert st.status == kernel.FSCRYPT_KEY_STATUS_ABSENT
        # Locked: paths below the case directory are spelled as no-key names,
        # found through the inode numbers noted while unlocked.
        for case in cases:
            root = mnt / case.name
            case.listing[case.name] = os.listdir(root)
            by_ino = {os.lstat(root / n).st_ino: root / n for n in case.listing[case.name]}
            sub = f"{case.name}/sub"
            case.listing[sub] = os.listdir(by_ino[case.inos[sub]])
            for link in case.symlinks:
                case.readlinks[link] = os.readlink(by_ino[case.inos[link]])
    uuid_line = re.search(r"Filesystem UUID:\s*([0-9a-f-]+)", harness.run("tune2fs", "-l", image))
    assert uuid_line
    return Built(
        image=image,
        block_size=block_size,
        uuid=bytes.fromhex(uuid_line.group(1).replace("-", "")),
        master_v1=m1,
        master_v2=m2,
        kernel_identifier=ident,
        hashed_dirs=dir_index,
        cases=cases,
        verdicts=verdicts,
    )


class Debugfs:
    """Batched debugfs queries on an unmounted image."""

    def __init__(self, image: Path, tmp: Path) -> None:
        self.image = image
        self.tmp = tmp

    def batch(self, commands: list[str]) -> list[str]:
        script = self.tmp / "debugfs.cmds"
        script.write_text("".join(c + "\n" for c in commands))
        out = harness.run("debugfs", "-f", script, self.image)
        parts = re.split(r"^debugfs: .*$\n?", out, flags=re.M)[1:]
        assert len(parts) == len(commands), out[:2000]
        return parts

    def contexts(self, inos: list[int]) -> dict[int, bytes]:
        cmds = [f"ea_get -f {self.tmp}/ctx{ino} <{ino}> c" for ino in inos]
        self.batch(cmds)
        return {ino: (self.tmp / f"ctx{ino}").read_bytes() for ino in inos}

    def extents_and_sizes(self, inos: list[int]) -> dict[int, tuple[int, list[tuple]]]:
        cmds = []
        for ino in inos:
            cmds += [f"stat <{ino}>", f"ex <{ino}>", f"imap <{ino}>"]
        out = self.batch(cmds)
        result = {}
        row = re.compile(
            r"^ *(\d+)/ *(\d+) +\d+/ *\d+ +(\d+) *- *(\d+) +(\d+) *- *(\d+) +(\d+)([^\n]*)$",
            re.M,
        )
        for i, ino in enumerate(inos):
            size = int(re.search(r"Size: (\d+)", out[3 * i]).group(1))
            leaves = []
            for m in row.finditer(out[3 * i + 1]):
                level, depth, lstart, _lend, pstart, _pend, length, flags = m.groups()
                if level == depth:
                    leaves.append((int(lstart), int(pstart), int(length), "Uninit" in flags))
            loc = re.search(r"located at block (\d+), offset (0x[0-9a-f]+)", out[3 * i + 2])
            result[ino] = (size, leaves, (int(loc.group(1)), int(loc.group(2), 16)))
        return result


def _read_blocks(image: Path, bs: int, leaves: list[tuple], nblocks: int) -> bytes:
    buf = bytearray(nblocks * bs)
    with open(image, "rb") as f:
        for lstart, pstart, length, uninit in leaves:
            if uninit:
                continue
            for j in range(length):
                lb = lstart + j
                if lb >= nblocks:
                    break
                f.seek((pstart + j) * bs)
                buf[lb * bs : (lb + 1) * bs] = f.read(bs)
    return bytes(buf)


def _file_key(built: Built, case: Case, ctx: policy.FscryptContext, ino: int, filenames: bool):
    master = built.master_v1 if case.version == 1 else built.master_v2
    return keysetup.derive_file_key(
        master,
        ctx,
        ino=ino,
        fs_uuid=built.uuid,
        for_filenames=filenames,
        block_size=built.block_size,
    )


def _expected_context(case: Case, nonce: bytes) -> policy.FscryptContext:
    assert case.kpolicy is not None
    return trees.kernel_context(case.kpolicy, nonce)


def _make(tmp_path_factory: pytest.TempPathFactory, tag: str, **kw) -> tuple[Built, Debugfs]:
    harness.require_kernel()
    tmp = tmp_path_factory.mktemp(tag)
    built = _build(tmp, **kw)
    return built, Debugfs(built.image, tmp)


@pytest.fixture(scope="module")
def hashed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Built, Debugfs]:
    """4 KiB blocks, dir_index: every flag combination this kernel accepts."""
    cases = [
        Case("v2_pad32", 2, 3, full_names=True),
        Case("v2_pad4", 2, 0),
        Case("v2_pad8", 2, 1),
        Case("v2_pad16", 2, 2),
        Case("v2_lblk64", 2, 3 | LBLK64, full_names=True),
        Case("v2_lblk32", 2, 3 | LBLK32, full_names=True),
        Case("v2_du512", 2, 3, log2_du=9),
        Case("v2_du1024", 2, 0, log2_du=10),
        Case("v1_pad32", 1, 3, full_names=True),
        Case("v1_pad4", 1, 0),
    ]
    return _make(tmp_path_factory, "hashed", block_size=4096, dir_index=True, cases=cases)


@pytest.fixture(scope="module")
def linear(tmp_path_factory: pytest.TempPathFactory) -> tuple[Built, Debugfs]:
    """1 KiB blocks without dir_index: readdir passes zero hashes."""
    cases = [
        Case("v2_lin", 2, 3, full_names=True),
        Case("v2_lin_lblk64", 2, 2 | LBLK64),
        Case("v1_lin", 1, 2, full_names=True),
    ]
    return _make(tmp_path_factory, "linear", block_size=1024, dir_index=False, cases=cases)


BOTH = ["hashed", "linear"]


@pytest.fixture(params=BOTH)
def fs(request: pytest.FixtureRequest) -> tuple[Built, Debugfs]:
    return request.getfixturevalue(request.param)


def test_key_identifier_matches_kernel(fs: tuple[Built, Debugfs]) -> None:
    built, _ = fs
    assert built.kernel_identifier == built.master_v2.identifier
    for case in built.cases:
        assert case.kpolicy is not None
        want = built.master_v1.descriptor if case.version == 1 else built.master_v2.identifier
        assert case.kpolicy.key_spec == want


def test_kernel_policy_verdicts_match_ours(hashed: tuple[Built, Debugfs]) -> None:
    """Policies the kernel refuses are the ones our checks refuse (4 KiB ext4)."""
    built, _ = hashed
    ours = {}
    m = built.master_v2
    for label, (flags, du) in {
        "direct_key_xts": (policy.FSCRYPT_POLICY_FLAG_DIRECT_KEY, 0),
        "du9_lblk64": (LBLK64, 9),
        "du9_lblk32": (LBLK32, 9),
        "du12_lblk32": (LBLK32, 12),
        "du13": (0, 13),
        "du8": (0, 8),
        "lblk_both": (LBLK32 | LBLK64, 0),
    }.items():
        try:
            ctx = policy.build_context(
                2, m.identifier, bytes(16), flags=flags, log2_data_unit_size=du
            )
            key = keysetup.derive_file_key(
                m, ctx, ino=12, fs_uuid=built.uuid, for_filenames=False, block_size=4096
            )
            ours[label] = key.data_unit_size is not None
        except FscryptError:
            ours[label] = False
    assert built.verdicts == ours
    assert built.verdicts["du12_lblk32"] and not built.verdicts["du9_lblk64"]


def test_raw_contexts_match_kernel(fs: tuple[Built, Debugfs]) -> None:
    built, dbg = fs
    for case in built.cases:
        raws = dbg.contexts(list(case.inos.values()))
        for rel, ino in case.inos.items():
            ctx = policy.parse_context(raws[ino])
            assert ctx.to_bytes() == raws[ino]
            if rel in case.nonces:
                assert ctx == _expected_context(case, case.nonces[rel]), rel
            else:  # symlinks: no ioctl; same policy as the directory
                assert ctx.to_bytes()[:8] == _expected_context(case, bytes(16)).to_bytes()[:8]
                assert ctx.key_spec == case.kpolicy.key_spec
            assert ctx.needs_inode_number == bool(case.flags & (LBLK32 | LBLK64))


def test_contents_decrypt(fs: tuple[Built, Debugfs]) -> None:
    built, dbg = fs
    bs = built.block_size
    checked = 0
    for case in built.cases:
        inos = [case.inos[rel] for rel in case.files]
        info = dbg.extents_and_sizes(inos)
        for rel, plain in case.files.items():
            ino = case.inos[rel]
            size, leaves, _ = info[ino]
            assert size == len(plain), rel
            ctx = _expected_context(case, case.nonces[rel])
            key = _file_key(built, case, ctx, ino, False)
            assert key.data_unit_size == (1 << case.log2_du if case.log2_du else bs)
            ct_len = ctx.ciphertext_size(size, bs)
            raw = _read_blocks(built.image, bs, leaves, -(-ct_len // bs))[:ct_len]
            if size:
                # Whole cipher blocks: a 1-byte file's one byte matches its
                # plaintext once in 256 writes, 16 bytes never in practice.
                n = min(ct_len, 64)
                assert raw[:n] != (plain + bytes(ct_len))[:n], "not encrypted?"
            got = crypto.decrypt_contents(key, raw, 0)
            assert got[:size] == plain, f"{rel}: decryption differs"
            # Units of data the kernel wrote are never all zeros; the decrypted
            # zero padding of the last one shows the unit size was right.
            assert got[size:] == bytes(len(got) - size), rel
            checked += 1
    assert checked >= 10


def test_contents_wrong_inode_number_fails(hashed: tuple[Built, Debugfs]) -> None:
    """IV_INO_LBLK policies really depend on the inode number (and ours does too)."""
    built, dbg = hashed
    for case in built.cases:
        if not case.flags & (LBLK32 | LBLK64):
            continue
        rel = f"{case.name}/size4096"
        ino = case.inos[rel]
        _, leaves, _ = dbg.extents_and_sizes([ino])[ino]
        raw = _read_blocks(built.image, 4096, leaves, 1)
        ctx = _expected_context(case, case.nonces[rel])
        good = crypto.decrypt_contents(_file_key(built, case, ctx, ino, False), raw)
        bad = crypto.decrypt_contents(_file_key(built, case, ctx, ino + 1, False), raw)
        assert good == case.files[rel] and bad != good


def _dir_key(built: Built, case: Case, dirrel: str, raw_ctx: bytes):
    ctx = policy.parse_context(raw_ctx)
    return _file_key(built, case, ctx, case.inos[dirrel], True)


def test_names_match_kernel_nokey_names(fs: tuple[Built, Debugfs]) -> None:
    built, dbg = fs
    for case in built.cases:
        dirs = list(case.names)
        raws = dbg.contexts([case.inos[d] for d in dirs])
        for d in dirs:
            key = _dir_key(built, case, d, raws[case.inos[d]])
            ours = {}
            for name in case.names[d]:
                ct = fname.encrypt_filename(key, name)
                assert len(ct) == fname.encrypted_name_size(4 << (case.flags & 3), len(name))
                ours[nokey.nokey_name(ct)] = (name, ct)
            kernel_names = case.listing[d]
            assert len(kernel_names) == len(ours)
            if not built.hashed_dirs:
                # Linear directories: the kernel passes zero hashes, whole names compare.
                assert set(kernel_names) == set(ours), d
            by_body = {nokey.base64url_decode(n)[8:]: v for n, v in ours.items()}
            for kname in kernel_names:
                body = nokey.base64url_decode(kname)[8:]
                assert body in by_body, f"{d}: kernel name {kname} not ours"
                name, ct = by_body[body]
                parsed = nokey.parse_nokey_name(kname)
                assert parsed.matches(ct)
                if parsed.sha256 is None:
                    assert fname.decrypt_filename(key, parsed.prefix) == name
                else:
                    assert fname.decrypt_filename(key, ct) == name
            if built.hashed_dirs:
                # Directories of dir_index filesystems are read in hash order, with hashes.
                assert any(nokey.parse_nokey_name(n).hash for n in kernel_names), d


def test_symlinks(fs: tuple[Built, Debugfs]) -> None:
    built, dbg = fs
    bs = built.block_size
    for case in built.cases:
        rels = list(case.symlinks)
        inos = [case.inos[r] for r in rels]
        raws = dbg.contexts(inos)
        info = dbg.extents_and_sizes(inos)
        fast_seen = slow_seen = False
        for rel in rels:
            ino = case.inos[rel]
            size, leaves, (iblock, ioff) = info[ino]
            with open(built.image, "rb") as f:
                if leaves:
                    slow_seen = True
                    f.seek(leaves[0][1] * bs)
                    body = f.read(bs)[:size]
                else:
                    fast_seen = True
                    f.seek(iblock * bs + ioff + 0x28)  # i_block
                    body = f.read(60)[:size]
            ct = fname.parse_symlink_body(body)
            assert len(body) == 2 + len(ct)
            # The locked symlink reads as the no-key name of its ciphertext, zero hashes.
            assert case.readlinks[rel] == nokey.nokey_name(ct)
            ctx = policy.parse_context(raws[ino])
            key = _file_key(built, case, ctx, ino, True)
            assert fname.decrypt_symlink(key, ct) == case.symlinks[rel]
            assert fname.encrypt_symlink(key, case.symlinks[rel], bs) == ct
        assert fast_seen and slow_seen
