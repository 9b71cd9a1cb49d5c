# The front door. `make run` and `make test` are the two commands a newcomer
# needs; each installs missing Debian packages first. CMake does the building.
BUILD   ?= build
ASAN    ?= build-asan
JOBS    ?= $(shell nproc)
STATE   ?= $(CURDIR)/state
WERROR  := $(if $(filter true,$(CI)),ON,OFF)

.PHONY: all build run test test-asan clean deps-build deps-test deps-run

all: build

deps-build deps-test deps-run: deps-%:
	@scripts/deps.sh $*

$(BUILD)/Makefile: CMakeLists.txt
	cmake -S . -B $(BUILD) -DPN_WERROR=$(WERROR)

build: deps-build $(BUILD)/Makefile
	cmake --build $(BUILD) -j $(JOBS)

# A node with safe defaults: state (certificate, API key) under ./state,
# the core found on PATH (Debian's v2ray is installed when there is none).
# The certificate paths are pinned under ./state because many systems export
# OpenSSL's own SSL_CERT_FILE (a CA bundle), which shares the node's name.
run: deps-run build
	@mkdir -p -m 0700 $(STATE)
	PROXYNODE_PROFILE=$${PROXYNODE_PROFILE:-pasarguard} PROXYNODE_STATE_DIR=$(STATE) \
	  SSL_CERT_FILE=$(STATE)/certs/ssl_cert.pem SSL_KEY_FILE=$(STATE)/certs/ssl_key.pem \
	  ./$(BUILD)/proxynode run

# Unit and integration tests. In CI (CI=true) also: the quick benchmarks,
# a 60 s soak, every fuzz target for 30 s (so none can rot), the integration
# files under valgrind memcheck, then the whole suite under ASan+UBSan, last,
# so the final line is ctest's summary.
test: deps-test build
	cd $(BUILD) && ctest --output-on-failure -j 2
	@if [ "$(CI)" = true ]; then \
	  $(MAKE) --no-print-directory bench QUICK=1 && \
	  $(MAKE) --no-print-directory soak SOAK_SECONDS=60 && \
	  $(MAKE) --no-print-directory fuzz SECONDS=30 && \
	  $(MAKE) --no-print-directory memcheck && \
	  $(MAKE) --no-print-directory test-asan; fi

test-asan: deps-test
	cmake -S . -B $(ASAN) -DPN_SANITIZE=ON -DCMAKE_BUILD_TYPE=Debug -DPN_WERROR=$(WERROR)
	cmake --build $(ASAN) -j $(JOBS)
	cd $(ASAN) && ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 \
	  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 ctest --output-on-failure -j 2

clean:
	rm -rf $(BUILD) $(ASAN) $(BENCH_BUILD) $(FUZZ_BUILD) $(MEMCHECK_BUILD)

# Benchmarks (bench/, BENCHMARKS.md): an optimized build in $(BENCH_BUILD),
# then every figure on loopback with a real /usr/bin/v2ray; JSON in
# bench/results/latest.json and a table on stdout. QUICK=1 (CI) stays under
# 2 minutes; the full run is for people.
BENCH_BUILD ?= build-bench
.PHONY: bench bench-quick deps-bench

deps-bench:
	@scripts/deps.sh bench

bench: deps-bench
	cmake -S . -B $(BENCH_BUILD) -DCMAKE_BUILD_TYPE=Release -DPN_TESTS=OFF -DPN_WERROR=$(WERROR)
	cmake --build $(BENCH_BUILD) -j $(JOBS)
	/usr/bin/python3 bench/run.py --bin $(BENCH_BUILD)/proxynode \
	  $(if $(filter 1 true yes,$(QUICK)),--quick)

bench-quick:
	@$(MAKE) --no-print-directory bench QUICK=1

# Fuzzing (fuzz/README.md): the libFuzzer targets built with clang, ASan and
# UBSan in $(FUZZ_BUILD), then each run for SECONDS seconds (default 30), one
# after the other. FUZZ_TARGETS="fuzz_h2 fuzz_ws" picks some. Fails when any
# target finds a crash, a leak, a timeout or runs out of memory.
FUZZ_BUILD ?= build-fuzz
SECONDS ?= 30
.PHONY: fuzz

fuzz: deps-test
	fuzz/run.sh --build $(FUZZ_BUILD) --seconds $(SECONDS) $(if $(filter ON,$(WERROR)),--werror) \
	  $(FUZZ_TARGETS)

# The soak (issue 6): one node with a real v2ray core under steady mixed
# load (stats pollers over gRPC and REST, user syncs, log streams, TLS
# reconnects) for SOAK_SECONDS (default 600; CI runs 60). Prints a JSON
# summary; fails on any failed request, RSS growth over 5 MiB or fd growth
# over 10 after the warm-up, a zombie child, or an unclean exit.
SOAK_SECONDS ?= 600
.PHONY: soak

soak: deps-bench build
	/usr/bin/python3 bench/soak.py --bin $(BUILD)/proxynode --seconds $(SOAK_SECONDS)

# Memory checks (SECURITY.md "Memory safety"): a Debug build without
# sanitizers in $(MEMCHECK_BUILD), then the integration files below with
# every node run under valgrind memcheck (tests/integration/pnnode.py,
# PN_WRAPPER); a node that valgrind reports errors or definite leaks for
# exits 99 and fails its test with valgrind's stacks. About 6 minutes on
# 2 cores. MEMCHECK_TESTS="test_auth test_marzban" picks files;
# MEMCHECK_DESELECT drops single tests (the 60 s long-poll wait by default).
MEMCHECK_BUILD    ?= build-memcheck
MEMCHECK_TESTS    ?= test_auth test_transport test_tls test_core_lifecycle test_core_crash \
                     test_users_traffic test_stats test_sync_framing test_logs test_xray_fake \
                     test_gozargah test_marzban test_marzban_conf test_marzban_logs test_security
MEMCHECK_DESELECT ?= test_gozargah.py::test_long_poll_logs
VALGRIND          ?= valgrind --error-exitcode=99 --leak-check=full --show-leak-kinds=definite \
                     --errors-for-leak-kinds=definite --track-fds=no --num-callers=30 -q
.PHONY: memcheck

memcheck: deps-test
	cmake -S . -B $(MEMCHECK_BUILD) -DPN_TESTS=ON -DCMAKE_BUILD_TYPE=Debug -DPN_SANITIZE=OFF \
	  -DPN_WERROR=$(WERROR)
	cmake --build $(MEMCHECK_BUILD) -j $(JOBS) --target proxynode
	cd tests/integration && PROXYNODE_BIN=$(CURDIR)/$(MEMCHECK_BUILD)/proxynode \
	  PN_PROTO_DIR=$(CURDIR)/proto PN_SANITIZE=OFF PN_WRAPPER="$(VALGRIND)" \
	  /usr/bin/python3 -m pytest -q -p no:cacheprovider $(addsuffix .py,$(MEMCHECK_TESTS)) \
	  $(addprefix --deselect ,$(MEMCHECK_DESELECT))
