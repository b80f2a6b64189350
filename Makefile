# The two commands a newcomer needs (as root, on Debian):
#   make demo   - the main job
#   make test   - the whole test suite
# Both install what they need and are idempotent.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
APT_PACKAGES := etcd-server etcd-client bird2 gettext-base golang-go golang-github-appc-cni-dev musl-tools \
	containernetworking-plugins iproute2 iputils-ping rsync gcc make python3-venv python3-dev procps openssl dpkg-dev \
	podman runc busybox-static util-linux
CNITOOL := tests/cniclient/cnitool
PYTEST_ARGS ?=

.PHONY: all deps venv core build test demo bench chaos clean kube-apiserver docs-images

all: build

# installs what is missing without starting the packages' host services (tools/apt-install.sh)
deps:
	@tools/apt-install.sh $(APT_PACKAGES)

$(VENV)/.installed: pyproject.toml setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel cython
	$(PY) -m pip install -q --no-build-isolation -e '.[test]'
	touch $@

venv: deps $(VENV)/.installed

# kube-apiserver 1.20.2 from Debian's source package, once, into /var/cache/coil-kube (KUBE_CACHE_DIR)
kube-apiserver: deps
	tools/build-kube-apiserver.sh

$(CNITOOL): tests/cniclient/main.go
	cd tests/cniclient && GO111MODULE=off GOPATH=/usr/share/gocode GOCACHE=$(CURDIR)/.cache/go-build \
	  go build -o cnitool .

# the package with its Cython extensions and native launcher, and the libcni client
core: venv
	COIL_REQUIRE_FAST=1 $(PY) setup.py -q build_ext --inplace
	$(MAKE) --no-print-directory $(CNITOOL)

# everything the tests need
build: core kube-apiserver

# the whole suite on the compiled backends, the daemon/plugin suite again on the
# pure-Python fallbacks, and every benchmark once as a smoke test
test: build
	COIL_STRICT=1 COIL_REQUIRE_FAST=1 $(VENV)/bin/pytest tests -p no:cacheprovider -q -rfEs $(PYTEST_ARGS)
	COIL_STRICT=1 COIL_PURE_PYTHON=1 $(VENV)/bin/pytest tests/integration/test_coild_cni.py tests/integration/test_allocator.py \
	  tests/integration/test_teardown.py \
	  -p no:cacheprovider -q -rfEs $(PYTEST_ARGS)
	COIL_STRICT=1 COIL_REQUIRE_FAST=1 $(VENV)/bin/pytest bench -p no:cacheprovider -q --benchmark-disable -m "not slow"

bench: build
	$(PY) -m pip install -q --no-build-isolation -e '.[test,bench]'
	COIL_REQUIRE_FAST=1 $(VENV)/bin/pytest bench -p no:cacheprovider -q --benchmark-only $(PYTEST_ARGS)

# the chaos hammer for 10 minutes and the bad-input campaign with 10x the examples of
# make test; the figures go to .cache/chaos-*.json (docs/benchmarks.md, "Chaos")
CHAOS_SECONDS ?= 600
chaos: core
	@mkdir -p .cache
	COIL_STRICT=1 COIL_REQUIRE_FAST=1 COIL_HAMMER_SECONDS=$(CHAOS_SECONDS) \
	  COIL_HAMMER_FAULTS=coild-kill,coild-term,etcd-member,etcd-leader,etcd-freeze \
	  COIL_HAMMER_REPORT=.cache/chaos-hammer.json COIL_FUZZ_PROFILE=chaos \
	  COIL_FUZZ_REPORT=.cache/chaos-fuzz.json \
	  $(VENV)/bin/pytest tests/integration/test_hammer.py tests/integration/test_fuzz.py \
	  -p no:cacheprovider -q -rfEs -s $(PYTEST_ARGS)

demo: core
	@tools/host-services.sh snapshot .cache/host-services.before
	$(PY) -m coil.demo
	@tools/host-services.sh check .cache/host-services.before

# the architecture picture of docs/design.md and the README, from its source (Debian's graphviz)
docs-images:
	@tools/apt-install.sh graphviz
	dot -Tsvg docs/img/architecture.dot -o docs/img/architecture.svg

clean:
	rm -rf build .cache $(CNITOOL) coil/_fast/hypercoil
	find coil -name '*.so' -delete
