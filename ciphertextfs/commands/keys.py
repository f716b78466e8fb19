"""`ciphertextfs keys`: which keys a backup needs and what can open them.

Also home of the secret options `decrypt` shares (passphrases, protector
keys, fscrypt metadata) and of the one place that turns them into a
KeyRing.
"""

from __future__ import annotations

import argparse
import json
import sys

from ciphertextfs import EXIT_OK, EXIT_PARTIAL
from ciphertextfs.commands import CommandError, exit_status_help

DESCRIPTION = """\
List the fscrypt keys a backup of the view needs, and for each the
protectors that can open it: custom passphrases (recovery passphrases
are custom protectors), login passphrases, raw-key files.  No secret is
needed and none is asked for.

SOURCE is a backup directory or tar archive, as for decrypt.  fscrypt
metadata is looked for at SOURCE's root (.fscrypt/, and the view's
.ciphertextfs-fscrypt/ entry) and in each --fscrypt-metadata PATH."""

EPILOG = exit_status_help(
    "every key the backup needs has at least one protector in the metadata found",
    "some key has none (each is reported with the reason)",
    "a fatal error: unreadable SOURCE",
)

SECRETS_HELP = """\
fscrypt users hold a passphrase, a login passphrase, a recovery passphrase
or a raw-key protector file, not a master key: decrypt unlocks the master
keys from the fscrypt metadata (.fscrypt/) found in SOURCE or given with
--fscrypt-metadata, with --passphrase-file, --ask-passphrase or
--protector-key, when the restore first needs each key."""


def add_secret_options(p: argparse.ArgumentParser) -> None:
    """The options that name fscrypt secrets and metadata (decrypt)."""
    g = p.add_argument_group("fscrypt passphrases and protectors", SECRETS_HELP)
    g.add_argument(
        "--passphrase-file",
        action="append",
        default=[],
        metavar="FILE",
        help="an fscrypt passphrase (custom, login or recovery): the first line of FILE, "
        "read as fscrypt reads it (repeatable; each is tried on every passphrase protector)",
    )
    g.add_argument(
        "--ask-passphrase",
        action="store_true",
        help="ask on the terminal, without echo, once per passphrase protector that a "
        "needed key has (an empty answer skips it)",
    )
    g.add_argument(
        "--protector-key",
        action="append",
        default=[],
        metavar="FILE",
        help="an fscrypt raw_key protector file, 32 bytes (repeatable)",
    )
    _metadata_option(g)
    g.add_argument(
        "--save-keys",
        metavar="DIR",
        help="write each master key unlocked from fscrypt metadata to DIR/<identifier or "
        "descriptor> (mode 0600), for later --key / --v1-key use",
    )
    g.add_argument(
        "--argon2-max-memory",
        type=int,
        default=1024,
        metavar="MIB",
        help="refuse protectors whose Argon2id memory cost exceeds MIB (default 1024; "
        "fscrypt itself chooses at most 128)",
    )


def _metadata_option(p) -> None:
    p.add_argument(
        "--fscrypt-metadata",
        action="append",
        default=[],
        metavar="PATH",
        help="more fscrypt metadata: a .fscrypt directory, a filesystem root holding one, "
        "or a backup (directory or tar archive) of either; searches in addition to SOURCE "
        "(repeatable). Use the root filesystem's /.fscrypt for login protectors that "
        "SOURCE holds only as .link files",
    )


def has_secrets(args: argparse.Namespace) -> bool:
    return bool(args.passphrase_file or args.ask_passphrase or args.protector_key)


def _terminal_asker():
    import getpass

    try:
        open("/dev/tty").close()
    except OSError:
        raise CommandError("--ask-passphrase: no terminal to ask on") from None

    def ask(prompt: str) -> bytes | None:
        text = getpass.getpass(prompt)
        return text.encode("utf-8", "surrogateescape") or None

    return ask


def keyring_from_args(args: argparse.Namespace, note, *, verbose: bool = True):
    """The KeyRing decrypt uses: raw keys first, then fscrypt metadata unlocked on demand."""
    from ciphertextfs.restore.fscrypt_metadata import (
        Secrets,
        Unlocker,
        load_metadata,
        load_passphrase_file,
        load_protector_key,
    )
    from ciphertextfs.restore.keys import KeyFileError, KeyRing

    if args.argon2_max_memory < 1:
        raise CommandError("--argon2-max-memory: must be at least 1 MiB")
    try:
        ring = KeyRing.from_args(args.key, args.v1_key)
        if not has_secrets(args):
            if args.fscrypt_metadata or args.save_keys:
                raise CommandError(
                    "--fscrypt-metadata and --save-keys need --passphrase-file, "
                    "--ask-passphrase or --protector-key",
                )
            return ring
        secrets = Secrets(
            passphrases=[(load_passphrase_file(p), p) for p in args.passphrase_file],
            protector_keys=[(load_protector_key(p), p) for p in args.protector_key],
            ask=_terminal_asker() if args.ask_passphrase else None,
            max_memory_kib=args.argon2_max_memory * 1024,
        )
        meta = load_metadata(args.source, args.fscrypt_metadata)
    except KeyFileError as e:
        raise CommandError(str(e)) from None
    for problem in meta.problems:
        note(problem)
    if not meta.policies and args.source != "-":
        note(
            "no fscrypt policy metadata found in SOURCE"
            + (" or --fscrypt-metadata" if args.fscrypt_metadata else "")
            + ": passphrases and protector keys cannot be used (see 'ciphertextfs keys')"
        )
    ring.resolver = Unlocker(meta, secrets, note, save_dir=args.save_keys, verbose=verbose)
    return ring


# -- the keys command ------------------------------------------------------------


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "keys",
        help="list the keys a backup needs and the fscrypt protectors that open them",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _metadata_option(p)
    p.add_argument("--json", action="store_true", help="one JSON document on stdout")
    p.add_argument("source", metavar="SOURCE", help="backup directory or tar archive")
    p.set_defaults(run=run)
    return p


def _protectors(meta, policy) -> list[dict]:
    out = []
    for entry in policy.wrapped_keys:
        desc = entry.protector_descriptor
        found = meta.protectors.get(desc, [])
        for prot, where in found:
            out.append(
                {
                    "descriptor": desc,
                    "type": prot.source_name,
                    "name": prot.name,
                    "uid": prot.uid if prot.source == 1 else None,
                    "label": prot.label(),
                    "where": where,
                    "available": True,
                    "secret": "passphrase" if prot.needs_passphrase else "protector key file",
                }
            )
        if not found:
            links = meta.links.get(desc, [])
            if links:
                link, where = links[0]
                why = (
                    "only a .link to another filesystem ("
                    + ", ".join(f"{k}={v}" for k, v in sorted(link.items(), reverse=True))
                    + "): add --fscrypt-metadata with that filesystem's .fscrypt"
                )
            else:
                where, why = None, "protector file missing from the backup"
            out.append({"descriptor": desc, "where": where, "available": False, "reason": why})
    return out


def run(args: argparse.Namespace) -> int:
    from ciphertextfs.restore.backup import BackupError, open_backup, show_path
    from ciphertextfs.restore.fscrypt_metadata import load_metadata, needed_keys
    from ciphertextfs.restore.keys import KeyFileError, key_label

    try:
        backup = open_backup(args.source, stdin=sys.stdin.buffer)
        meta = load_metadata(args.source, args.fscrypt_metadata)
    except (BackupError, KeyFileError) as e:
        raise CommandError(str(e)) from None
    with backup:
        needed, bad = needed_keys(backup, meta)
    report = []
    for (_version, spec), k in sorted(needed.items(), key=lambda kv: show_path(kv[1].example)):
        ctx = k.ctx
        policies = meta.policies_for(ctx)
        protectors = [p for pol, _w in policies for p in _protectors(meta, pol)]
        item = {
            "key": key_label(ctx),
            "policy_version": 1 if ctx.version == 1 else 2,
            "key_spec": spec.hex(),
            "modes": f"{ctx.contents.name}/{ctx.filenames.name}, {'|'.join(ctx.flag_names())}",
            "entries": k.entries,
            "example": show_path(k.example),
            "policy_files": [w for _p, w in policies],
            "protectors": protectors,
        }
        if not policies:
            item["reason"] = (
                "no fscrypt policy file for this key in the backup"
                + (" or --fscrypt-metadata" if args.fscrypt_metadata else "")
                + ": only its raw master key (--key/--v1-key) can restore these entries"
            )
        elif not any(p["available"] for p in protectors):
            item["reason"] = "no protector of this key is in the metadata found"
        report.append(item)
    ok = all("reason" not in item for item in report)
    if args.json:
        json.dump(
            {"keys": report, "metadata_problems": meta.problems, "bad_contexts": bad},
            sys.stdout,
            indent=2,
        )
        print()
        return EXIT_OK if ok else EXIT_PARTIAL
    if not report:
        print("no encrypted entries in the backup: no key needed")
    for item in report:
        n = item["entries"]
        print(
            f"{item['key']} (policy v{item['policy_version']}, {item['modes']}): "
            f"{n} entr{'y' if n == 1 else 'ies'}, "
            f"e.g. {item['example']}"
        )
        for p in item["protectors"]:
            if p["available"]:
                print(
                    f"  {p['label']} [{p['descriptor']}], in {p['where']}: give its {p['secret']}"
                )
            else:
                print(f"  protector {p['descriptor']}: not available: {p['reason']}")
        if "reason" in item:
            print(f"  cannot be opened with a passphrase: {item['reason']}")
    for problem in meta.problems:
        print(f"warning: {problem}")
    if bad:
        print(f"warning: {bad} entries carry an fscrypt context that does not parse")
    return EXIT_OK if ok else EXIT_PARTIAL
