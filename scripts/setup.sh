#!/usr/bin/env bash
# Installs qkv and what it needs on a fresh machine with Python 3.11 and pip.
#   bash scripts/setup.sh eval   # the evaluation (real K/V from Whisper, MiniLM, a Wan DiT)
#   bash scripts/setup.sh test   # the evaluation's needs plus pytest, hypothesis, triton and the
#                                # pipeline clients the adapter tests run (without their pins)
# Debian packages (espeak-ng speaks the long real-speech input, alsa-utils ships real recordings)
# are installed with apt-get when it is available and we are root; otherwise install them yourself.
set -euo pipefail
extra=${1:-eval}
case "$extra" in eval|test) ;; *) echo "usage: $0 eval|test" >&2; exit 2 ;; esac
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# Debian's and Ubuntu's own Python refuse pip installs outside a virtual environment (PEP 668):
# say so now rather than fail in pip with "externally-managed-environment".
if "$PY" - <<'CHECK'
import os, sys, sysconfig
in_venv = sys.prefix != sys.base_prefix
managed = os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED"))
sys.exit(0 if managed and not in_venv else 1)
CHECK
then
  echo "error: $PY is managed by the system and pip will not install into it; make a virtual" >&2
  echo "environment first, then run this again inside it:" >&2
  echo "  python3 -m venv .venv && . .venv/bin/activate" >&2
  exit 1
fi

if ! command -v espeak-ng >/dev/null || [ ! -e /usr/share/sounds/alsa/Front_Center.wav ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng alsa-utils >/dev/null
  else
    echo "warning: install the Debian packages espeak-ng and alsa-utils to build the speech data" >&2
  fi
fi

# torch first, pinned: an unpinned torch would pull several GB of CUDA packages on a CPU machine.
"$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q "torch==2.13.0"
"$PY" -m pip install -q -e ".[$extra]"
# the pipeline adapters' tests run the client's own code; its pins (old torch, CUDA) are not wanted
if [ "$extra" = test ]; then "$PY" -m pip install -q --no-deps "streamdiffusionv2==0.1.1" "flashdreams==0.1.0"; fi
