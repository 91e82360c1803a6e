#!/usr/bin/env bash
# Run a command on the lent GPU machine with the project's Python stack (docs/gpu.md "At 6 B on
# one GPU"). The machine has torch, but not prefect, mlflow, bitsandbytes, torchao, pydantic, ...:
# those travel as one archive, .whl/site312.txz (made by benchmarks/carry_site.sh), unpacked to
# /tmp/site and put first on PYTHONPATH (so the lock's transformers and peft win too).
#   bash benchmarks/on_device.sh python3 benchmarks/gpu_flow.py --out "$OUT"
set -euo pipefail
SITE=/tmp/site
if [ ! -f "$SITE/.unpacked" ]; then
  python3 -c "import tarfile, sys; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter='data')" \
    .whl/site312.txz "$SITE"
  touch "$SITE/.unpacked"
fi
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 DO_NOT_TRACK=1
exec "$@"
