# Everything a fresh Debian machine needs, then the demo / the tests / the benchmark.
# Run as root: the demo, tests and bench create network namespaces and TUN devices.

VENV   := .venv
PY     := $(VENV)/bin/python
# systemd: systemd-analyze, which checks the shipped unit (tests/unit/test_systemd_unit.py)
APT    := python3-venv gcc libc6-dev iproute2 iputils-ping iperf3 etcd-server etcd-client openssl util-linux \
          iptables nftables containernetworking-plugins systemd \
          libpython3-dev zlib1g-dev libexpat1-dev patchelf ccache libseccomp-dev
STAMP  := $(VENV)/.installed
# udpflannel-cni frozen into one static executable (packaging/cni/freeze.py); its build
# is cached by the plugin's sources, so this rule re-runs only when one may have changed.
CNI_FROZEN := udpflannel/cni/frozen/udpflannel-cni
CNI_INPUTS := $(wildcard udpflannel/__init__.py udpflannel/cni/*.py udpflannel/core/*.py) \
              packaging/cni/freeze.py packaging/cni/requirements.txt

.PHONY: demo test bench setup system-packages peers cni-plugin clean

demo: setup
	$(VENV)/bin/udpflannel demo

# The data-path tests again with the engine driven the two other ways (FLANNELD_IO):
# the default run uses --io poll; threads and the loop must pass them too. Left out
# there: the Python twin (loop only, already run), the kernel plane's restarts, and of
# the older-kernel profiles (tests/integration/oldkernels.py) all but no-udp-offload;
# with the loop also the warm start, which needs the engine on its own threads (a
# restart under the loop is checked to say so).
IO_TESTS := $(addprefix tests/integration/,test_overlay.py test_offload_modes.py \
            test_kernel_interop.py test_hostile.py test_icmp_and_sources.py test_path_mtu.py \
            test_udp_backend.py test_restarts.py test_dual_stack_engine.py)
IO_SELECT := not python and not (test_restarts and kernel) and not (oldkernel and not oldkernel_no_udp_offload)

# Three test processes on two cores (pytest-xdist), each taking whole files: most
# integration tests wait on daemons, etcd and the kernel, so the suite takes about
# half the time it takes in one process; every test names its namespaces after its own
# process (netns.lab_prefix), so they never meet.
PYTEST := $(PY) -m pytest -q -p no:cacheprovider -n 3 --dist loadfile

# Then the engine built with ASan and UBSan, outside the tree, under the tests of its C
# paths (tests/sanitize.sh). The slowest tests and the total are printed: the whole
# command must stay within 15 minutes.
test: setup
	@date +%s > $(VENV)/.test-started
	$(VENV)/bin/ruff check udpflannel tests bench
	$(VENV)/bin/mypy
	$(PYTEST) --durations=15
	FLANNELD_IO=threads $(PYTEST) --durations=5 -k "$(IO_SELECT)" $(IO_TESTS)
	FLANNELD_IO=loop $(PYTEST) --durations=5 -k "$(IO_SELECT) and not warm_start" $(IO_TESTS)
	bash tests/sanitize.sh
	@echo "make test: passed in $$(( $$(date +%s) - $$(cat $(VENV)/.test-started) )) s (budget 900 s)"

bench: setup
	$(VENV)/bin/udpflannel bench

setup: system-packages $(STAMP) peers cni-plugin

cni-plugin: $(CNI_FROZEN)

$(CNI_FROZEN): $(STAMP) $(CNI_INPUTS)
	$(PY) packaging/cni/freeze.py --out $@
	@touch $@

# The lab's real peers (flanneld, kube-apiserver, ...) built from their Go modules,
# cached outside the repository: see peers/build.sh.
peers:
	bash peers/build.sh

system-packages:
	@missing=$$(for p in $(APT); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
	@# Debian's etcd-server package may start a system etcd; the tests start their own.
	@(command -v systemctl >/dev/null && systemctl disable --now etcd >/dev/null 2>&1) || true

$(STAMP): pyproject.toml setup.py $(wildcard csrc/udpflannel/*.pyx csrc/udpflannel/*.pxd csrc/udpflannel/*.pxi csrc/udpflannel/*.h)
	test -d $(VENV) || python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test,bench]'
	$(PY) -c "import udpflannel._engine"
	touch $(STAMP)

clean:
	rm -rf $(VENV) build *.egg-info udpflannel/*.so csrc/udpflannel/*.c udpflannel/cni/frozen
