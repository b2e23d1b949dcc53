#!/usr/bin/env bash
# The project's test command: set up with the test tools, then run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
set +e
.venv/bin/python -m pytest "$@"
rc=$?
# pytest exits 5 when it collected no test: that is a failure here, never a pass.
[ "$rc" = 5 ] && echo "no tests ran" >&2
exit "$rc"
