#!/usr/bin/env bash
# The local base image: Debian bookworm made with debootstrap from the Debian
# mirror this machine's apt uses, imported into buildah's store. It stands in
# for python:3.11-slim-bookworm where no container registry is reachable:
# Debian's python3.11 (with venv and pip; `python` is python3), bash and apt, so
# the Dockerfile's stages run unchanged on it.
#
#   scripts/image/make-base.sh          prints the base image's name
#
# The root file system is cached as a tarball in $ES_IMAGE_CACHE (outside the
# repository): a fresh clone imports it again instead of running debootstrap.
set -euo pipefail
source "$(dirname "$0")/common.sh"

SUITE=bookworm
PACKAGES=python3.11,python3-venv,python3-pip,python-is-python3,ca-certificates

# The mirror apt is configured with (deb822 .sources first, then sources.list);
# DEBIAN_MIRROR overrides it.
apt_mirror() {
  local found=""
  for f in /etc/apt/sources.list.d/*.sources; do
    [[ -r "$f" ]] || continue
    found="$(awk -v suite="$SUITE" 'BEGIN { RS = "" }
      $0 ~ ("(^|\n)Suites:[^\n]*[ \t]" suite "([ \t\n]|$)") {
        if (match($0, /(^|\n)URIs:[ \t]*[^ \t\n]+/)) {
          s = substr($0, RSTART, RLENGTH); sub(/^\n?URIs:[ \t]*/, "", s); print s; exit
        }
      }' "$f")"
    [[ -n "$found" ]] && { echo "$found"; return; }
  done
  awk -v suite="$SUITE" '$1 == "deb" && $0 ~ (" " suite " ") {
      for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) { print $i; exit } }' \
    /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null | head -1
}

tag="$(base_tag)"
tarball="$ES_IMAGE_CACHE/${tag##*:}.rootfs.tar"

exec 9>"$ES_IMAGE_CACHE/base.lock"
flock 9  # two builds at once make the base once

if buildah inspect --type image "$tag" >/dev/null 2>&1; then
  echo "$tag"
  exit 0
fi

if [[ ! -s "$tarball" ]]; then
  need_tools debootstrap >&2
  mirror="${DEBIAN_MIRROR:-$(apt_mirror)}"
  [[ -n "$mirror" ]] || { echo "no Debian mirror for $SUITE in apt's sources; set DEBIAN_MIRROR" >&2; exit 1; }
  rootfs="$(mktemp -d "$ES_IMAGE_CACHE/rootfs.XXXXXX")"
  chmod 755 "$rootfs"  # apt downloads as _apt
  trap 'rm -rf "$rootfs" "$tarball.part"' EXIT
  echo "== debootstrap $SUITE (minbase + $PACKAGES)" >&2
  debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$rootfs" "$mirror" >&2
  # apt inside the image uses the same sources as this machine (suite, updates,
  # security), as the official image's apt uses Debian's.
  if [[ -r /etc/apt/sources.list.d/debian.sources ]]; then
    cp /etc/apt/sources.list.d/debian.sources "$rootfs/etc/apt/sources.list.d/"
    rm -f "$rootfs/etc/apt/sources.list"
  fi
  # The image trusts what this machine trusts: pip in the builder reaches PyPI
  # through the same TLS path as pip here.
  if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
  fi
  chroot "$rootfs" /bin/sh -c '
    set -e
    update-ca-certificates >/dev/null
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get -y -qq upgrade >/dev/null
    apt-get clean
    rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/* /tmp/*' >&2
  tar --numeric-owner --xattrs -C "$rootfs" -cf "$tarball.part" .
  mv "$tarball.part" "$tarball"
fi

echo "== import $tarball as $tag" >&2
ctr="$(buildah from scratch)"
buildah add --quiet "$ctr" "$tarball" / >/dev/null
buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  --env LANG=C.UTF-8 --cmd '["bash"]' --os linux --arch amd64 "$ctr"
buildah commit --quiet --rm "$ctr" "$tag" >/dev/null
echo "$tag"
