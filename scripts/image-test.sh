#!/usr/bin/env bash
# Build docker/Dockerfile for real on a machine without an image registry or a GPU, then run the
# image: every stage's --help, and the data half of the pipeline (base, ingest, translate, clean)
# on the embedded default, inside the container, on a scratch copy of the repository.
#
#     bash scripts/image-test.sh            (or: make image-test)
#
# Needs podman and buildah (apt-get install podman buildah debootstrap). The base is Debian made
# by debootstrap and `podman import` (docker/debian-base.sh), torch is the CPU build from the local
# wheel directory WHEELS (mounted into the build and used as pip --find-links), and CA is passed as
# the build secret `ca` for pip and apt behind a TLS-intercepting proxy. Both steps use chroot
# isolation: this machine allows no user namespaces or `podman run`.
set -euo pipefail
cd "$(dirname "$0")/.."
BASE=${BASE:-localhost/selfalign-debian:bookworm}
IMAGE=${IMAGE:-localhost/selfalign:image-test}
WHEELS=${WHEELS:-/opt/wheels}
CA=${CA:-/etc/ssl/certs/ca-certificates.crt}
STAGES=${STAGES:-clean}
# Param overrides for the in-image run (dvc exp run -S): the embedded default data, with translate cut
# to a few short requests so the run fits CI; SET= runs the default params as they are (~15 min more).
SET=${SET-translate.max_records=2 translate.max_tokens=48}
t0=$(date +%s)
log() { echo "image-test [$(( $(date +%s) - t0 ))s] $*"; }

command -v podman >/dev/null && command -v buildah >/dev/null \
    || { echo "image-test: needs podman and buildah (apt-get install podman buildah debootstrap)" >&2; exit 2; }
bash docker/debian-base.sh "$BASE"
log "base $BASE ready"

build=(podman build --isolation chroot --format docker -f docker/Dockerfile -t "$IMAGE"
       --build-arg BASE_IMAGE="$BASE" --build-arg EXTRAS=gpu --build-arg UID=1000)
[ -s "$CA" ] && build+=(--secret "id=ca,src=$CA")
[ -d "$WHEELS" ] && build+=(-v "$WHEELS:/wheels:ro" --build-arg WHEELS=/wheels)
"${build[@]}" .
log "built $IMAGE"

# A scratch copy of the work tree (tracked and untracked files, not ignored ones), committed so
# DVC has its git repository, owned by the image's non-root user.
work=$(mktemp -d /var/tmp/selfalign-image-test.XXXXXX)
ctr=""
cleanup() { [ -n "$ctr" ] && buildah rm "$ctr" >/dev/null; rm -rf "$work"; }
trap cleanup EXIT
git ls-files -z --cached --others --exclude-standard | xargs -0 -I{} find {} -maxdepth 0 -type f -print0 2>/dev/null \
    | tar --null -T - -cf - | tar -xf - -C "$work"
git -C "$work" init -q && git -C "$work" config user.name image-test && git -C "$work" config user.email image-test@localhost
git -C "$work" add -A && git -C "$work" commit -qm snapshot
chown -R 1000:1000 "$work"

ctr=$(buildah from "$IMAGE")
run() { buildah run --isolation chroot --user 1000:1000 -v "$work:/workspace" "$ctr" -- bash -c "cd /workspace && $1"; }
run 'whoami && python -c "import torch, transformers, peft, trl, deepspeed, bitsandbytes; print(\"torch\", torch.__version__)" && dvc version | head -1'
for s in stages/*.py; do
    run "python $s --help >/dev/null" || { echo "image-test: $s --help failed in the image" >&2; exit 1; }
    log "$s --help ok"
done
sets=""
for kv in $SET; do sets+=" -S $kv"; done
if [ -n "$sets" ]; then
    run "HF_HUB_OFFLINE=1 dvc exp run$sets $STAGES"
else
    run "HF_HUB_OFFLINE=1 dvc repro $STAGES"
fi
log "$STAGES reproduced in the image${sets:+ with$sets}"
run "dvc status --quiet $STAGES && for m in metrics/*.json; do echo \"\$m\"; head -c 300 \"\$m\"; echo; done"
log "done"
