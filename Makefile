# The two commands of the README, and the lock refresh.
.PHONY: demo test lock

DEMO = $$(.venv/bin/python -c 'from qkiln.demo import demo_model_dir; print(demo_model_dir())')

# Set up, import the bundled demo model (SmolLM2-135M-Instruct), package it as llama.cpp's Q4_K_M mix and
# score the artifact, run on its own packed blocks, against the unquantized model.
demo:
	scripts/setup.sh
	.venv/bin/qkiln info
	mkdir -p dist
	.venv/bin/qkiln convert --to gguf --scheme q4_k_m --algo rtn -o dist/demo-q4_k_m.gguf
	.venv/bin/qkiln eval --model dist/demo-q4_k_m.gguf --ref "$(DEMO)" --text /usr/share/common-licenses/GPL-2 --ctx 512

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
