#!/usr/bin/env bash
# Installs the Debian bookworm packages proxynode needs, only those missing.
# Usage: scripts/deps.sh build|test|run|bench
# build: compile; test: also the test clients and tools; run: build + a core;
# bench: build + the benchmark clients and tools (make bench).
set -euo pipefail
want=(cmake make gcc pkg-config libssl-dev libevent-dev libnghttp2-dev libhttp-parser-dev
      libwslay-dev libprotobuf-c-dev protobuf-c-compiler libjansson-dev openssl)
case "${1:-build}" in
  test) want+=(libcmocka-dev protobuf-compiler python3 python3-pytest python3-grpcio
               python3-protobuf python3-requests python3-h2 python3-websockets curl v2ray
               nghttp2-client wrk iproute2 clang libclang-rt-14-dev valgrind binutils) ;;
  bench) want+=(protobuf-compiler python3 python3-grpcio python3-protobuf python3-h2 v2ray
                nghttp2-client wrk) ;;
  run) ;;
  build) ;;
  *) echo "usage: $0 build|test|run|bench" >&2; exit 2 ;;
esac
missing=()
for p in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
# make run: a working node needs a core; install Debian's v2ray when none is found.
if [ "${1:-}" = run ] && [ -z "${XRAY_EXECUTABLE_PATH:-}" ] && [ ! -x /usr/local/bin/xray ] \
   && ! command -v xray >/dev/null && ! command -v v2ray >/dev/null; then
  missing+=(v2ray)
fi
[ ${#missing[@]} -eq 0 ] && exit 0
echo "installing: ${missing[*]}"
if [ "$(id -u)" -ne 0 ]; then
  echo "not root: run 'apt-get install ${missing[*]}' as root, then retry" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends "${missing[@]}"
