#!/usr/bin/env bash
# Load-test harness for tokenrelay: one command, loopback only, every step
# bounded by a duration or a count.
#
#   DURATION=10 bash scripts/load.sh
#
# What it does (see the printed report, also target/load/report.md):
#   1. installs what is missing (wrk, nginx, haproxy, openssl via apt-get;
#      oha via cargo install) and builds tokenrelay --release;
#   2. in a temp dir under target/load/run: a CA + a leaf for 127.0.0.1, an
#      nginx TLS "acquirer" on :18443 answering 200 {"approved":true}, nginx
#      as a plain reverse proxy on :18081, haproxy on :18082, tokenrelay on
#      :18080 (admin :19090) with a generated config; start-up time to ready
#      and idle RSS of tokenrelay;
#   3. provisions one network token and pre-mints single-use cryptogram
#      references (Python http.client, keep-alive, a few threads);
#   4. fixed rate (wrk + Lua delay() pacing) and closed loop (wrk) for
#      direct / nginx / haproxy / tokenrelay forward (a fresh reference per
#      request), oha against token GET and cryptogram POST, binary size;
#   5. raw JSON per step under target/load/, a markdown report;
#   6. an EXIT trap stops every process this script started (by PID).
#
# Environment (defaults):
#   DURATION=10           seconds per measured step
#   WARMUP=2              seconds of warm-up at the fixed rate before each target
#   RATE=2000             fixed-rate target, requests/s
#   FIXED_THREADS=2 FIXED_CONNECTIONS=50
#   CLOSED_THREADS=2 CLOSED_CONNECTIONS=32
#   OHA_CONNECTIONS=32
#   MINT_THREADS=4        Python threads minting references
#   CLOSED_POOL=          override the closed-loop reference pool size
#   PROFILE=1             perf-record tokenrelay during its closed-loop run
#                         (target/load/profile.txt)
#   QUICK=1               closed loop only, haproxy vs tokenrelay, no report
#                         (for before/after comparisons while optimising)
#   VAULT=memory          tokenrelay's vault: memory, or sqlite (the product
#                         default, a file in the run dir)
#   TR_LOG=info           tokenrelay's RUST_LOG
#   TR_WORKERS=           tokenrelay's `workers` (unset: one per core); 1
#                         compares it with nginx's 1 worker, haproxy's 1 thread
#   SKIP_INSTALL=0 SKIP_BUILD=0
set -euo pipefail

DURATION="${DURATION:-10}"
WARMUP="${WARMUP:-2}"
RATE="${RATE:-2000}"
FIXED_THREADS="${FIXED_THREADS:-2}"
FIXED_CONNECTIONS="${FIXED_CONNECTIONS:-50}"
CLOSED_THREADS="${CLOSED_THREADS:-2}"
CLOSED_CONNECTIONS="${CLOSED_CONNECTIONS:-32}"
OHA_CONNECTIONS="${OHA_CONNECTIONS:-32}"
MINT_THREADS="${MINT_THREADS:-4}"
CLOSED_POOL="${CLOSED_POOL:-}"
SKIP_INSTALL="${SKIP_INSTALL:-0}"
SKIP_BUILD="${SKIP_BUILD:-0}"
QUICK="${QUICK:-0}"
VAULT="${VAULT:-memory}"
TR_LOG="${TR_LOG:-info}"
TR_WORKERS="${TR_WORKERS:-}"
case "$VAULT" in sqlite|memory) ;; *) echo "VAULT must be sqlite or memory" >&2; exit 1 ;; esac

UP_PORT=18443
NGINX_PORT=18081
HAPROXY_PORT=18082
TR_PORT=18080
TR_ADMIN_PORT=19090

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$ROOT/target/load"
BIN="$ROOT/target/release/tokenrelay"

log() { printf '[load %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "FATAL: $*"; exit 1; }

for v in DURATION WARMUP RATE FIXED_THREADS FIXED_CONNECTIONS CLOSED_THREADS CLOSED_CONNECTIONS OHA_CONNECTIONS MINT_THREADS; do
    [[ "${!v}" =~ ^[0-9]+$ ]] && (( ${!v} > 0 )) || die "$v must be a positive integer (got '${!v}')"
done

# --------------------------------------------------------------------------
# 1. Tools and build
# --------------------------------------------------------------------------
export PATH="$HOME/.cargo/bin:$PATH"
if [[ "$SKIP_INSTALL" != 1 ]]; then
    missing=()
    for pair in wrk:wrk nginx:nginx haproxy:haproxy openssl:openssl curl:curl; do
        cmd="${pair%%:*}" pkg="${pair#*:}"
        command -v "$cmd" >/dev/null 2>&1 || missing+=("$pkg")
    done
    if ((${#missing[@]})); then
        log "installing: ${missing[*]}"
        SUDO=""; [[ $(id -u) -eq 0 ]] || SUDO="sudo"
        $SUDO apt-get update
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y "${missing[@]}"
    fi
    if ! command -v oha >/dev/null 2>&1; then
        log "installing oha (cargo install oha --locked; a few minutes)"
        cargo install oha --locked
    fi
fi
for cmd in wrk nginx haproxy openssl oha curl python3 cargo; do
    command -v "$cmd" >/dev/null 2>&1 || die "$cmd not found"
done
if [[ "$SKIP_BUILD" != 1 ]]; then
    log "cargo build --release"
    (cd "$ROOT" && cargo build --release)
fi
[[ -x "$BIN" ]] || die "$BIN missing"

for p in $UP_PORT $NGINX_PORT $HAPROXY_PORT $TR_PORT $TR_ADMIN_PORT; do
    if ss -Hltn "sport = :$p" | grep -q .; then die "port $p already in use"; fi
done

mkdir -p "$OUT/run"
rm -f "$OUT"/*.json "$OUT/report.md"
# Previous runs' scratch dirs (tokenrelay's per-request log alone is ~1 GiB at DURATION=10).
find "$OUT/run" -mindepth 1 -maxdepth 1 -type d -exec rm -rf {} +
RUN="$(mktemp -d "$OUT/run/$(date +%Y%m%d-%H%M%S)-XXXX")"
chmod 755 "$RUN"
log "run dir: $RUN"

# --------------------------------------------------------------------------
# Process bookkeeping: every PID we start goes into PIDS; the trap stops them.
# --------------------------------------------------------------------------
PIDS=()
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    local pid
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for _ in $(seq 1 50); do
        local alive=0
        for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        ((alive)) || break
        sleep 0.1
    done
    for pid in "${PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
    # nginx workers / haproxy children exit with their master; make sure.
    for pid in "${PIDS[@]}"; do pkill -KILL -P "$pid" 2>/dev/null || true; done
    ((${#PIDS[@]})) && log "stopped ${#PIDS[@]} processes (${PIDS[*]})"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

now_ns() { date +%s%N; }

wait_http() { # url timeout_s [curl args…] — until 2xx
    local url="$1" t="$2"; shift 2
    local deadline=$(( $(date +%s) + t ))
    while (( $(date +%s) < deadline )); do
        if curl -fsS -o /dev/null --max-time 1 "$@" "$url" 2>/dev/null; then return 0; fi
        sleep 0.01
    done
    return 1
}

tree_pids() { # pid → pid and its direct children (nginx: master + worker)
    echo "$1"; ps -o pid= --ppid "$1" 2>/dev/null || true
}

rss_tree_kib() { # pid → RSS of pid + direct children (KiB)
    local p
    for p in $(tree_pids "$1"); do ps -o rss= -p "$p" 2>/dev/null || true; done | awk '{s+=$1} END {print s+0}'
}

cpu_tree_ticks() { # pid → user+system clock ticks of pid + direct children
    local p
    for p in $(tree_pids "$1"); do
        awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null || true
    done | awk '{s+=$1} END {print s+0}'
}

children_cpu_s() { # var → user+system seconds of this shell's waited-for children
    # `times` runs here, not in a $(…) subshell, whose own counters start at 0.
    times >"$RUN/times.txt"
    printf -v "$1" '%s' "$(tail -n1 "$RUN/times.txt" | awk '{ for (i = 1; i <= 2; i++) { split($i, a, /[ms]/); s += a[1] * 60 + a[2] } } END { printf "%.3f", s }')"
}

start_rss_sampler() { # pid outfile → sampler pid in SAMPLER_PID
    local pid="$1" file="$2"
    ( while kill -0 "$pid" 2>/dev/null; do rss_tree_kib "$pid"; sleep 0.2; done ) >"$file" 2>/dev/null &
    SAMPLER_PID=$!
    PIDS+=("$SAMPLER_PID")
}
stop_rss_sampler() { # file → max KiB in RSS_MAX
    local file="$1" p keep=()
    kill "$SAMPLER_PID" 2>/dev/null || true
    wait "$SAMPLER_PID" 2>/dev/null || true
    for p in "${PIDS[@]}"; do [[ "$p" == "$SAMPLER_PID" ]] || keep+=("$p"); done
    PIDS=("${keep[@]}")
    RSS_MAX="$(sort -n "$file" | tail -n1)"
}

# --------------------------------------------------------------------------
# 2. Certificates, upstream, proxies, tokenrelay
# --------------------------------------------------------------------------
log "certificates"
(
    cd "$RUN"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
        -subj "/CN=tokenrelay load-test CA" -keyout ca.key -out ca.pem \
        -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -subj "/CN=127.0.0.1" -keyout leaf.key -out leaf.csr 2>/dev/null
    printf '%s\n' "basicConstraints=CA:FALSE" "keyUsage=critical,digitalSignature" \
        "extendedKeyUsage=serverAuth" "subjectAltName=IP:127.0.0.1,DNS:127.0.0.1,DNS:localhost" >leaf.ext
    openssl x509 -req -in leaf.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
        -extfile leaf.ext -out leaf.pem 2>/dev/null
    cat leaf.pem leaf.key >leaf-with-key.pem
    chmod 644 ./*.pem ./*.key
)
CA="$RUN/ca.pem"

# The acquirer stand-in: nginx over TLS answering every request.
mkdir -p "$RUN/nginx-up/logs" "$RUN/nginx-proxy/logs"
cat >"$RUN/nginx-up/nginx.conf" <<EOF
worker_processes 1;
pid $RUN/nginx-up/nginx.pid;
error_log $RUN/nginx-up/logs/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $RUN/nginx-up/body;
    proxy_temp_path $RUN/nginx-up/proxy;
    fastcgi_temp_path $RUN/nginx-up/fastcgi;
    uwsgi_temp_path $RUN/nginx-up/uwsgi;
    scgi_temp_path $RUN/nginx-up/scgi;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    server {
        listen 127.0.0.1:$UP_PORT ssl;
        ssl_certificate $RUN/leaf.pem;
        ssl_certificate_key $RUN/leaf.key;
        ssl_protocols TLSv1.2 TLSv1.3;
        location / {
            default_type application/json;
            return 200 '{"approved":true}';
        }
    }
}
EOF

# nginx as a plain reverse proxy → https upstream, pooled, verified.
cat >"$RUN/nginx-proxy/nginx.conf" <<EOF
worker_processes 1;
pid $RUN/nginx-proxy/nginx.pid;
error_log $RUN/nginx-proxy/logs/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $RUN/nginx-proxy/body;
    proxy_temp_path $RUN/nginx-proxy/proxy;
    fastcgi_temp_path $RUN/nginx-proxy/fastcgi;
    uwsgi_temp_path $RUN/nginx-proxy/uwsgi;
    scgi_temp_path $RUN/nginx-proxy/scgi;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    upstream acquirer {
        server 127.0.0.1:$UP_PORT;
        keepalive 64;
        keepalive_requests 10000000;
        keepalive_timeout 300s;
    }
    server {
        listen 127.0.0.1:$NGINX_PORT;
        location / {
            proxy_pass https://acquirer;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_ssl_trusted_certificate $CA;
            proxy_ssl_verify on;
            proxy_ssl_name 127.0.0.1;
            proxy_ssl_server_name off;
            proxy_ssl_session_reuse on;
        }
    }
}
EOF

cat >"$RUN/haproxy.cfg" <<EOF
global
    nbthread 1
    maxconn 8000
    log stderr format raw local0 warning
defaults
    mode http
    log global
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    timeout http-keep-alive 300s
    http-reuse always
frontend fe
    bind 127.0.0.1:$HAPROXY_PORT
    default_backend acquirer
backend acquirer
    server up 127.0.0.1:$UP_PORT ssl verify required ca-file $CA verifyhost 127.0.0.1
EOF

log "starting upstream nginx (TLS :$UP_PORT)"
nginx -p "$RUN/nginx-up" -c "$RUN/nginx-up/nginx.conf" -g 'daemon off;' \
    >"$RUN/nginx-up/logs/stdout.log" 2>&1 &
NGINX_UP_PID=$!; PIDS+=("$NGINX_UP_PID")
log "starting nginx reverse proxy (:$NGINX_PORT)"
nginx -p "$RUN/nginx-proxy" -c "$RUN/nginx-proxy/nginx.conf" -g 'daemon off;' \
    >"$RUN/nginx-proxy/logs/stdout.log" 2>&1 &
NGINX_PROXY_PID=$!; PIDS+=("$NGINX_PROXY_PID")
log "starting haproxy (:$HAPROXY_PORT)"
haproxy -c -q -f "$RUN/haproxy.cfg" || die "haproxy config invalid"
haproxy -db -f "$RUN/haproxy.cfg" >"$RUN/haproxy.log" 2>&1 &
HAPROXY_PID=$!; PIDS+=("$HAPROXY_PID")

# tokenrelay
API_KEY="load-$(openssl rand -hex 24)"
KEY_HASH="$(printf %s "$API_KEY" | "$BIN" hash-key | tr -d '[:space:]')"
cat >"$RUN/tokenrelay.toml" <<EOF
# Generated by scripts/load.sh
listen = "127.0.0.1:$TR_PORT"
admin_listen = "127.0.0.1:$TR_ADMIN_PORT"
compliance_level = "saq-d"
reference_ttl = "1h"
cvc_ttl = "15m"
max_body_bytes = 1048576
placeholder_syntax = "angle"
idempotency_ttl = "24h"
max_connections = 4096
header_read_timeout = "10s"
shutdown_grace = "5s"
tsp = "sandbox"
${TR_WORKERS:+workers = $TR_WORKERS}

[[api_keys]]
name = "load-test"
hash = "$KEY_HASH"
scopes = ["tokens", "cryptograms", "forward"]

[vault]
backend = "$VAULT"
$([[ "$VAULT" == sqlite ]] && printf 'path = "%s"\n' "$RUN/vault.db")

[references]
backend = "memory"
max_entries = 50000000

[upstream]
connect_timeout = "5s"
response_timeout = "30s"
pool_idle_timeout = "90s"
pool_max_idle_per_host = 64

[[destinations]]
host = "127.0.0.1"
port = $UP_PORT
scheme = "https"
allow_private = true
ca_file = "$CA"
EOF
"$BIN" check-config --config "$RUN/tokenrelay.toml" >/dev/null || die "generated tokenrelay config rejected"

for url in "https://127.0.0.1:$UP_PORT/" "http://127.0.0.1:$NGINX_PORT/" "http://127.0.0.1:$HAPROXY_PORT/"; do
    wait_http "$url" 10 --cacert "$CA" || die "$url not answering (see $RUN)"
done

log "starting tokenrelay (:$TR_PORT, admin :$TR_ADMIN_PORT)"
T0=$(now_ns)
(cd "$RUN" && TOKENRELAY_MASTER_KEY="$(openssl rand -base64 32)" RUST_LOG="$TR_LOG" \
    exec "$BIN" serve --config "$RUN/tokenrelay.toml") >"$RUN/tokenrelay.log" 2>&1 &
TR_PID=$!; PIDS+=("$TR_PID")
ready=0
for _ in $(seq 1 3000); do  # ≤ 30 s at 10 ms
    if curl -fsS -o /dev/null --max-time 1 "http://127.0.0.1:$TR_ADMIN_PORT/readyz" 2>/dev/null; then ready=1; break; fi
    kill -0 "$TR_PID" 2>/dev/null || die "tokenrelay exited; see $RUN/tokenrelay.log"
    sleep 0.01
done
T1=$(now_ns)
((ready)) || die "tokenrelay not ready after 30 s"
STARTUP_MS=$(( (T1 - T0) / 1000000 ))
sleep 1
# RSS counts the binary's clean, shared file pages too (on this kernel the
# page cache maps them in large folios: ~10 MiB of a 12 MiB text); the
# process's own memory is the anonymous part.
read -r IDLE_RSS IDLE_ANON IDLE_FILE < <(awk '/^VmRSS:/ {r = $2} /^RssAnon:/ {a = $2} /^RssFile:/ {f = $2}
    END {print r, a, f}' "/proc/$TR_PID/status")
log "tokenrelay ready in ${STARTUP_MS} ms, idle RSS ${IDLE_RSS} KiB (anonymous ${IDLE_ANON}, file ${IDLE_FILE})"

# Binary size, as built (profile.release keeps line tables) and stripped.
BIN_BYTES=$(stat -c %s "$BIN")
STRIPPED_BYTES=""
if command -v strip >/dev/null 2>&1; then
    cp "$BIN" "$RUN/tokenrelay.stripped" && strip "$RUN/tokenrelay.stripped" && STRIPPED_BYTES=$(stat -c %s "$RUN/tokenrelay.stripped")
fi
python3 - "$OUT/binary.json" "$BIN" "$BIN_BYTES" "$STRIPPED_BYTES" <<'PY'
import json, sys
out, path, b, s = sys.argv[1:]
d = {"path": path, "bytes": int(b), "mib": round(int(b) / 1048576, 2)}
if s:
    d["stripped_bytes"] = int(s); d["stripped_mib"] = round(int(s) / 1048576, 2)
json.dump(d, open(out, "w"), indent=2)
PY
python3 - "$OUT/startup.json" "$STARTUP_MS" "$IDLE_RSS" "$IDLE_ANON" "$IDLE_FILE" <<'PY'
import json, sys
out, ms, rss, anon, file = sys.argv[1:]
json.dump({"startup_to_ready_ms": int(ms), "idle_rss_kib": int(rss),
           "idle_rss_anon_kib": int(anon), "idle_rss_file_kib": int(file),
           "method": "spawn → first GET /readyz 200 (curl every 10 ms); VmRSS, RssAnon, RssFile from /proc/<pid>/status 1 s after ready"},
          open(out, "w"), indent=2)
PY

# Machine
python3 - "$OUT/machine.json" <<'PY'
import json, os, sys
model = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "unknown")
mem_kib = next(int(l.split()[1]) for l in open("/proc/meminfo") if l.startswith("MemTotal"))
json.dump({"nproc": os.cpu_count(), "cpu_model": model, "mem_total_kib": mem_kib,
           "mem_total_gib": round(mem_kib / 1048576, 1), "kernel": os.uname().release,
           "loadavg_at_start": open("/proc/loadavg").read().split()[:3]}, open(sys.argv[1], "w"), indent=2)
PY

# --------------------------------------------------------------------------
# 3. Token and reference pools
# --------------------------------------------------------------------------
API="http://127.0.0.1:$TR_PORT"
TOKEN_JSON="$(curl -fsS --max-time 10 "$API/api/network/tokens" -H "x-api-key: $API_KEY" \
    -H 'content-type: application/json' \
    -d '{"source": {"type": "pan", "number": "4111111111111111", "expiry_month": 12, "expiry_year": 2030}}')" \
    || die "provisioning failed"
TOKEN_ID="$(printf '%s' "$TOKEN_JSON" | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')"
log "token $TOKEN_ID"

cat >"$RUN/mint.py" <<'PY'
"""Mint COUNT single-use cryptogram references; one per line to OUT."""
import http.client, re, sys, threading, time, json
host, port, key, tid, count, nthreads, out, stats = sys.argv[1:]
port, count, nthreads = int(port), int(count), int(nthreads)
body = json.dumps({"type": "ecom", "mode": "reference", "amount": "10.00", "currency": "EUR"})
hdrs = {"x-api-key": key, "content-type": "application/json"}
path = f"/api/network/tokens/{tid}/cryptograms"
pat = re.compile(rb'"cryptogram_reference"\s*:\s*"([^"]+)"')
res = [[] for _ in range(nthreads)]
fail = []
def work(i, n):
    c = http.client.HTTPConnection(host, port, timeout=30)
    try:
        for _ in range(n):
            c.request("POST", path, body, hdrs)
            r = c.getresponse(); data = r.read()
            m = pat.search(data)
            if r.status != 201 or not m:
                fail.append(f"{r.status} {data[:200]!r}"); return
            res[i].append(m.group(1).decode())
    except Exception as e:  # noqa: BLE001
        fail.append(repr(e))
t0 = time.monotonic()
per = [count // nthreads + (1 if i < count % nthreads else 0) for i in range(nthreads)]
ts = [threading.Thread(target=work, args=(i, per[i])) for i in range(nthreads)]
for t in ts: t.start()
for t in ts: t.join()
dt = time.monotonic() - t0
refs = [r for l in res for r in l]
with open(out, "w") as f:
    f.write("\n".join(refs) + "\n")
json.dump({"requested": count, "minted": len(refs), "unique": len(set(refs)), "seconds": round(dt, 2),
           "per_second": round(len(refs) / dt, 1), "threads": nthreads, "failures": fail[:5]},
          open(stats, "w"), indent=2)
if fail or len(set(refs)) != count:
    print("mint failed:", fail[:5], file=sys.stderr); sys.exit(1)
PY

mint() { # count outfile label
    local n="$1" file="$2" label="$3"
    log "minting $n references ($label)"
    timeout 900 python3 "$RUN/mint.py" 127.0.0.1 "$TR_PORT" "$API_KEY" "$TOKEN_ID" "$n" "$MINT_THREADS" \
        "$file" "$OUT/mint_$label.json" || die "minting failed; see $OUT/mint_$label.json"
    log "  $(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print("%d in %s s (%s/s)" % (d["minted"], d["seconds"], d["per_second"]))' "$OUT/mint_$label.json")"
    local rss; rss=$(ps -o rss= -p "$TR_PID" | tr -d ' ')
    python3 - "$OUT/mint_$label.json" "$rss" <<'PY'
import json, sys
d = json.load(open(sys.argv[1])); d["tokenrelay_rss_kib_after"] = int(sys.argv[2])
json.dump(d, open(sys.argv[1], "w"), indent=2)
PY
}

# Fixed-rate pool: warm-up + measured run at RATE, +10 % and a floor of slack
# (wrk with delay() stays below RATE; this is an upper bound).
FIXED_POOL=$(( (RATE * (DURATION + WARMUP) * 11) / 10 + 2000 ))
[[ "$QUICK" == 1 ]] && FIXED_POOL=10
mint "$FIXED_POOL" "$RUN/refs_fixed.txt" fixed

# Sanity: one forward end to end, then the same reference again must be 409.
FWD_BODY='{"amount": "10.00", "currency": "EUR", "card": {"number": "<< number >>", "expiry_month": "<< expiry_month | unwrap >>", "expiry_year": "<< expiry_year | unwrap >>", "cryptogram": "<< cryptogram >>", "eci": "<< eci >>"}}'
DEST="https://127.0.0.1:$UP_PORT/v1/authorizations"
SANITY_REF="$(head -n1 "$RUN/refs_fixed.txt")"
sed -i 1d "$RUN/refs_fixed.txt"
fwd_once() {
    curl -sS --max-time 10 -o "$RUN/sanity_body.txt" -w '%{http_code}' \
        "$API/api/network/tokens/$TOKEN_ID/forward" -H "x-api-key: $API_KEY" \
        -H 'content-type: application/json' -H "x-cryptogram-reference: $SANITY_REF" \
        -H "x-destination-url: $DEST" -d "$FWD_BODY"
}
s1="$(fwd_once)"; b1="$(cat "$RUN/sanity_body.txt")"
s2="$(fwd_once)"; b2="$(cat "$RUN/sanity_body.txt")"
log "sanity: forward → $s1 $b1; replay → $s2 $b2"
[[ "$s1" == 200 && "$s2" == 409 ]] || die "sanity forward failed (expected 200 then 409)"
for u in "http://127.0.0.1:$NGINX_PORT/v1/authorizations" "http://127.0.0.1:$HAPROXY_PORT/v1/authorizations"; do
    b="$(curl -fsS --max-time 5 "$u" -H 'content-type: application/json' -d "$FWD_BODY")" || die "$u failed"
    [[ "$b" == '{"approved":true}' ]] || die "$u answered $b"
done

# --------------------------------------------------------------------------
# 4. wrk driver
# --------------------------------------------------------------------------
cat >"$RUN/wrk.lua" <<'LUA'
-- One script for every target. Environment:
--   WRK_METHOD/WRK_BODY/WRK_HEADERS (k: v lines), WRK_THREADS
--   WRK_DELAY_MS   if set: delay() pacing, uniform in [0.5, 1.5] × this
--   REF_FILE, REF_COUNT  if set: request() takes the next reference from this
--                        thread's disjoint slice of the pool file
local function env(name)
  local v = os.getenv(name)
  if v == "" then return nil end
  return v
end
local threads, nthreads = {}, 0
local wanted = tonumber(env("WRK_THREADS") or "1")
local ref_file = env("REF_FILE")
local ref_count = tonumber(env("REF_COUNT") or "0")
local delay_ms = tonumber(env("WRK_DELAY_MS") or "")

wrk.method = os.getenv("WRK_METHOD") or "POST"
wrk.body = os.getenv("WRK_BODY") or ""
for line in (os.getenv("WRK_HEADERS") or ""):gmatch("[^\n]+") do
  local k, v = line:match("^([^:]+):%s*(.*)$")
  if k then wrk.headers[k] = v end
end

function setup(thread)
  local per = math.floor(ref_count / wanted)
  thread:set("tid", nthreads)
  thread:set("offset", nthreads * per)
  thread:set("slice", per)
  table.insert(threads, thread)
  nthreads = nthreads + 1
end

statuses = {}
exhausted = 0
used = 0
local refs, idx = {}, 0

function init(args)
  math.randomseed(os.time() + (tid or 0) * 7919)
  if ref_file then
    local i, n = 0, 0
    for line in io.lines(ref_file) do
      if i >= offset + slice then break end
      if i >= offset and #line > 0 then n = n + 1; refs[n] = line end
      i = i + 1
    end
  end
end

if delay_ms then
  function delay()
    return math.floor(delay_ms * (0.5 + math.random()) + 0.5)
  end
end

-- Every target gets a request built per request with a fresh
-- x-cryptogram-reference, so the generator (on the same cores) does the
-- same work whichever server it measures: the plain proxies get a
-- placeholder of the same length, which they pass through.
function request()
  idx = idx + 1
  local r
  if ref_file then
    r = refs[idx]
    if r == nil then
      -- Pool slice exhausted: never reuse a reference. Flag and stop.
      exhausted = exhausted + 1
      r = "cref_pool_exhausted"
      wrk.thread:stop()
    else
      used = used + 1
    end
  else
    r = string.format("cref_%043d", idx)
  end
  wrk.headers["x-cryptogram-reference"] = r
  return wrk.format(nil, nil, nil, nil)
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
  local st, ex, us = {}, 0, 0
  for _, t in ipairs(threads) do
    local s = t:get("statuses") or {}
    for k, v in pairs(s) do st[tostring(k)] = (st[tostring(k)] or 0) + v end
    ex = ex + (t:get("exhausted") or 0)
    us = us + (t:get("used") or 0)
  end
  local parts = {}
  for k, v in pairs(st) do parts[#parts + 1] = string.format('"%s":%d', k, v) end
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status_ge_400":%d,"timeout":%d},' ..
    '"latency_us":{"min":%d,"mean":%.1f,"stdev":%.1f,"max":%d,"p50":%d,"p75":%d,"p90":%d,"p99":%d,"p99_9":%d},' ..
    '"statuses":{%s},"refs_used":%d,"pool_exhausted":%d}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.min, latency.mean, latency.stdev, latency.max,
    latency:percentile(50), latency:percentile(75), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9),
    table.concat(parts, ","), us, ex))
end
LUA

PLAIN_HEADERS=$'content-type: application/json'
TR_HEADERS="content-type: application/json
x-api-key: $API_KEY
x-destination-url: $DEST"

declare -A URLS=(
    [direct]="https://127.0.0.1:$UP_PORT/v1/authorizations"
    [nginx]="http://127.0.0.1:$NGINX_PORT/v1/authorizations"
    [haproxy]="http://127.0.0.1:$HAPROXY_PORT/v1/authorizations"
    [tokenrelay]="$API/api/network/tokens/$TOKEN_ID/forward"
)
declare -A RSS_PID=(
    [direct]="$NGINX_UP_PID" [nginx]="$NGINX_PROXY_PID" [haproxy]="$HAPROXY_PID" [tokenrelay]="$TR_PID"
)

# run_wrk name target mode(fixed|closed|warm) threads conns duration [ref_file ref_count]
run_wrk() {
    local name="$1" target="$2" mode="$3" t="$4" c="$5" d="$6" rfile="${7:-}" rcount="${8:-0}"
    local headers="$PLAIN_HEADERS" delay=""
    [[ "$target" == tokenrelay ]] && headers="$TR_HEADERS"
    [[ "$mode" != closed ]] && delay=$(python3 -c "print(round($c * 1000 / $RATE, 3))")
    local raw="$RUN/wrk_$name.txt" rssf="$RUN/rss_$name.txt"
    start_rss_sampler "${RSS_PID[$target]}" "$rssf"
    local cpu0 up0 gen0; cpu0=$(cpu_tree_ticks "${RSS_PID[$target]}"); up0=$(cpu_tree_ticks "$NGINX_UP_PID")
    children_cpu_s gen0
    local cmd=(wrk -t"$t" -c"$c" -d"${d}s" --timeout 5s -s "$RUN/wrk.lua" "${URLS[$target]}")
    WRK_THREADS="$t" WRK_METHOD=POST WRK_BODY="$FWD_BODY" WRK_HEADERS="$headers" \
        WRK_DELAY_MS="$delay" REF_FILE="$rfile" REF_COUNT="$rcount" \
        timeout $((d + 30)) "${cmd[@]}" >"$raw" 2>&1 || {
            stop_rss_sampler "$rssf"; cat "$raw" >&2; die "wrk $name failed"; }
    local cpu1 up1 gen1; cpu1=$(cpu_tree_ticks "${RSS_PID[$target]}"); up1=$(cpu_tree_ticks "$NGINX_UP_PID")
    children_cpu_s gen1
    stop_rss_sampler "$rssf"; local rss_max="$RSS_MAX"
    python3 - "$raw" "$OUT/$name.json" "$target" "$mode" "$t" "$c" "$d" "${delay:-}" "$RATE" "$rss_max" "${cmd[*]}" \
        "$((cpu1 - cpu0))" "$((up1 - up0))" "$(getconf CLK_TCK)" "$gen0" "$gen1" <<'PY'
import json, sys
raw, out, target, mode, t, c, d, delay, rate, rss, cmd, cpu, up, tck, gen0, gen1 = sys.argv[1:]
line = next(l for l in open(raw) if l.startswith("WRKJSON "))
r = json.loads(line[len("WRKJSON "):])
r.update({"target": target, "mode": mode, "threads": int(t), "connections": int(c), "duration_s": int(d),
          "rps": round(r["requests"] / (r["duration_us"] / 1e6), 1),
          "non_2xx": sum(v for k, v in r["statuses"].items() if not k.startswith("2")),
          "socket_errors": sum(v for k, v in r["errors"].items() if k != "status_ge_400"),
          "rss_max_kib": int(rss) if rss else None, "rss_of": "server process + direct children (ps -o rss=, every 200 ms)",
          "command": cmd, "wrk_stdout": open(raw).read()})
# CPU per request from /proc/<pid>/stat (user + system, clock ticks): the
# measured server and, behind every proxy, the upstream nginx.
r["cpu_us_per_request"] = round(int(cpu) / int(tck) * 1e6 / max(r["requests"], 1), 1)
r["upstream_cpu_us_per_request"] = round(int(up) / int(tck) * 1e6 / max(r["requests"], 1), 1)
# The generator (wrk, a child of this shell, with its Lua per request).
r["generator_cpu_us_per_request"] = round((float(gen1) - float(gen0)) * 1e6 / max(r["requests"], 1), 1)
if mode == "fixed":
    r.update({"target_rps": int(rate), "pacing": "wrk delay() per connection, uniform in [0.5,1.5] x %s ms "
              "(= connections*1000/RATE); NOT a coordinated-omission-corrected generator" % delay})
json.dump(r, open(out, "w"), indent=2)
print(f'{r["rps"]:>9} req/s  p50 {r["latency_us"]["p50"]} us  p99 {r["latency_us"]["p99"]} us  '
      f'cpu {r["cpu_us_per_request"]} us/req (upstream {r["upstream_cpu_us_per_request"]}, wrk {r["generator_cpu_us_per_request"]})  '
      f'non-2xx {r["non_2xx"]}  socket errors {r["socket_errors"]}  statuses {r["statuses"]}'
      + (f'  pool_exhausted {r["pool_exhausted"]}' if r["pool_exhausted"] else ""), file=sys.stderr)
PY
}

# Split the fixed pool: warm-up slice, then measured slice (disjoint files).
WARM_N=$(( RATE * WARMUP * 11 / 10 + 500 ))
head -n "$WARM_N" "$RUN/refs_fixed.txt" >"$RUN/refs_warm.txt"
tail -n +"$((WARM_N + 1))" "$RUN/refs_fixed.txt" >"$RUN/refs_fixed_run.txt"
FIXED_RUN_N=$(wc -l <"$RUN/refs_fixed_run.txt")

# Closed loop against tokenrelay, a fresh reference per request, perf-recorded
# when PROFILE=1. The pool (unless CLOSED_POOL is set): 1.2 × the best
# closed-loop rate of the proxies named as arguments × DURATION, + slack
# (tokenrelay does strictly more work per request than those proxies on the
# same cores). Should it still run dry, wrk stops that thread rather than
# reuse a reference and the report says "pool exhausted".
closed_tokenrelay() { # baseline targets already measured closed-loop
    if [[ -z "$CLOSED_POOL" ]]; then
        CLOSED_POOL=$(python3 - "$OUT" "$DURATION" "$@" <<'PY'
import json, sys, math
out, d, targets = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
best = max(json.load(open(f"{out}/closed_{t}.json"))["rps"] for t in targets)
print(math.ceil(best * 1.2 * d) + 5000)
PY
)
    fi
    mint "$CLOSED_POOL" "$RUN/refs_closed.txt" closed
    log "  tokenrelay (closed)"
    local perf_pid=""
    if [[ "${PROFILE:-0}" == 1 ]] && command -v perf >/dev/null; then
        # Software clock sampling (hardware counters are not always available).
        perf record -e cpu-clock -F 499 -g -p "$TR_PID" -o "$OUT/perf.data" -- sleep "$DURATION" \
            >"$RUN/perf.log" 2>&1 &
        perf_pid=$!
    fi
    run_wrk "closed_tokenrelay" tokenrelay closed "$CLOSED_THREADS" "$CLOSED_CONNECTIONS" "$DURATION" "$RUN/refs_closed.txt" "$CLOSED_POOL"
    if [[ -n "$perf_pid" ]]; then
        wait "$perf_pid" || true
        perf report -i "$OUT/perf.data" --stdio --no-children --sort symbol --percent-limit 1 \
            >"$OUT/profile.txt" 2>/dev/null || true
        log "  profile of the closed-loop forward: $OUT/profile.txt"
    fi
}

if [[ "$QUICK" == 1 ]]; then
    log "QUICK=1: closed loop only, haproxy vs tokenrelay (vault $VAULT, RUST_LOG=$TR_LOG)"
    run_wrk closed_haproxy haproxy closed "$CLOSED_THREADS" "$CLOSED_CONNECTIONS" "$DURATION"
    closed_tokenrelay haproxy
    python3 - "$OUT" <<'PY'
import json, sys
h, t = (json.load(open(f"{sys.argv[1]}/closed_{n}.json")) for n in ("haproxy", "tokenrelay"))
print(f"QUICK closed loop: haproxy {h['rps']:.0f} req/s, tokenrelay {t['rps']:.0f} req/s = {t['rps'] / h['rps']:.2f}x "
      f"(tokenrelay p50 {t['latency_us']['p50']} us, non-2xx {t['non_2xx']})")
PY
    exit 0
fi

log "fixed rate: $RATE rps, $FIXED_THREADS threads × $FIXED_CONNECTIONS connections, ${DURATION}s each (+${WARMUP}s warm-up)"
for target in direct nginx haproxy tokenrelay; do
    log "  $target (warm-up ${WARMUP}s)"
    if [[ "$target" == tokenrelay ]]; then
        run_wrk "warm_$target" "$target" warm "$FIXED_THREADS" "$FIXED_CONNECTIONS" "$WARMUP" "$RUN/refs_warm.txt" "$WARM_N"
        log "  $target (fixed)"
        run_wrk "fixed_$target" "$target" fixed "$FIXED_THREADS" "$FIXED_CONNECTIONS" "$DURATION" "$RUN/refs_fixed_run.txt" "$FIXED_RUN_N"
    else
        run_wrk "warm_$target" "$target" warm "$FIXED_THREADS" "$FIXED_CONNECTIONS" "$WARMUP"
        log "  $target (fixed)"
        run_wrk "fixed_$target" "$target" fixed "$FIXED_THREADS" "$FIXED_CONNECTIONS" "$DURATION"
    fi
done

log "closed loop: $CLOSED_THREADS threads × $CLOSED_CONNECTIONS connections, ${DURATION}s each"
for target in direct nginx haproxy; do
    log "  $target (closed)"
    run_wrk "closed_$target" "$target" closed "$CLOSED_THREADS" "$CLOSED_CONNECTIONS" "$DURATION"
done

closed_tokenrelay nginx haproxy

# --------------------------------------------------------------------------
# oha: token GET and cryptogram POST (reference mode), closed loop
# --------------------------------------------------------------------------
OHA_FMT=(--output-format json)
oha --help 2>&1 | grep -q -- '--output-format' || OHA_FMT=(-j)
# Let requests in flight at the deadline finish instead of counting as errors.
oha --help 2>&1 | grep -q -- '--wait-ongoing-requests-after-deadline' && OHA_FMT+=(-w)
run_oha() { # name method url [body]
    local name="$1" method="$2" url="$3" body="${4:-}"
    local args=(-z "${DURATION}s" -c "$OHA_CONNECTIONS" --no-tui "${OHA_FMT[@]}" -m "$method"
        -H "x-api-key: $API_KEY" -H 'content-type: application/json')
    [[ -n "$body" ]] && args+=(-d "$body")
    local rssf="$RUN/rss_$name.txt"
    start_rss_sampler "$TR_PID" "$rssf"
    timeout $((DURATION + 30)) oha "${args[@]}" "$url" >"$RUN/oha_$name.json" 2>"$RUN/oha_$name.err" || {
        stop_rss_sampler "$rssf"; cat "$RUN/oha_$name.err" >&2; die "oha $name failed"; }
    stop_rss_sampler "$rssf"; local rss_max="$RSS_MAX"
    python3 - "$RUN/oha_$name.json" "$OUT/$name.json" "$rss_max" "$OHA_CONNECTIONS" "$DURATION" "$method $url" <<'PY'
import json, sys
raw, out, rss, c, d, what = sys.argv[1:]
o = json.load(open(raw))
s, lp = o["summary"], o.get("latencyPercentiles", {})
codes = o.get("statusCodeDistribution", {})
r = {"request": what, "connections": int(c), "duration_s": int(d),
     "rps": round(s["requestsPerSec"], 1), "success_rate": s.get("successRate"),
     "latency_us": {k: round(v * 1e6) for k, v in lp.items() if v is not None},
     "statuses": codes, "non_2xx": sum(v for k, v in codes.items() if not str(k).startswith("2")),
     "errors": o.get("errorDistribution", {}), "rss_max_kib": int(rss) if rss else None, "oha": o}
json.dump(r, open(out, "w"), indent=2)
print(f'{r["rps"]:>9} req/s  p50 {r["latency_us"].get("p50")} us  p99 {r["latency_us"].get("p99")} us  statuses {codes}  errors {r["errors"]}', file=sys.stderr)
PY
}
log "oha: GET token details"
run_oha oha_get_token GET "$API/api/network/tokens/$TOKEN_ID"
log "oha: POST cryptogram (reference mode)"
run_oha oha_cryptogram POST "$API/api/network/tokens/$TOKEN_ID/cryptograms" \
    '{"type": "ecom", "mode": "reference", "amount": "10.00", "currency": "EUR"}'

FINAL_RSS=$(ps -o rss= -p "$TR_PID" | tr -d ' ')
kill -0 "$TR_PID" 2>/dev/null || die "tokenrelay died during the run; see $RUN/tokenrelay.log"
curl -fsS --max-time 5 "http://127.0.0.1:$TR_ADMIN_PORT/metrics" >"$RUN/metrics.txt" 2>/dev/null || true
python3 - "$OUT/tokenrelay_after.json" "$FINAL_RSS" "$RUN" <<'PY'
import json, sys, os
out, rss, run = sys.argv[1:]
log = os.path.join(run, "tokenrelay.log")
lines = open(log, errors="replace").read().splitlines()
levels = {}
for l in lines:
    try: lv = json.loads(l).get("level", "?")
    except Exception: lv = "non-json"
    levels[lv] = levels.get(lv, 0) + 1
metrics = {}
try:
    for l in open(os.path.join(run, "metrics.txt")):
        if l.startswith("#") or "_bucket" in l or not l.strip(): continue
        k, v = l.rsplit(" ", 1); metrics[k] = float(v)
except FileNotFoundError:
    pass
json.dump({"rss_kib_after_all_steps": int(rss), "log_lines": len(lines), "log_bytes": os.path.getsize(log),
           "log_levels": levels, "run_dir": run, "metrics": metrics}, open(out, "w"), indent=2)
PY

# --------------------------------------------------------------------------
# 5. Report
# --------------------------------------------------------------------------
VAULT="$VAULT" TR_LOG="$TR_LOG" \
python3 - "$OUT" "$RATE" "$DURATION" "$WARMUP" "$FIXED_THREADS" "$FIXED_CONNECTIONS" "$CLOSED_THREADS" "$CLOSED_CONNECTIONS" "$OHA_CONNECTIONS" >"$OUT/report.md" <<'PY'
import json, os, sys, datetime
out, rate, dur, warm, ft, fc, ct, cc, oc = sys.argv[1:]
J = lambda n: json.load(open(f"{out}/{n}.json"))
m, st, b = J("machine"), J("startup"), J("binary")
after = J("tokenrelay_after")
ms = lambda us: f"{us / 1000:.2f}"
T = ("direct", "nginx", "haproxy", "tokenrelay")
print(f"# tokenrelay load test — {datetime.datetime.now().isoformat(timespec='seconds')}\n")
print(f"**Machine:** nproc {m['nproc']}, {m['cpu_model']}, {m['mem_total_gib']} GiB RAM, kernel {m['kernel']}, "
      f"load avg at start {' '.join(m['loadavg_at_start'])} (shared machine: numbers are noisy). "
      f"Load generator, upstream and proxies all share these cores.\n")
print("Upstream: nginx (1 worker, TLS, keep-alive) answering `200 {\"approved\":true}` on 127.0.0.1:18443. "
      "Every request is the same POST with a JSON body holding `<< placeholders >>` (rendered by tokenrelay only). "
      "nginx proxy: 1 worker, keep-alive pool 64, proxy_ssl_verify on. haproxy 2.6: nbthread 1, http-reuse always, ssl verify required. "
      f"tokenrelay: {os.environ['VAULT']} vault, memory references, RUST_LOG={os.environ['TR_LOG']} "
      "(at info: one JSON line per request, to a file).\n")
print(f"## Fixed rate — target {rate} req/s, {dur} s (after {warm} s warm-up), wrk -t{ft} -c{fc}\n")
print("Paced with wrk's Lua `delay()` (per-connection delay = connections×1000/RATE ms, jittered uniformly ×[0.5,1.5]); "
      "latency is measured from request write to response, so this is **not** a coordinated-omission-corrected generator "
      "(wrk2/oha -q style): stalls delay the next send instead of counting as latency. tokenrelay: a fresh pre-minted reference per request.\n")
print("| target | achieved req/s | p50 ms | p90 ms | p99 ms | max ms | added p50 ms | added p90 ms | added p99 ms | non-2xx | socket errors | max RSS MiB |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
fx = {t: J(f"fixed_{t}") for t in T}
d0 = fx["direct"]["latency_us"]
for t in T:
    r = fx[t]; l = r["latency_us"]
    add = lambda p: "—" if t == "direct" else f"{(l[p] - d0[p]) / 1000:+.2f}"
    rss = f"{r['rss_max_kib'] / 1024:.1f}" if r["rss_max_kib"] else "—"
    extra = f" (409: {r['statuses'].get('409', 0)})" if t == "tokenrelay" else ""
    print(f"| {t} | {r['rps']:.0f} | {ms(l['p50'])} | {ms(l['p90'])} | {ms(l['p99'])} | {ms(l['max'])} | {add('p50')} | {add('p90')} | {add('p99')} | {r['non_2xx']}{extra} | {r['socket_errors']} | {rss} |")
print(f"\n## Closed loop — wrk -t{ct} -c{cc}, {dur} s\n")
print("| target | req/s | vs haproxy | p50 ms | p99 ms | non-2xx | socket errors | max RSS MiB | server CPU µs/req | upstream µs/req | wrk µs/req |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
cl = {t: J(f"closed_{t}") for t in T}
hp = cl["haproxy"]["rps"]
for t in T:
    r = cl[t]; l = r["latency_us"]
    rss = f"{r['rss_max_kib'] / 1024:.1f}" if r["rss_max_kib"] else "—"
    extra = f" (409: {r['statuses'].get('409', 0)}, pool exhausted: {r['pool_exhausted']})" if t == "tokenrelay" else ""
    up = "—" if t == "direct" else r["upstream_cpu_us_per_request"]
    print(f"| {t} | {r['rps']:.0f} | {r['rps'] / hp:.2f}× | {ms(l['p50'])} | {ms(l['p99'])} | {r['non_2xx']}{extra} | {r['socket_errors']} | {rss} "
          f"| {r['cpu_us_per_request']} | {up} | {r['generator_cpu_us_per_request']} |")
print(f"\nRSS = server process + direct children (nginx master+worker), sampled every 200 ms; 'direct' = the upstream nginx. "
      "CPU = user + system time from /proc/<pid>/stat over the run, per request answered: the server measured, the upstream nginx behind it, and wrk.\n")
print(f"## tokenrelay API — oha -c{oc} -z {dur}s (fixed headers)\n")
print("| request | req/s | p50 ms | p99 ms | non-2xx | errors |")
print("|---|---:|---:|---:|---:|---:|")
for n, label in (("oha_get_token", "GET /api/network/tokens/{id}"), ("oha_cryptogram", "POST …/cryptograms (reference)")):
    r = J(n); l = r["latency_us"]
    print(f"| {label} | {r['rps']:.0f} | {ms(l['p50'])} | {ms(l['p99'])} | {r['non_2xx']} | {sum(r['errors'].values()) if r['errors'] else 0} |")
print("\n## tokenrelay process\n")
print("| metric | value |")
print("|---|---:|")
print(f"| start-up to ready (spawn → /readyz 200) | {st['startup_to_ready_ms']} ms |")
print(f"| idle RSS after start | {st['idle_rss_kib'] / 1024:.1f} MiB ({st['idle_rss_kib']} KiB) |")
print(f"| of which anonymous / file-backed (binary text, shared page cache) | "
      f"{st['idle_rss_anon_kib'] / 1024:.1f} / {st['idle_rss_file_kib'] / 1024:.1f} MiB |")
print(f"| max RSS, fixed rate | {fx['tokenrelay']['rss_max_kib'] / 1024:.1f} MiB |")
print(f"| max RSS, closed-loop forward | {cl['tokenrelay']['rss_max_kib'] / 1024:.1f} MiB |")
print(f"| RSS after all steps | {after['rss_kib_after_all_steps'] / 1024:.1f} MiB |")
print(f"| release binary (as built, line-tables debug info) | {b['bytes']} B ({b['mib']} MiB) |")
if "stripped_bytes" in b:
    print(f"| release binary stripped (copy) | {b['stripped_bytes']} B ({b['stripped_mib']} MiB) |")
mf, mc = J("mint_fixed"), J("mint_closed")
print(f"| references pre-minted (fixed / closed) | {mf['minted']} / {mc['minted']} (Python, {mf['per_second']:.0f} / {mc['per_second']:.0f} per s) |")
print(f"| log lines written during the run | {after['log_lines']} ({after['log_bytes'] / 1048576:.1f} MiB) |")
print(f"| RSS after minting the fixed / closed pools | {mf['tokenrelay_rss_kib_after'] / 1024:.1f} / {mc['tokenrelay_rss_kib_after'] / 1024:.1f} MiB |")
mt = after.get("metrics", {})
if mt:
    print(f"| reference cache size at the end (metrics) | {mt.get('tokenrelay_reference_cache_size', 0):.0f} |")
    fs, fc = mt.get("tokenrelay_forward_duration_seconds_sum"), mt.get("tokenrelay_forward_duration_seconds_count")
    us, uc = mt.get("tokenrelay_upstream_duration_seconds_sum"), mt.get("tokenrelay_upstream_duration_seconds_count")
    if fc and uc:
        print(f"| mean forward / upstream duration (metrics, whole run) | {fs / fc * 1000:.3f} / {us / uc * 1000:.3f} ms |")
    # Cross-check: every 200 seen by wrk consumed exactly one reference.
    warm = J("warm_tokenrelay")
    ok200 = sum(int(r["statuses"].get("200", 0)) for r in (warm, fx["tokenrelay"], cl["tokenrelay"])) + 1  # +1 sanity
    cons = mt.get('tokenrelay_references_consumed_total', 0)
    print(f"| forwards answered 200 seen by wrk (warm-up+fixed+closed, +1 sanity) vs references_consumed_total | {ok200} vs {cons:.0f} "
          f"(diff {cons - ok200:.0f}: requests in flight when wrk stopped, ≤ connections; wrk does not count them) |")
    print(f"| references_refused_total (1 = the deliberate sanity replay) | {mt.get('tokenrelay_references_refused_total', 0):.0f} |")
PY
echo
cat "$OUT/report.md"
log "raw results: $OUT/*.json; logs: $RUN"
