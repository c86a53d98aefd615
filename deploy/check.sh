#!/usr/bin/env bash
# Offline checks of the deployment files (no Docker engine, no cluster, no
# registry): YAML parses; the ConfigMap's tokenrelay.toml only uses keys the
# shipped config documents (and the schema in src/config.rs knows); the
# Dockerfile's final stage is non-root and exposes both ports; the probes hit
# admin_listen's port; and the pieces reference each other consistently.
#
#   deploy/check.sh                  # from anywhere
#   TOKENRELAY_BIN=target/release/tokenrelay deploy/check.sh
#                                    # also runs `tokenrelay check-config`
#                                    # on the ConfigMap's TOML
#
# Exits 0 when every check passes, 1 otherwise (each failure is printed).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null; then
    echo "FAIL: $PYTHON 3.11+ is required (tomllib)" >&2
    exit 1
fi
if ! "$PYTHON" -c 'import yaml' 2>/dev/null; then
    echo "pyyaml missing; installing it (pip install --quiet pyyaml)" >&2
    "$PYTHON" -m pip install --quiet pyyaml >&2
fi

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

status=0
"$PYTHON" - "$ROOT" "$TMP" <<'PY' || status=$?
import ipaddress
import json
import os
import re
import shlex
import sys
import tomllib

import yaml

root, tmp = sys.argv[1], sys.argv[2]
SHIPPED = os.path.join(root, "config/tokenrelay.toml")
SCHEMA_RS = os.path.join(root, "src/config.rs")
K8S = os.path.join(root, "deploy/kubernetes")
DOCKERFILE = os.path.join(root, "Dockerfile")
DOCKERIGNORE = os.path.join(root, ".dockerignore")

failures = []


def fail(msg):
    failures.append(msg)
    print(f"FAIL: {msg}")


def ok(msg):
    print(f"ok:   {msg}")


def check(cond, good, bad):
    if cond:
        ok(good)
    else:
        fail(bad)
    return cond


# ---------------------------------------------------------------- YAML
docs = {}  # file -> list of documents
for name in sorted(os.listdir(K8S)):
    if not name.endswith((".yaml", ".yml")):
        continue
    path = os.path.join(K8S, name)
    try:
        with open(path) as f:
            docs[name] = [d for d in yaml.safe_load_all(f) if d is not None]
        ok(f"{name}: parses ({len(docs[name])} document(s))")
    except yaml.YAMLError as e:
        fail(f"{name}: YAML does not parse: {e}")
if not docs:
    fail(f"no YAML files in {K8S}")

objects = [(n, d) for n, ds in docs.items() for d in ds if isinstance(d, dict)]
for n, d in objects:
    if n == "kustomization.yaml":
        continue
    if not (d.get("apiVersion") and d.get("kind") and (d.get("metadata") or {}).get("name")):
        fail(f"{n}: an object lacks apiVersion, kind or metadata.name")


def find(kind, name=None):
    return [d for _, d in objects if d.get("kind") == kind
            and (name is None or d["metadata"].get("name") == name)]


# ------------------------------------------------------- kustomization
kust = docs.get("kustomization.yaml")
if check(bool(kust), "kustomization.yaml present", "kustomization.yaml missing"):
    listed = set(kust[0].get("resources") or [])
    present = {n for n in os.listdir(K8S)
               if n.endswith((".yaml", ".yml")) and n != "kustomization.yaml"}
    for r in sorted(listed - present):
        fail(f"kustomization.yaml lists {r}, which does not exist")
    check(present <= listed, "kustomization.yaml lists every manifest",
          f"kustomization.yaml does not list {sorted(present - listed)}")

# ------------------------------------------------------- shipped schema
def flatten(table, prefix=""):
    """Dotted key paths; arrays of tables use `name[]`."""
    out = set()
    for k, v in table.items():
        p = f"{prefix}{k}"
        if isinstance(v, dict):
            out |= flatten(v, p + ".")
        elif isinstance(v, list) and v and all(isinstance(i, dict) for i in v):
            for item in v:
                out |= flatten(item, p + "[].")
        else:
            out.add(p)
    return out


def documented_keys(path):
    """Active keys plus keys shown commented out (`# key = value`), in their
    (possibly commented) section."""
    with open(path, "rb") as f:
        keys = flatten(tomllib.load(f))
    section = ""
    with open(path) as f:
        for line in f:
            s = line.strip()
            m = re.match(r"^(#\s*)?\[(\[)?\s*([A-Za-z0-9_.-]+)\s*\]\]?\s*(#.*)?$", s)
            if m:
                section = m.group(3) + ("[]" if m.group(2) else "")
                continue
            m = re.match(r"^#\s*([A-Za-z0-9_-]+)\s*=\s*\S", s)
            if m:
                keys.add(f"{section}.{m.group(1)}" if section else m.group(1))
    return keys


def schema_keys(path):
    """Fields of the Raw* serde structs (deny_unknown_fields) in config.rs."""
    with open(path) as f:
        src = f.read()
    structs = {}
    for m in re.finditer(r"struct\s+(Raw\w+)\s*\{(.*?)\n\}", src, re.S):
        fields = {}
        for fm in re.finditer(r"^\s*(?:pub\s+)?(\w+)\s*:\s*([^,\n]+),", m.group(2), re.M):
            fields[fm.group(1)] = fm.group(2)
        structs[m.group(1)] = fields

    def walk(struct, prefix, seen):
        out = set()
        for field, ty in structs.get(struct, {}).items():
            inner = re.search(r"\b(Raw\w+)\b", ty)
            if inner and inner.group(1) in structs and inner.group(1) not in seen:
                suffix = "[]" if ty.strip().startswith("Vec<") else ""
                out |= walk(inner.group(1), f"{prefix}{field}{suffix}.", seen | {inner.group(1)})
            else:
                out.add(prefix + field)
        return out

    return walk("RawConfig", "", {"RawConfig"})


shipped_keys = documented_keys(SHIPPED)
check(len(shipped_keys) > 10, f"config/tokenrelay.toml documents {len(shipped_keys)} keys",
      "could not read the documented keys of config/tokenrelay.toml")
schema = schema_keys(SCHEMA_RS) if os.path.exists(SCHEMA_RS) else None
if schema is not None:
    check(len(schema) > 10, f"src/config.rs schema has {len(schema)} keys",
          "could not extract the Raw* structs from src/config.rs (update deploy/check.sh)")

# -------------------------------------------------------- ConfigMap TOML
cfg = None
config_maps = [d for d in find("ConfigMap") if "tokenrelay.toml" in (d.get("data") or {})]
if check(len(config_maps) == 1, "one ConfigMap carries tokenrelay.toml",
         f"expected one ConfigMap with data['tokenrelay.toml'], found {len(config_maps)}"):
    cm = config_maps[0]
    text = cm["data"]["tokenrelay.toml"]
    with open(os.path.join(tmp, "tokenrelay.toml"), "w") as f:
        f.write(text)
    try:
        cfg = tomllib.loads(text)
        ok("ConfigMap tokenrelay.toml is valid TOML")
    except tomllib.TOMLDecodeError as e:
        fail(f"ConfigMap tokenrelay.toml is not valid TOML: {e}")

if cfg is not None:
    keys = flatten(cfg)
    undocumented = sorted(keys - shipped_keys)
    check(not undocumented, "every ConfigMap key is documented in config/tokenrelay.toml",
          f"ConfigMap keys not documented (as `key = …`) in config/tokenrelay.toml: {undocumented}")
    if schema:
        unknown = sorted(keys - schema)
        check(not unknown, "every ConfigMap key exists in the config schema (src/config.rs)",
              f"ConfigMap keys unknown to src/config.rs (tokenrelay would refuse to start): {unknown}")

    # Values the schema constrains.
    def in_set(key, value, allowed):
        if value is not None and value not in allowed:
            fail(f"ConfigMap {key} = {value!r}, expected one of {sorted(allowed)}")

    in_set("compliance_level", cfg.get("compliance_level"), {"saq-a", "saq-d", "roc"})
    in_set("placeholder_syntax", cfg.get("placeholder_syntax"), {"angle", "braces"})
    in_set("tsp", cfg.get("tsp"), {"sandbox"})
    in_set("vault.backend", cfg.get("vault", {}).get("backend"), {"memory", "sqlite", "postgres"})
    in_set("references.backend", cfg.get("references", {}).get("backend"), {"memory", "redis"})
    for i, k in enumerate(cfg.get("api_keys", [])):
        if not re.fullmatch(r"sha256:[0-9a-fA-F]{64}", str(k.get("hash", ""))):
            fail(f"ConfigMap api_keys[{i}].hash is not sha256:<64 hex digits>")
        bad = set(k.get("scopes", [])) - {"tokens", "cryptograms", "forward", "admin"}
        if bad:
            fail(f"ConfigMap api_keys[{i}].scopes has unknown scopes {sorted(bad)}")
    if cfg.get("vault", {}).get("create_key_file"):
        fail("ConfigMap vault.create_key_file = true: production must provision the master key")
    if not cfg.get("destinations"):
        fail("ConfigMap has no [[destinations]]: every forward would be refused")

UNITS = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1, "sec": 1, "secs": 1, "second": 1,
         "seconds": 1, "m": 60, "min": 60, "mins": 60, "minute": 60, "minutes": 60,
         "h": 3600, "hr": 3600, "hrs": 3600, "hour": 3600, "hours": 3600, "d": 86400,
         "day": 86400, "days": 86400}


def seconds(value):
    parts = re.findall(r"(\d+)\s*([a-z]+)", value)
    if not parts or re.sub(r"(\d+)\s*([a-z]+)", "", value).strip():
        raise ValueError(value)
    return sum(int(n) * UNITS[u] for n, u in parts)


def addr(key, default):
    v = (cfg or {}).get(key, default)
    m = re.fullmatch(r"\[?([0-9a-fA-F.:]+?)\]?:(\d+)", v)
    if not m:
        fail(f"ConfigMap {key} = {v!r} is not IP:port")
        return None, None
    try:
        return ipaddress.ip_address(m.group(1)), int(m.group(2))
    except ValueError:
        fail(f"ConfigMap {key} = {v!r} is not IP:port")
        return None, None


listen_ip, listen_port = addr("listen", "127.0.0.1:8080")
admin_ip, admin_port = addr("admin_listen", "127.0.0.1:9090")
if listen_ip is not None:
    check(listen_ip.is_loopback, f"listen {listen_ip}:{listen_port} is pod-local (loopback)",
          f"listen {listen_ip}:{listen_port} is not loopback: the API would be reachable from the cluster")
if admin_ip is not None:
    check(not admin_ip.is_loopback, f"admin_listen {admin_ip}:{admin_port} is reachable by kubelet probes",
          f"admin_listen {admin_ip}:{admin_port} is loopback: kubelet probes (sent to the pod IP) would fail")

shutdown_grace = 30.0
if cfg is not None:
    durations = {k: v for k, v in (("reference_ttl", cfg.get("reference_ttl")),
                                   ("idempotency_ttl", cfg.get("idempotency_ttl")),
                                   ("header_read_timeout", cfg.get("header_read_timeout")),
                                   ("shutdown_grace", cfg.get("shutdown_grace")))
                 if v is not None}
    durations.update({f"upstream.{k}": v for k, v in cfg.get("upstream", {}).items()
                      if k.endswith("timeout")})
    for k, v in durations.items():
        try:
            s = seconds(v)
            if s <= 0:
                fail(f"ConfigMap {k} = {v!r} must be greater than zero")
            if k == "shutdown_grace":
                shutdown_grace = s
        except (ValueError, KeyError):
            fail(f"ConfigMap {k} = {v!r} is not a duration")

# ------------------------------------------------------------ Deployment
deployments = find("Deployment")
pod = None
if check(len(deployments) == 1, "one Deployment", f"expected one Deployment, found {len(deployments)}"):
    pod = deployments[0]["spec"]["template"]["spec"]

tr = None
if pod is not None:
    inits = pod.get("initContainers") or []
    mains = pod.get("containers") or []
    cands = [(c, True) for c in inits if c.get("name") == "tokenrelay"] + \
            [(c, False) for c in mains if c.get("name") == "tokenrelay"]
    if check(len(cands) == 1, "Deployment has one tokenrelay container",
             "Deployment has no (or several) container named tokenrelay"):
        tr, is_init = cands[0]
        if is_init:
            check(tr.get("restartPolicy") == "Always",
                  "tokenrelay is a native sidecar (init container, restartPolicy: Always)",
                  "tokenrelay is an init container without restartPolicy: Always: it would block the pod")
    apps = [c for c in mains if c.get("name") != "tokenrelay"]
    check(bool(apps), "Deployment has the merchant app container", "no merchant app container")

if tr is not None:
    named = {p.get("name"): p.get("containerPort") for p in tr.get("ports") or []}

    def probe_port(probe):
        h = (probe or {}).get("httpGet") or {}
        p = h.get("port")
        return named.get(p) if isinstance(p, str) else p, h.get("path")

    for kind, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz"),
                       ("startupProbe", None)):
        if kind not in tr:
            if kind != "startupProbe":
                fail(f"tokenrelay has no {kind}")
            continue
        port, got = probe_port(tr[kind])
        if admin_port is not None:
            check(port == admin_port, f"tokenrelay {kind} uses admin_listen's port {admin_port}",
                  f"tokenrelay {kind} port {port!r} does not match admin_listen's port {admin_port}")
        if path:
            check(got == path, f"tokenrelay {kind} path is {path}",
                  f"tokenrelay {kind} path is {got!r}, expected {path}")
        elif got not in ("/healthz", "/readyz"):
            fail(f"tokenrelay {kind} path {got!r} is neither /healthz nor /readyz")

    sc = tr.get("securityContext") or {}
    psc = pod.get("securityContext") or {}
    check(sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True,
          "tokenrelay runAsNonRoot", "tokenrelay securityContext lacks runAsNonRoot: true")
    if sc.get("runAsUser", psc.get("runAsUser")) == 0:
        fail("tokenrelay runAsUser is 0")
    check(sc.get("readOnlyRootFilesystem") is True, "tokenrelay readOnlyRootFilesystem",
          "tokenrelay securityContext lacks readOnlyRootFilesystem: true")
    check(sc.get("allowPrivilegeEscalation") is False, "tokenrelay allowPrivilegeEscalation false",
          "tokenrelay securityContext lacks allowPrivilegeEscalation: false")
    check("ALL" in ((sc.get("capabilities") or {}).get("drop") or []),
          "tokenrelay drops ALL capabilities", "tokenrelay does not drop ALL capabilities")
    res = tr.get("resources") or {}
    check(bool(res.get("requests")) and bool(res.get("limits")),
          "tokenrelay has resource requests and limits", "tokenrelay lacks resource requests/limits")

    # Master key from a Secret that exists and has that key.
    env = {e.get("name"): e for e in tr.get("env") or []}
    ref = ((env.get("TOKENRELAY_MASTER_KEY") or {}).get("valueFrom") or {}).get("secretKeyRef")
    if check(bool(ref), "TOKENRELAY_MASTER_KEY comes from a secretKeyRef",
             "tokenrelay env TOKENRELAY_MASTER_KEY is not a secretKeyRef"):
        secs = find("Secret", ref.get("name"))
        has = secs and ref.get("key") in {**(secs[0].get("data") or {}), **(secs[0].get("stringData") or {})}
        check(bool(has), f"Secret {ref.get('name')} has key {ref.get('key')}",
              f"secretKeyRef {ref.get('name')}/{ref.get('key')} matches no Secret in deploy/kubernetes")
    for e in tr.get("env") or []:
        if "value" in e and re.search(r"KEY|PASSWORD|SECRET", e.get("name", "")):
            fail(f"tokenrelay env {e['name']} has a literal value: secrets come from Secrets")

    # Config path: args (or the Dockerfile's CMD) → a ConfigMap mount.
    volumes = {v.get("name"): v for v in pod.get("volumes") or []}
    mounts = {m.get("mountPath").rstrip("/"): m for m in tr.get("volumeMounts") or []}
    args = tr.get("args")
    cfg_path = None
    if args and "--config" in args and args.index("--config") + 1 < len(args):
        cfg_path = args[args.index("--config") + 1]
    else:
        cfg_path = "/etc/tokenrelay/tokenrelay.toml"  # the Dockerfile's CMD, checked below
    cfg_dir, cfg_file = os.path.split(cfg_path)
    m = mounts.get(cfg_dir)
    vol = volumes.get(m.get("name")) if m else None
    cmv = (vol or {}).get("configMap")
    good = bool(cmv) and config_maps and cmv.get("name") == config_maps[0]["metadata"]["name"]
    if good and cmv.get("items"):
        good = any(i.get("key") == "tokenrelay.toml" and i.get("path") == cfg_file for i in cmv["items"])
    elif good:
        good = cfg_file == "tokenrelay.toml"
    check(bool(good), f"{cfg_path} is the ConfigMap's tokenrelay.toml",
          f"--config {cfg_path} is not provided by the tokenrelay ConfigMap mount")

    # Writable paths under readOnlyRootFilesystem.
    writable = [p for p, mm in mounts.items()
                if not mm.get("readOnly") and "configMap" not in (volumes.get(mm.get("name")) or {})
                and "secret" not in (volumes.get(mm.get("name")) or {})]
    vault = (cfg or {}).get("vault", {})
    if vault.get("backend", "sqlite") == "sqlite":
        vpath = vault.get("path", "data/tokenrelay.db")
        check(os.path.isabs(vpath) and any(vpath.startswith(p + "/") for p in writable),
              f"SQLite vault {vpath} is on a writable volume",
              f"SQLite vault path {vpath!r} is not under a writable volume mount {writable} "
              "(the root filesystem is read-only)")

    # Grace period covers the merchant's preStop plus tokenrelay's drain.
    tgps = pod.get("terminationGracePeriodSeconds", 30)
    pre = 0
    for c in apps:
        cmd = (((c.get("lifecycle") or {}).get("preStop") or {}).get("exec") or {}).get("command") or []
        slp = (((c.get("lifecycle") or {}).get("preStop") or {}).get("sleep") or {}).get("seconds")
        if slp:
            pre = max(pre, int(slp))
        elif len(cmd) >= 2 and cmd[0].endswith("sleep") and cmd[-1].isdigit():
            pre = max(pre, int(cmd[-1]))
        elif cmd:
            pre = max(pre, 0)
        else:
            fail(f"merchant container {c.get('name')} has no preStop hook")
    check(tgps > pre + shutdown_grace,
          f"terminationGracePeriodSeconds {tgps} > preStop {pre}s + shutdown_grace {shutdown_grace:g}s",
          f"terminationGracePeriodSeconds {tgps} does not exceed preStop {pre}s + shutdown_grace "
          f"{shutdown_grace:g}s: tokenrelay would be SIGKILLed mid-drain")

# ------------------------------------------------------------ Dockerfile
def dockerfile_instructions(path):
    out, buf = [], ""
    with open(path) as f:
        for raw in f:
            line = raw.rstrip("\n")
            if not buf and (line.strip().startswith("#") or not line.strip()):
                continue
            if line.strip().startswith("#"):
                continue
            if line.rstrip().endswith("\\"):
                buf += line.rstrip()[:-1] + " "
                continue
            buf += line
            parts = buf.strip().split(None, 1)
            out.append((parts[0].upper(), parts[1] if len(parts) > 1 else ""))
            buf = ""
    return out


def words(arg):
    arg = arg.strip()
    if arg.startswith("["):
        try:
            return json.loads(arg)
        except ValueError:
            pass
    return shlex.split(arg)


if check(os.path.exists(DOCKERFILE), "Dockerfile present", "Dockerfile missing"):
    ins = dockerfile_instructions(DOCKERFILE)
    froms = [i for i, (k, _) in enumerate(ins) if k == "FROM"]
    check(len(froms) >= 2, f"Dockerfile is multi-stage ({len(froms)} stages)",
          "Dockerfile is not multi-stage")
    builds = " ".join(a for k, a in ins if k == "RUN")
    check("cargo build --release --locked" in builds, "builder runs cargo build --release --locked",
          "no `cargo build --release --locked` in the Dockerfile")
    if froms:
        final = ins[froms[-1]:]
        base = words(final[0][1])[0]
        users = [words(a)[0] for k, a in final if k == "USER"]
        user = users[-1] if users else ("nonroot" if base.endswith(":nonroot") else "root")
        check(user.split(":")[0] not in ("root", "0"), f"final stage runs as {user!r} (non-root)",
              f"final stage runs as {user!r}: it must be non-root")
        exposed = set()
        for k, a in final:
            if k == "EXPOSE":
                exposed |= {int(p.split("/")[0]) for p in a.split()}
        for what, port in (("listen", listen_port), ("admin_listen", admin_port)):
            if port is not None:
                check(port in exposed, f"Dockerfile EXPOSEs {port} ({what})",
                      f"Dockerfile final stage does not EXPOSE {port} ({what}); exposed: {sorted(exposed)}")
        for port in (8080, 9090):
            if port not in exposed and port not in (listen_port, admin_port):
                fail(f"Dockerfile final stage does not EXPOSE {port}")
        ep = [words(a) for k, a in final if k == "ENTRYPOINT"]
        cmd = [words(a) for k, a in final if k == "CMD"]
        check(ep and ep[-1] == ["/usr/local/bin/tokenrelay"], "ENTRYPOINT is /usr/local/bin/tokenrelay",
              f"unexpected ENTRYPOINT {ep[-1] if ep else None}")
        check(cmd and cmd[-1] == ["serve", "--config", "/etc/tokenrelay/tokenrelay.toml"],
              "CMD serves /etc/tokenrelay/tokenrelay.toml", f"unexpected CMD {cmd[-1] if cmd else None}")
        copies = [words(a) for k, a in final if k == "COPY"]
        check(any(c[-1] == "/etc/tokenrelay/tokenrelay.toml" and c[-2] == "config/tokenrelay.toml"
                  for c in copies if len(c) >= 2),
              "final stage ships config/tokenrelay.toml at /etc/tokenrelay/tokenrelay.toml",
              "final stage does not COPY config/tokenrelay.toml to /etc/tokenrelay/tokenrelay.toml")
        if tr is not None and tr.get("image", "").split(":")[0].split("/")[-1] != "tokenrelay":
            fail(f"tokenrelay container image {tr.get('image')!r} is not the tokenrelay image")

if check(os.path.exists(DOCKERIGNORE), ".dockerignore present", ".dockerignore missing"):
    with open(DOCKERIGNORE) as f:
        entries = {l.strip().strip("/") for l in f if l.strip() and not l.startswith("#")}
    for e in ("target", "data", ".git"):
        check(e in entries, f".dockerignore excludes {e}/", f".dockerignore does not exclude {e}/")

print()
if failures:
    print(f"{len(failures)} check(s) failed")
    sys.exit(1)
print("all checks passed")
PY

# Optional, offline: kustomize renders the directory (kubectl is client-only
# here; nothing is sent to a cluster).
if command -v kubectl >/dev/null 2>&1; then
    if out="$(kubectl kustomize "$ROOT/deploy/kubernetes" 2>&1 >/dev/null)"; then
        echo "ok:   kubectl kustomize renders deploy/kubernetes"
    else
        echo "FAIL: kubectl kustomize deploy/kubernetes: $out"
        status=1
    fi
fi

# Optional: the real validator, when a built binary is at hand (CI after
# `cargo build`). Secrets are not needed: check-config opens no vault.
if [[ $status -eq 0 && -n "${TOKENRELAY_BIN:-}" ]]; then
    if out="$("$TOKENRELAY_BIN" check-config --config "$TMP/tokenrelay.toml" 2>&1)"; then
        echo "ok:   tokenrelay check-config: $out"
    else
        echo "FAIL: tokenrelay check-config rejects the ConfigMap's tokenrelay.toml: $out"
        status=1
    fi
elif [[ $status -eq 0 ]]; then
    echo "(set TOKENRELAY_BIN=path/to/tokenrelay to also run check-config on the ConfigMap)"
fi
exit "$status"
