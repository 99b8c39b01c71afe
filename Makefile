# fmstream: one command installs what is needed, then tests, runs the demo, or manages the
# local Kafka + Redis (no Docker). Every step is idempotent: stamp files skip work already done.
#
#   make deps    venv + Kafka jars + redis-server/kcat/openssl    make test   deps, then pytest
#   make demo    deps, then `fmstream demo`                make up / make down   local services
#   make lint    ruff                                      make clean  drop the stamps

SHELL := /bin/bash
.DEFAULT_GOAL := test

VENV     ?= .venv
# The newest Python >= 3.11 on PATH (pyproject requires 3.11); override with PYTHON=...
ifndef PYTHON
PYTHON := $(shell for p in python3.13 python3.12 python3.11 python3; do \
            $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1 \
            && { command -v $$p; break; }; done)
endif
PIP_ARGS ?=
PYTEST_ARGS ?=
KAFKA_POM  := infra/kafka/pom.xml
KAFKA_LIBS := infra/kafka/target/libs

# apt-get without a terminal (CI has no stdin); sudo only when not root.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT  := $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get -y -q -o Dpkg::Use-Pty=0
# $(call apt_install,pkgs): one shell group, so `cmd || $(call apt_install,x)` stays correct.
apt_install = { $(APT) update </dev/null && $(APT) install --no-install-recommends $(1) </dev/null; }

.PHONY: deps venv kafka redis test demo up down lint clean

deps: venv kafka redis

# --- Python -----------------------------------------------------------------------------------
venv: $(VENV)/.stamp

$(VENV)/.stamp: pyproject.toml
	@test -n "$(PYTHON)" || { echo "Python >= 3.11 is required (set PYTHON=...)" >&2; exit 1; }
	@$(PYTHON) -c 'import ensurepip' 2>/dev/null || $(call apt_install,python3-venv)
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip </dev/null
	$(VENV)/bin/python -m pip install -q $(PIP_ARGS) -e '.[dev]' </dev/null
	touch $@

# --- Kafka jars (Maven Central) ------------------------------------------------------------------
kafka: infra/kafka/target/.stamp

infra/kafka/target/.stamp: $(KAFKA_POM)
	@command -v java >/dev/null || $(call apt_install,default-jre-headless)
	@command -v mvn >/dev/null || $(call apt_install,maven)
	rm -rf $(KAFKA_LIBS)
	mvn -q -B -Dstyle.color=never -f $(KAFKA_POM) dependency:copy-dependencies </dev/null
	touch $@

# --- redis-server and kcat (Debian packages) ----------------------------------------------------
redis:
	@missing=""; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v kcat >/dev/null || missing="$$missing kcat"; \
	command -v openssl >/dev/null || missing="$$missing openssl"; \
	if [ -n "$$missing" ]; then echo "installing$$missing"; $(call apt_install,$$missing); fi

# --- use ------------------------------------------------------------------------------------------
test: deps
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

demo: deps
	$(VENV)/bin/fmstream demo

up: deps
	$(VENV)/bin/fmstream up

down:
	$(VENV)/bin/fmstream down

lint: venv
	$(VENV)/bin/ruff check .

# Stamps only: local service data (.fmstream/) is kept; `make down` first, then delete it by hand.
clean:
	rm -f $(VENV)/.stamp infra/kafka/target/.stamp
