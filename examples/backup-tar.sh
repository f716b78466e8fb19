#!/bin/sh
# Back up an ext4 filesystem, encrypted directories included, into one tar
# archive, without any fscrypt key.  Run as root (from cron, for instance):
#
#   backup-tar.sh /dev/vg0/home-snap /backup/home-$(date +%F).tar.zst
#
# SOURCE may be a block device, a snapshot, an image file or a directory of
# a mounted ext4 filesystem.  Restore later, with the owner's key:
#
#   ciphertextfs decrypt --key alice.key /backup/home-2026-11-25.tar.zst /restore
set -eu

[ $# -eq 2 ] || { echo "usage: $0 SOURCE ARCHIVE" >&2; exit 2; }
source=$1
archive=$2

view=$(mktemp -d /run/ciphertextfs-view.XXXXXX)
cleanup() {
    fusermount3 -u "$view" 2>/dev/null || true
    rmdir "$view" 2>/dev/null || true
}
trap cleanup EXIT INT TERM

ciphertextfs mount "$source" "$view"

# --xattrs-include='*' keeps the user.fscrypt.* attributes (GNU tar stores
# only user.* by default; being explicit documents the dependency);
# --acls keeps POSIX ACLs; --numeric-owner keeps ids exact.
case $archive in
    *.zst) compress=--zstd ;;
    *.gz) compress=--gzip ;;
    *.xz) compress=--xz ;;
    *) compress= ;;
esac
tar --create --file="$archive" $compress \
    --xattrs --xattrs-include='*' --acls --numeric-owner \
    --directory="$view" .
echo "backup written to $archive"
