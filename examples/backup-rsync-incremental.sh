#!/bin/sh
# Daily incremental backups of an ext4 filesystem, encrypted directories
# included, without any fscrypt key: one directory per day, unchanged files
# hard-linked to the previous day's copy (rsync --link-dest).
#
#   backup-rsync-incremental.sh /home /backup/home
#
# gives /backup/home/2026-11-25/, /backup/home/2026-11-26/, ... and a
# "latest" symlink.  The view keeps names, inode numbers, sizes and times of
# unchanged entries stable across mounts, so each run transfers only what
# the owners changed.  Restore any day with:
#
#   ciphertextfs decrypt --key alice.key /backup/home/2026-11-25 /restore
#
# The destination must keep user.* xattrs (ext4, xfs, btrfs do).
set -eu

[ $# -eq 2 ] || { echo "usage: $0 SOURCE BACKUP_DIR" >&2; exit 2; }
source=$1
backups=$2
today=$backups/$(date +%F)

view=$(mktemp -d /run/ciphertextfs-view.XXXXXX)
cleanup() {
    fusermount3 -u "$view" 2>/dev/null || true
    rmdir "$view" 2>/dev/null || true
}
trap cleanup EXIT INT TERM

ciphertextfs mount "$source" "$view"
mkdir -p "$backups"

link_dest=
[ -d "$backups/latest" ] && link_dest="--link-dest=$(readlink -f "$backups/latest")"

# -a: modes, times, owners, symlinks, devices; -H: hard links;
# -A: ACLs; -X: xattrs, the user.fscrypt.* ones included.
rsync -aHAX --numeric-ids --delete $link_dest "$view/" "$today/"
ln -sfn "$(basename "$today")" "$backups/latest"
echo "backup written to $today"
