# The two commands of the README.
.PHONY: demo test

DEMO = $$(.venv/bin/python -c 'from qkiln.demo import demo_model_dir; print(demo_model_dir())')

# Set up, import the bundled demo model (SmolLM2-135M-Instruct), package it as llama.cpp's Q4_K_M mix and
# score the artifact, run on its own packed blocks, against the unquantized model.
demo:
	scripts/setup.sh
	.venv/bin/qkiln info
	mkdir -p dist
	.venv/bin/qkiln convert --to gguf --scheme q4_k_m --algo rtn -o dist/demo-q4_k_m.gguf
	.venv/bin/qkiln eval --model dist/demo-q4_k_m.gguf --ref "$(DEMO)" --text /usr/share/common-licenses/GPL-2 --ctx 512

# Install everything the tests need, then run the whole suite.
test:
	scripts/setup.sh test
	.venv/bin/ruff check .
	.venv/bin/mypy quantize formats
	.venv/bin/python -m pytest -p no:cacheprovider
