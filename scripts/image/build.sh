#!/usr/bin/env bash
# `make image`: the executor image from the repository's Dockerfile, built here
# with buildah (no Docker daemon, no registry) against the local Debian base.
#
#   scripts/image/build.sh              builds $ES_IMAGE (localhost/executor-service:local)
#
# Installs buildah and debootstrap with apt-get when missing, makes (or reuses)
# the base, builds with buildah's layer cache, prints the image's size.
set -euo pipefail
source "$(dirname "$0")/common.sh"
cd "$here/../.."

image="${ES_IMAGE:-localhost/executor-service:local}"
need_tools buildah debootstrap
start=$SECONDS
base="$(bash "$here/make-base.sh")"
echo "== base image: $base ($((SECONDS - start)) s)"

start=$SECONDS
# chroot isolation: no cgroups or namespaces for RUN beyond a chroot, which is
# what these machines allow; RUN shares the host's network (pip, apt).
# Docker format, as a registry build makes it: OCI has no HEALTHCHECK or SHELL.
buildah bud --layers --isolation chroot --format docker \
  --build-arg "BASE_IMAGE=$base" \
  --tag "$image" --file Dockerfile .
built=$((SECONDS - start))
# sed, not head: head would close the pipe early and pipefail would fail the build on SIGPIPE
size="$(buildah images --format '{{.Size}}' "$image" | sed -n 1p)"
echo "== $image: $size, built in $built s"
