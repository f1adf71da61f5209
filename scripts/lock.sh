#!/usr/bin/env bash
# Refresh the dependency locks that scripts/setup.sh installs from (`make lock`):
#   requirements/test.lock   everything `make test` installs (pyproject's [test] extra, llama-cpp-python's
#                            dependencies, the build backend), exact versions and sha256 hashes
#   requirements/run.lock    what `make demo` installs, the same versions (compiled against test.lock)
# Run it after changing dependencies in pyproject.toml, or to take newer upstream releases on purpose; then
# run `make test` and commit the locks with the change. Without it nothing floats: a fresh machine installs
# exactly these versions.
#
# The tool is uv's `pip compile` (pinned below): it resolves for Python 3.11 on x86_64 Linux whatever machine
# runs it, writes hashes for every file of a version, and takes the machine's local wheels (torch's CPU
# build in /opt/wheels) through --find-links, as pip does here.
set -euo pipefail
cd "$(dirname "$0")/.."
UV_VERSION=0.13.9
tools="${XDG_CACHE_HOME:-$HOME/.cache}/qkiln/uv-$UV_VERSION"
if [ ! -x "$tools/bin/uv" ]; then
  python3 -m venv "$tools"
  "$tools/bin/pip" install -q "uv==$UV_VERSION"
fi
uv=("$tools/bin/uv" pip compile --quiet --python-version 3.11 --python-platform x86_64-manylinux_2_28
    --generate-hashes --find-links "${PIP_FIND_LINKS:-/opt/wheels}" --custom-compile-command "make lock")
"${uv[@]}" pyproject.toml requirements/lock.in requirements/llama-cpp.txt --extra test \
  -c requirements/constraints.txt --no-emit-package llama-cpp-python -o requirements/test.lock
"${uv[@]}" pyproject.toml requirements/lock.in -c requirements/test.lock -o requirements/run.lock
echo "requirements/test.lock: $(grep -c '^[a-z]' requirements/test.lock) packages"
echo "requirements/run.lock: $(grep -c '^[a-z]' requirements/run.lock) packages"
