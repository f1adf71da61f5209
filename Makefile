# The two commands of the README, and the lock refresh.
.PHONY: demo test lock

# Set up, import the bundled demo model (SmolLM2-135M-Instruct) and build the Graviton4 target's artifacts
# (recipes/graviton4.toml: GGUF Q4_0 with AWQ+GPTQ codes and Q8_0), each scored against the unquantized model,
# run on Graviton4's instruction set under qemu when the Arm tools are installed, timed, and reported in
# dist/graviton4/ (report.html, report.md, manifest.json, a model card per artifact).
demo:
	scripts/setup.sh
	.venv/bin/qkiln build recipes/graviton4.toml

# Install everything the tests need from requirements/test.lock, then run the whole suite. `python -P` keeps
# the repository root off sys.path, so tests import the installed qkiln, as users do.
test:
	scripts/setup.sh test $(SETUP_FLAGS)
	.venv/bin/ruff check .
	.venv/bin/mypy quantize formats model pipeline
	.venv/bin/python -P -m pytest -p no:cacheprovider

# Re-resolve requirements/test.lock and run.lock (after changing dependencies in pyproject.toml, or to take
# newer upstream releases on purpose); then `make test` and commit the locks with the change.
lock:
	scripts/lock.sh
