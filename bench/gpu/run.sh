#!/usr/bin/env bash
# The command that runs THERE, on the lent GPU machine, in one call from the repository root (and in
# bench/gpu/rehearse.sh here): installs the carried wheels (bench/gpu/carry/wheels, made here by
# bench/gpu/fetch.sh; nothing is fetched) into a target folder that goes first on PYTHONPATH, so the
# carried transformers shadows the image's, then runs the check (bench/gpu/check.py) with the repository's
# own trainer/ on the path.
#     bash bench/gpu/run.sh [check.py options]
# PY: default python3 (the image's); SITE: the target folder, default /tmp/sft-site.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-python3}
SITE=${SITE:-/tmp/sft-site}
CARRY=bench/gpu/carry
if [ ! -d "$CARRY/wheels" ]; then
  echo "no $CARRY/wheels: run bench/gpu/fetch.sh on a machine with PyPI, and carry $CARRY" >&2; exit 2
fi
$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$CARRY"/wheels/*.whl
# Nothing can be fetched there: no library should try (a lookup that waits on the network costs minutes).
export PYTHONPATH="$SITE:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
exec $PY bench/gpu/check.py --carry "$CARRY" "$@"
