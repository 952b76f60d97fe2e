#!/usr/bin/env bash
# A Debian base image for the service's container, built from Debian's packages with
# mmdebstrap and imported into podman: no registry is needed. Built once and kept by name;
# later calls find it and return at once.
#
#   deploy/container/base-image.sh [--name NAME] [--suite SUITE] [--mirror URL] [--rebuild]
#
# The image holds Debian's Python (bookworm: 3.11, the version the Bento asks for, so that
# `uv venv --python 3.11` in BentoML's Dockerfile finds it instead of downloading one), pip
# (BentoML's Dockerfile installs uv with it), the CA certificates and the user tools its
# Dockerfile calls. Needs root (or a user with subuid ranges), mmdebstrap and podman.
set -euo pipefail

name=localhost/sota-serve-base:bookworm
suite=bookworm
mirror=http://deb.debian.org/debian
rebuild=0
usage() { sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
    case "$1" in
        --name) name=$2; shift 2 ;;
        --suite) suite=$2; shift 2 ;;
        --mirror) mirror=$2; shift 2 ;;
        --rebuild) rebuild=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "base-image.sh: unknown argument $1" >&2; usage >&2; exit 2 ;;
    esac
done

for tool in mmdebstrap podman; do
    command -v "$tool" >/dev/null || { echo "base-image.sh: $tool is not installed (Debian: apt-get install $tool)" >&2; exit 3; }
done

if [ "$rebuild" = 0 ] && podman image exists "$name"; then
    echo "$name"
    exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
start=$(date +%s)
# minbase: essential packages only. The Python of this image is the container's own, so pip
# may install into it (as in the python:3.11-slim images): PEP 668's marker is removed. uv
# trusts the system's certificate store, as Debian's pip does, so that one bundle (build.sh
# --ca-bundle) serves both.
mmdebstrap --quiet --variant=minbase --format=tar \
    --include=python3,python3-pip,python3-venv,ca-certificates,passwd \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
    --customize-hook='rm -f "$1"/usr/lib/python3*/EXTERNALLY-MANAGED' \
    --customize-hook='mkdir -p "$1"/etc/uv && echo "system-certs = true" > "$1"/etc/uv/uv.toml' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*' \
    "$suite" "$work/rootfs.tar" "$mirror"
podman import --quiet \
    --change 'ENV LANG=C.UTF-8' --change 'CMD ["/bin/bash"]' \
    --message "Debian $suite minbase with python3, python3-pip, ca-certificates" \
    "$work/rootfs.tar" "$name" >/dev/null
echo "built $name in $(( $(date +%s) - start )) s: $(podman image inspect --format '{{.Size}}' "$name") bytes" >&2
echo "$name"
