#!/usr/bin/env bash
# Takes docs/status-page.png: the admin status page (tower_degrade::admin) of the flagship
# example a few seconds into its protected run's fault phase, in headless Chromium driven over
# WebDriver by chromedriver (Debian's `chromium` and `chromium-driver`). The browser starts
# before the storm and only takes the picture during it: starting a browser mid-storm on a
# small machine stalls the service it is meant to show. The storm then runs to its end; its
# output goes to the log named below.
#
#   scripts/status-page-screenshot.sh [seconds into the fault phase, default 6]
set -euo pipefail
cd "$(dirname "$0")/.."
into=${1:-6}
out=docs/status-page.png
log=$(mktemp)
driver=${CHROMEDRIVER:-chromedriver}
command -v "$driver" >/dev/null || { echo "error: needs $driver (Debian's chromium-driver)" >&2; exit 1; }
json() { python3 -c "import json,sys; print(json.load(sys.stdin)$1)"; }

cargo build -q -p example-order-fulfillment
export ORDER_FULFILLMENT_ADMIN_TOKEN=${ORDER_FULFILLMENT_ADMIN_TOKEN:-screenshot-token-$RANDOM$RANDOM$RANDOM}
export ORDER_FULFILLMENT_ADMIN_ADDR=${ORDER_FULFILLMENT_ADMIN_ADDR:-127.0.0.1:3001}

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
# The lowest CPU priority: the storm has the machine first.
nice -n 19 "$driver" --port="$port" > /dev/null 2>&1 &
pids=$!
trap 'kill $pids 2>/dev/null || true' EXIT
wd=http://127.0.0.1:$port
until curl -sf "$wd/status" > /dev/null; do sleep 0.1; done
args='"--headless=new", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars", "--window-size=1400,900"'
[ "$(id -u)" != 0 ] || args="$args, \"--no-sandbox\""
session=$(curl -sf "$wd/session" -H 'content-type: application/json' -d "{\"capabilities\":
  {\"alwaysMatch\": {\"goog:chromeOptions\": {\"args\": [$args]}}}}" | json '["value"]["sessionId"]')
wd=$wd/session/$session

target/debug/example-order-fulfillment > "$log" 2>&1 &
storm=$!
pids="$pids $storm"
# The first line says how long the normal phase is; the status page's line starts the
# protected run, whose admin API serves the page.
until grep -q "the status page:" "$log"; do
  kill -0 $storm 2>/dev/null || { cat "$log" >&2; exit 1; }
  sleep 0.2
done
curl -sf "$wd/url" -H 'content-type: application/json' \
  -d "{\"url\": \"http://$ORDER_FULFILLMENT_ADMIN_ADDR/\"}" > /dev/null
normal=$(sed -n 's/.*: \([0-9.]*\) s normal.*/\1/p' "$log" | head -1)
sleep "$(python3 -c "print($normal + $into)")"
curl -sf "$wd/screenshot" | json '["value"]' | base64 -d > "$out"
curl -sf -X DELETE "$wd" > /dev/null
echo "$out: the status page ${into} s into the protected run's fault phase"
echo "the storm goes on to its end: $log"
wait $storm
