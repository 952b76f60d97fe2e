#!/usr/bin/env bash
# The service's container image, built with podman from a Bento on a Debian base image.
#
#   deploy/container/build.sh MODEL [--image NAME:TAG] [--bentofile FILE] [--base NAME]
#                             [--ca-bundle PATH] [--formats LIST]
#
# MODEL      a package directory (imported into the BentoML model store first, keeping only
#            --formats, default onnx) or a model-store tag (name[:version])
# --image    the image to build (default: sota-serve:<the model's name>-<its store version>)
# --bentofile  bentofile.yaml (default) or another, e.g. bentofile.torchscript.yaml
# --base     the base image (default localhost/sota-serve-base:bookworm, built by
#            base-image.sh when missing); not used when the bentofile sets docker.cuda_version
# --ca-bundle  a PEM bundle of the certificate authorities to trust while the build downloads
#            Python packages (a TLS-intercepting proxy's CA): mounted read-only over the build
#            container's system bundle for the RUN steps only (pip and uv read that one);
#            the image does not keep it. With docker.cuda_version it covers pip only (uv on
#            BentoML's CUDA image keeps its own roots)
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
usage() { sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
    case "$1" in
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
trap 'rm -rf "$work"' EXIT
step() { echo "== $1 ($(( $(date +%s) - t0 )) s)" >&2; }
t0=$(date +%s)

# A bentofile that asks for CUDA (docker.cuda_version) keeps BentoML's CUDA base image, which
# podman pulls from its registry (nvidia/cuda); the Debian base image is for CPU images.
cuda=$(python -c 'import sys, yaml; print((yaml.safe_load(open(sys.argv[1])).get("docker") or {}).get("cuda_version") or "")' "$bentofile")
if [ -n "$cuda" ]; then
    base=""
    step "CUDA $cuda: BentoML's CUDA base image"
else
    step "base image"
    base=$("$here/base-image.sh" --name "$base")
fi

if [ -d "$model" ]; then
    step "import $model into the model store ($formats)"
    line=$(sota-serve import "$model" --formats "$formats" | tail -n 1)
    tag=${line##* }  # "imported into the BentoML model store as NAME:VERSION"
else
    tag=$(python -c 'import bentoml, sys; print(bentoml.models.get(sys.argv[1]).tag)' "$model")
fi
image=${image:-sota-serve:${tag/:/-}}

step "bento for $tag"
# A copy of the bentofile with the base image and the model added: the image then serves
# that model with no environment given at run time.
python - "$bentofile" "$work/bentofile.yaml" "$base" "$tag" <<'EOF'
import sys
import yaml

source, target, base, tag = sys.argv[1:]
spec = yaml.safe_load(open(source))
if base:
    spec.setdefault("docker", {})["base_image"] = base
spec["envs"] = [e for e in spec.get("envs", []) if e["name"] != "SOTA_SERVE_MODEL"]
spec["envs"].append({"name": "SOTA_SERVE_MODEL", "value": tag})
yaml.safe_dump(spec, open(target, "w"), sort_keys=False)
EOF
bento=$(SOTA_SERVE_MODEL=$tag bentoml build -f "$work/bentofile.yaml" -o tag . | tail -n 1)
bento=${bento#__tag__:}

step "image $image from $bento"
opts=()
if [ -n "$ca_bundle" ]; then
    # Debian's pip reads the system bundle, and so does uv on the base image (its uv.toml):
    # one mount, as BentoML's podman backend passes one --opt volume (it joins several into one).
    opts+=(--opt "volume=$ca_bundle:/etc/ssl/certs/ca-certificates.crt:ro")
fi
bentoml containerize "$bento" --backend podman --image-tag "$image" "${opts[@]}" >&2
step "done"
echo "$image"
