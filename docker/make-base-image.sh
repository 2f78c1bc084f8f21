#!/usr/bin/env bash
# Make a Debian bookworm base image locally (no registry): debootstrap a minimal root file system
# with Python 3.11 and import it into the Docker engine as hfi-base:bookworm.
#   sudo docker/make-base-image.sh [TAG] [DOCKER_HOST]
set -euo pipefail
tag=${1:-hfi-base:bookworm}
rootfs=$(mktemp -d)
trap 'rm -rf "$rootfs"' EXIT
command -v debootstrap >/dev/null || { apt-get update -qq && apt-get install -y -qq debootstrap; }
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$rootfs" http://deb.debian.org/debian
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
tar -C "$rootfs" -c . | docker ${2:+-H "$2"} import - "$tag"
echo "made $tag"
