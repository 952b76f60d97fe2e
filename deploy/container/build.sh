#!/usr/bin/env bash
# The service's container image, built with podman from a Bento on a Debian base image.
#
#   deploy/container/build.sh MODEL [--gpu] [--image NAME:TAG] [--bentofile FILE] [--base NAME]
#                             [--ca-bundle PATH] [--formats LIST]
#
# MODEL      a package directory (imported into the BentoML model store first, keeping only
#            --formats, default onnx) or a model-store tag (name[:version])
# --gpu      the GPU image: bentofile.gpu.yaml (ONNX Runtime's CUDA build, with the CUDA and
#            cuDNN libraries from their wheels) on the same base; it serves on the CPU where
#            the host gives it no GPU. Default image name: sota-serve:<name>-<version>-gpu
# --image    the image to build (default: sota-serve:<the model's name>-<its store version>)
# --bentofile  bentofile.yaml (default) or another, e.g. bentofile.torchscript.yaml
# --base     the base image (default localhost/sota-serve-base:bookworm, built by
#            base-image.sh when missing)
# --ca-bundle  a PEM bundle of the certificate authorities to trust while the build downloads
#            Python packages (a TLS-intercepting proxy's CA): mounted read-only over the build
#            container's system bundle for the RUN steps only (pip and uv read that one);
#            the image does not keep it
#
# Steps: the base image; `sota-serve import` (for a directory); `bentoml build` with a copy of
# the bentofile that names the base image and the model; `bentoml containerize --backend
# podman`: BentoML's public CLI writes the Dockerfile from the Bento (the one `bentoml serve`
# runs) and hands the build to podman, whose options pass through --opt. Prints the image name
# last. Runs in the repository (BentoML's build context), with the project's Python environment
# on PATH. Container runtime settings (runtime, ulimits) are podman's: where its defaults do not
# start containers, CONTAINERS_CONF=deploy/container/containers.conf (runc, lower ulimits).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
image=""
bentofile=bentofile.yaml
base=localhost/sota-serve-base:bookworm
ca_bundle=""
formats=onnx
model=""
gpu=0
usage() { sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
    case "$1" in
        --gpu) gpu=1; shift ;;
        --image) image=$2; shift 2 ;;
        --bentofile) bentofile=$2; shift 2 ;;
        --base) base=$2; shift 2 ;;
        --ca-bundle) ca_bundle=$2; shift 2 ;;
        --formats) formats=$2; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        -*) echo "build.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
        *) [ -z "$model" ] || { echo "build.sh: one MODEL, got $model and $1" >&2; exit 2; }; model=$1; shift ;;
    esac
done
[ -n "$model" ] || { usage >&2; exit 2; }
if [ "$gpu" = 1 ]; then
    [ "$bentofile" = bentofile.yaml ] || { echo "build.sh: --gpu is bentofile.gpu.yaml; leave --bentofile out" >&2; exit 2; }
    bentofile=bentofile.gpu.yaml
fi
if [ -n "$ca_bundle" ]; then
    [ -f "$ca_bundle" ] || { echo "build.sh: --ca-bundle $ca_bundle is not a file" >&2; exit 2; }
    ca_bundle=$(cd "$(dirname "$ca_bundle")" && pwd)/$(basename "$ca_bundle")
fi
for tool in bentoml sota-serve podman python; do
    command -v "$tool" >/dev/null || { echo "build.sh: $tool is not on PATH (activate the project's environment)" >&2; exit 3; }
done
cd "$root"
[ -f "$bentofile" ] || { echo "build.sh: no bentofile $bentofile in $root" >&2; exit 2; }

work=$(mktemp -d)
# this build's own name for BentoML's image, so that builds at the same time do not mix
build_image=localhost/sota-serve-build:$(basename "$work" | tr '[:upper:]_' '[:lower:]-')
trap 'podman rmi --ignore "$build_image" >/dev/null 2>&1; rm -rf "$work"' EXIT
step() { echo "== $1 ($(( $(date +%s) - t0 )) s)" >&2; }
t0=$(date +%s)

step "base image"
base=$("$here/base-image.sh" --name "$base")

if [ -d "$model" ]; then
    step "import $model into the model store ($formats)"
    line=$(sota-serve import "$model" --formats "$formats" | tail -n 1)
    tag=${line##* }  # "imported into the BentoML model store as NAME:VERSION"
else
    tag=$(python -c 'import bentoml, sys; print(bentoml.models.get(sys.argv[1]).tag)' "$model")
fi
suffix=""
[ "$gpu" = 0 ] || suffix=-gpu
image=${image:-sota-serve:${tag/:/-}$suffix}

step "bento for $tag"
# A copy of the bentofile with the base image added. The model's tag is set in the image (below),
# not in the Bento's envs, which BentoML's Dockerfile sets before its apt and venv steps: a new
# model version then reuses those layers.
python - "$bentofile" "$work/bentofile.yaml" "$base" <<'EOF'
import sys
import yaml

source, target, base = sys.argv[1:]
spec = yaml.safe_load(open(source))
spec.setdefault("docker", {})["base_image"] = base
spec["envs"] = [e for e in spec.get("envs", []) if e["name"] != "SOTA_SERVE_MODEL"]
yaml.safe_dump(spec, open(target, "w"), sort_keys=False)
EOF
bento=$(SOTA_SERVE_MODEL=$tag bentoml build -f "$work/bentofile.yaml" -o tag . | tail -n 1)
bento=${bento#__tag__:}

# BentoML's image of the Bento is kept by name once the image is built (one per bentofile:
# sota-serve-build:default, :gpu, ...) as the layer cache of the next build: its apt step and
# the venv of unchanged packages are then reused, by the CPU and GPU builds alike. The one it
# replaces is removed.
variant=$(basename "$bentofile" .yaml)
variant=${variant#bentofile}
variant=${variant#.}
cache_image=localhost/sota-serve-build:${variant:-default}
step "build image from $bento"
opts=()
if [ -n "$ca_bundle" ]; then
    # Debian's pip reads the system bundle, and so does uv on the base image (its uv.toml):
    # one mount, as BentoML's podman backend passes one --opt volume (it joins several into one).
    opts+=(--opt "volume=$ca_bundle:/etc/ssl/certs/ca-certificates.crt:ro")
fi
bentoml containerize "$bento" --backend podman --image-tag "$build_image" "${opts[@]}" >&2

step "image $image: the base image, the Bento and its venv"
# BentoML's Dockerfile apt-installs compilers, git and gnupg (about 530 MB) for packages built
# from source, and pip-installs uv to make the venv; the Bento's wheels need neither at run
# time. The image is the base image plus what serving reads (/app: the venv; /home/bentoml:
# the Bento, the model and the user's home), with the build image's user, environment,
# working directory, ports and entrypoint, so that it runs as the build image does, and the
# model's tag, so that it serves that model with no environment given at run time.
uid=$(podman run --rm --entrypoint id "$build_image" -u)
gid=$(podman run --rm --entrypoint id "$build_image" -g)
config=$(podman image inspect --format '{{json .Config}}' "$build_image")
python - "$build_image" "$base" "$uid" "$gid" "$config" "$tag" >"$work/Containerfile" <<'EOF'
import json
import sys

build, base, uid, gid, config_json, tag = sys.argv[1:]
GRPC_PORT = "8001"
config = json.loads(config_json)
user = config["User"]
env = [e.split("=", 1) for e in config.get("Env", []) if not e.startswith("SOTA_SERVE_MODEL=")]
env.append(["SOTA_SERVE_MODEL", tag])
# the Open Inference Protocol over gRPC beside HTTP, on Triton's port, unless the Bento sets one
if not any(key == "SOTA_SERVE_GRPC_PORT" for key, _ in env):
    env.append(["SOTA_SERVE_GRPC_PORT", GRPC_PORT])
ports = {**(config.get("ExposedPorts") or {}), f"{dict(env)['SOTA_SERVE_GRPC_PORT']}/tcp": {}}


def quoted(value: str) -> str:  # a Containerfile ENV value: no variable expansion
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$") + '"'


lines = [
    f"FROM {build} AS bento",
    f"FROM {base}",
    f"RUN groupadd -g {gid} -o {user} && useradd -m -u {uid} -g {gid} -o -r {user}",
    "COPY --from=bento /app /app",
    "COPY --from=bento /home/bentoml /home/bentoml",
    *(f"ENV {key}={quoted(value)}" for key, value in env),
    f"WORKDIR {config['WorkingDir']}",
    *(f"EXPOSE {port}" for port in ports),
    f"USER {user}",
    f"ENTRYPOINT {json.dumps(config['Entrypoint'])}",
    *([f"CMD {json.dumps(config['Cmd'])}"] if config.get("Cmd") else []),
]
print("\n".join(lines))
EOF
if ! podman build --quiet --tag "$image" --file "$work/Containerfile" "$work" >/dev/null 2>"$work/build.log"; then
    cat "$work/build.log" >&2
    echo "build.sh: podman build of $image failed (above)" >&2
    exit 1
fi
previous=$(podman image inspect --format '{{.Id}}' "$cache_image" 2>/dev/null || true)
podman tag "$build_image" "$cache_image"
podman untag "$build_image" "$build_image"
if [ -n "$previous" ] && [ "$previous" != "$(podman image inspect --format '{{.Id}}' "$cache_image")" ]; then
    podman rmi "$previous" >/dev/null 2>&1 || true  # still in use: left for podman image prune
fi
step "done"
echo "$image"
