#!/usr/bin/env bash
# Make a minimal Debian base image with debootstrap and `podman import`, for building
# docker/Dockerfile on a machine that can reach Debian's and PyPI's mirrors but no image
# registry (so no nvidia/cuda or debian image can be pulled). Idempotent: an existing image is kept.
#
#     bash docker/debian-base.sh [IMAGE] [SUITE]
set -euo pipefail
IMAGE=${1:-localhost/selfalign-debian:bookworm}
SUITE=${2:-bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
ENGINE=${ENGINE:-podman}
if "$ENGINE" image exists "$IMAGE" 2>/dev/null; then
    echo "debian-base: $IMAGE exists, kept"; exit 0
fi
command -v debootstrap >/dev/null || { echo "debian-base: needs debootstrap (apt-get install debootstrap)" >&2; exit 1; }
ROOT=$(mktemp -d /var/tmp/selfalign-rootfs.XXXXXX)
trap 'rm -rf "$ROOT"' EXIT
# minbase plus what the Dockerfile's apt step installs, so that step only has to find them there
# (apt inside a chroot-isolated build is slow); python3 is Debian's 3.11, which matches the cp311
# torch wheel on the local index.
debootstrap --variant=minbase --include=ca-certificates,git,build-essential,python3,python3-dev,python3-venv \
    "$SUITE" "$ROOT" "$MIRROR"
rm -rf "$ROOT"/var/cache/apt/archives/*.deb "$ROOT"/var/lib/apt/lists/*
tar -C "$ROOT" -c . | "$ENGINE" import --change 'CMD ["/bin/bash"]' - "$IMAGE"
echo "debian-base: imported $IMAGE"
