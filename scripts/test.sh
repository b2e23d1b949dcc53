#!/usr/bin/env bash
# The project's test command: set up with the test tools, check lint, types and the docs site,
# then run the whole suite. Arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
.venv/bin/ruff check .
.venv/bin/mypy src
# --strict: a broken link, a missing page or an unresolved API reference fails the build.
site=$(mktemp -d)
trap 'rm -rf "$site"' EXIT
.venv/bin/mkdocs build --strict --quiet --site-dir "$site"
set +e
# One worker per core (HHRLHF_TEST_WORKERS overrides; 0 runs in this process); a file's tests
# stay on one worker, so module fixtures (a tiny model trained once) are built once, in the
# order collected (conftest.py puts the slow file first; xdist would put files with fewer
# tests last, and the tutorial, two tests and the longest, became the suite's tail); the 15
# slowest tests are listed at the end (the suite is kept under 10 minutes on 2 cores).
.venv/bin/python -m pytest -n "${HHRLHF_TEST_WORKERS:-auto}" --dist loadfile --no-loadscope-reorder --durations=15 "$@"
rc=$?
# pytest exits 5 when it collected no test: that is a failure here, never a pass.
[ "$rc" = 5 ] && echo "no tests ran" >&2
exit "$rc"
