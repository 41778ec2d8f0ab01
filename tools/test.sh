#!/usr/bin/env bash
# Set up everything the tests need and run them (the README's test command; CI runs it too).
#   bash tools/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages for the zoo's labelled data: fonts to render text lines, a word list;
# chromium renders the HTML report in the report test.
need=()
for pkg in fonts-liberation2 fonts-wqy-microhei wamerican chromium; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "note: missing Debian packages ${need[*]} (zoo data tests will skip); run as root to install" >&2
  fi
fi

python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
python -m pip install -q -e '.[test,torch,ray]'
set +e
python -m pytest -q "$@"
rc=$?
set -e
if [ "$rc" = 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi
exit "$rc"
