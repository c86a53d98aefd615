#!/usr/bin/env python3
"""Self time of a perf.data by component, in % and in µs per request
(docs/performance.md's profile tables; `PROFILE=1 python3 scripts/load.py`
writes target/load/perf.data).

python3 scripts/perf_split.py target/load/perf.data CPU_US_PER_REQ
Components are matched on the demangled symbol (first match wins)."""
import re, subprocess, sys
from collections import Counter
data, us = sys.argv[1], float(sys.argv[2])
out = subprocess.run(["perf", "report", "-i", data, "--stdio", "--no-children", "--sort", "dso,symbol",
                      "-g", "none", "--percent-limit", "0"], capture_output=True, text=True).stdout
RULES = [
    ("kernel: scheduler, wake-ups, idle", r"\[k\] (finish_task_switch|_raw_spin_unlock_irqrestore|schedule|__schedule|try_to_wake_up|ttwu|select_task|enqueue|dequeue|pick_next|update_curr|psi_|irqentry|raw_spin)"),
    ("kernel: TCP/IP, sockets, epoll, syscalls", r"\[k\] "),
    ("libc: memmove/memcpy/memcmp", r"libc\.so.*\[\.\] __mem"),
    ("libc: other (writev, read, epoll_wait, clock)", r"libc\.so|\[vdso\]"),
    ("allocator (mimalloc)", r"\[\.\] _?mi_|mimalloc"),
    ("rustls + ring (TLS record, AES-GCM)", r"rustls::|ring::|ring_core|aes_|gcm_|chacha"),
    ("reference store (take/issue; moka before)", r"tokenrelay::references|moka::|crossbeam_epoch"),
    ("template parse + render", r"tokenrelay::template"),
    ("redaction", r"tokenrelay::forward::redact"),
    ("telemetry: access line, metrics", r"tokenrelay::telemetry|prometheus"),
    ("forward: checks, headers, destination, relay", r"tokenrelay::forward"),
    ("api dispatch, auth, server, audit", r"tokenrelay::(api|auth|server|audit|body|lib)|tokenrelay::\{\{|sha2|Sha256"),
    ("hyper + hyper-util + http (both sides)", r"hyper|http::|httparse|h2::"),
    ("tokio runtime, channels, timers", r"tokio::|futures_|mio::"),
    ("bytes", r"bytes::"),
    ("other tokenrelay", r"tokenrelay::"),
    ("std / core / other", r""),
]
totals = Counter()
for line in out.splitlines():
    m = re.match(r"\s+([\d.]+)%\s+(\S+)\s+(.*)", line)
    if not m:
        continue
    pct, dso, sym = float(m.group(1)), m.group(2), m.group(3)
    text = f"{dso} {sym}"
    for name, rx in RULES:
        if re.search(rx, text):
            totals[name] += pct
            break
print("| component (self time) | % of samples | µs per forward |")
print("|---|---:|---:|")
for name, _ in RULES:
    if totals[name]:
        print(f"| {name} | {totals[name]:.1f} | {totals[name] * us / 100:.1f} |")
print(f"| total | {sum(totals.values()):.1f} | {sum(totals.values()) * us / 100:.1f} |")
