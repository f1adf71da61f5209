# The two commands of the README.
.PHONY: demo test

# Import the bundled demo model (SmolLM2-135M-Instruct) and run the main job on it.
demo:
	scripts/setup.sh
	.venv/bin/qkiln eval --text /usr/share/common-licenses/GPL-2 --ctx 512

# Install everything the tests need, then run the whole suite.
test:
	scripts/setup.sh test
	.venv/bin/python -m pytest -p no:cacheprovider
