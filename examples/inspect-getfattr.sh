#!/bin/sh
# Look at what the ciphertext view shows for encrypted entries, with stock
# tools and with `ciphertextfs inspect`, no key needed.
#
#   inspect-getfattr.sh /dev/vg0/home-snap alice/Documents
#
# PATH is relative to the root of SOURCE as the view shows it; inside
# encrypted directories, names are the kernel's no-key names.
set -eu

[ $# -eq 2 ] || { echo "usage: $0 SOURCE PATH" >&2; exit 2; }
source=$1
path=$2

view=$(mktemp -d /run/ciphertextfs-view.XXXXXX)
cleanup() {
    fusermount3 -u "$view" 2>/dev/null || true
    rmdir "$view" 2>/dev/null || true
}
trap cleanup EXIT INT TERM

ciphertextfs mount "$source" "$view"

echo "# ls -la: encrypted names are base64url no-key names"
ls -la "$view/$path"

echo "# getfattr: raw context, real size, block size (values in hex)"
getfattr --absolute-names -d -m '^user\.fscrypt\.' -e hex "$view/$path"/* 2>/dev/null || true

echo "# ciphertextfs inspect: the same, decoded"
ciphertextfs inspect "$view/$path" "$view/$path"/*
