//! The deployment files (deploy/kubernetes, Dockerfile, .dockerignore)
//! against the real config parser and against each other, offline: no
//! Docker engine, cluster or registry.
//!
//! The ConfigMap's `tokenrelay.toml` goes through [`Config::parse`] and the
//! forwarder's TLS set-up, as `tokenrelay check-config` does, so the schema
//! is the code's own rather than a copy of it. The values the manifests
//! must agree with (ports, `shutdown_grace`, the vault path) are read from
//! the parsed [`Config`]. The manifests' Kubernetes schema is checked by a
//! real validator in `.ci/run` (`kubernetes-validate`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use serde::Deserialize;
use serde_json::Value;
use tokenrelay::config::{Config, VaultBackend};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn k8s() -> PathBuf {
    root().join("deploy/kubernetes")
}

/// Every YAML document of every file in deploy/kubernetes, by file name.
fn manifests() -> Vec<(String, Value)> {
    let mut out = Vec::new();
    let mut names: Vec<_> = std::fs::read_dir(k8s())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".yaml") || n.ends_with(".yml"))
        .collect();
    names.sort();
    assert!(!names.is_empty(), "no manifests in deploy/kubernetes");
    for name in names {
        let text = std::fs::read_to_string(k8s().join(&name)).unwrap();
        for doc in serde_norway::Deserializer::from_str(&text) {
            let v = Value::deserialize(doc).unwrap_or_else(|e| panic!("{name}: {e}"));
            if !v.is_null() {
                out.push((name.clone(), v));
            }
        }
    }
    out
}

fn objects(kind: &str) -> Vec<Value> {
    manifests()
        .into_iter()
        .map(|(_, v)| v)
        .filter(|v| v["kind"] == kind)
        .collect()
}

fn one(kind: &str) -> Value {
    let mut all = objects(kind);
    assert_eq!(all.len(), 1, "expected one {kind}");
    all.remove(0)
}

/// The ConfigMap's `tokenrelay.toml`.
fn configmap_toml() -> String {
    let maps: Vec<_> = objects("ConfigMap")
        .into_iter()
        .filter(|m| m["data"]["tokenrelay.toml"].is_string())
        .collect();
    assert_eq!(maps.len(), 1, "one ConfigMap carries tokenrelay.toml");
    maps[0]["data"]["tokenrelay.toml"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// The ConfigMap's config, parsed and validated by tokenrelay itself.
fn deployed_config() -> Config {
    Config::parse(&configmap_toml())
        .unwrap_or_else(|e| panic!("tokenrelay refuses the ConfigMap's tokenrelay.toml: {e}"))
}

fn str_of(v: &Value) -> &str {
    v.as_str().unwrap_or_default()
}

#[tokio::test]
async fn the_configmap_config_is_accepted_by_the_real_parser() {
    let config = deployed_config();
    // The rest of check-config: TLS files and the allow-list load.
    let metrics = Arc::new(tokenrelay::telemetry::Metrics::new());
    if let Err(e) = tokenrelay::forward::Forwarder::new(&config, metrics) {
        panic!("the ConfigMap's destinations do not load: {e}");
    }
    assert!(
        !config.destinations.is_empty(),
        "no [[destinations]]: every forward would be refused"
    );
    assert!(
        !config.vault.create_key_file,
        "vault.create_key_file = true: production must provision the master key"
    );
}

#[test]
fn the_binary_check_config_accepts_the_configmap_config() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenrelay.toml");
    std::fs::write(&path, configmap_toml()).unwrap();
    let key =
        base64::engine::general_purpose::STANDARD.encode(tokenrelay::crypto::random_bytes::<32>());
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tokenrelay"))
        .args(["check-config", "--config"])
        .arg(&path)
        .current_dir(dir.path())
        // As the Deployment gives it, from the tokenrelay-master-key Secret.
        .env("TOKENRELAY_MASTER_KEY", format!("k1:{key}"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "check-config: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Dotted key paths of a TOML table; arrays of tables as `name[]`.
fn flatten(table: &toml::Table, prefix: &str, out: &mut BTreeSet<String>) {
    for (k, v) in table {
        let path = format!("{prefix}{k}");
        match v {
            toml::Value::Table(t) => flatten(t, &format!("{path}."), out),
            toml::Value::Array(items)
                if !items.is_empty() && items.iter().all(|i| i.is_table()) =>
            {
                for i in items {
                    flatten(i.as_table().unwrap(), &format!("{path}[]."), out);
                }
            }
            _ => {
                out.insert(path);
            }
        }
    }
}

/// Keys config/tokenrelay.toml documents: set, or shown commented out
/// (`# key = value`) in their (possibly commented) section.
fn documented_keys() -> BTreeSet<String> {
    let text = std::fs::read_to_string(root().join("config/tokenrelay.toml")).unwrap();
    let mut keys = BTreeSet::new();
    flatten(&text.parse::<toml::Table>().unwrap(), "", &mut keys);
    let mut section = String::new();
    for line in text.lines() {
        let s = line.trim().trim_start_matches('#').trim();
        if let Some(name) = s.strip_prefix("[[").and_then(|r| r.split("]]").next()) {
            section = format!("{}[]", name.trim());
        } else if let Some(name) = s.strip_prefix('[').and_then(|r| r.split(']').next()) {
            section = name.trim().to_owned();
        } else if line.trim().starts_with('#') {
            let Some((key, value)) = s.split_once('=') else {
                continue;
            };
            let key = key.trim();
            let is_key = !key.is_empty()
                && key
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            if is_key && !value.trim().is_empty() {
                keys.insert(if section.is_empty() {
                    key.to_owned()
                } else {
                    format!("{section}.{key}")
                });
            }
        }
    }
    keys
}

#[test]
fn every_configmap_key_is_documented_in_the_shipped_config() {
    let mut used = BTreeSet::new();
    flatten(
        &configmap_toml().parse::<toml::Table>().unwrap(),
        "",
        &mut used,
    );
    let documented = documented_keys();
    assert!(documented.len() > 10, "{documented:?}");
    let missing: Vec<_> = used.difference(&documented).collect();
    assert!(
        missing.is_empty(),
        "ConfigMap keys not documented (as `key = …`) in config/tokenrelay.toml: {missing:?}"
    );
}

#[test]
fn the_kustomization_lists_every_manifest() {
    let kust = one("Kustomization");
    let listed: BTreeSet<&str> = kust["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(str_of)
        .collect();
    let present: BTreeSet<String> = manifests()
        .into_iter()
        .map(|(n, _)| n)
        .filter(|n| n != "kustomization.yaml")
        .collect();
    let present: BTreeSet<&str> = present.iter().map(String::as_str).collect();
    assert_eq!(listed, present);
    for (name, v) in manifests() {
        if name != "kustomization.yaml" {
            assert!(
                v["apiVersion"].is_string()
                    && v["kind"].is_string()
                    && v["metadata"]["name"].is_string(),
                "{name}: an object lacks apiVersion, kind or metadata.name"
            );
        }
    }
}

/// The pod spec and the tokenrelay container (a native sidecar: an init
/// container with `restartPolicy: Always`).
fn pod_and_sidecar() -> (Value, Value) {
    let pod = one("Deployment")["spec"]["template"]["spec"].clone();
    let inits = pod["initContainers"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let mains = pod["containers"].as_array().cloned().unwrap_or_default();
    let mut found: Vec<(Value, bool)> = inits
        .into_iter()
        .filter(|c| c["name"] == "tokenrelay")
        .map(|c| (c, true))
        .chain(
            mains
                .into_iter()
                .filter(|c| c["name"] == "tokenrelay")
                .map(|c| (c, false)),
        )
        .collect();
    assert_eq!(found.len(), 1, "one container named tokenrelay");
    let (tr, is_init) = found.remove(0);
    if is_init {
        assert_eq!(
            tr["restartPolicy"], "Always",
            "an init container without restartPolicy: Always blocks the pod"
        );
    }
    (pod, tr)
}

#[test]
fn listeners_and_probes_match_the_config() {
    let config = deployed_config();
    assert!(
        config.listen.ip().is_loopback(),
        "listen {} would be reachable from the cluster",
        config.listen
    );
    assert!(
        !config.admin_listen.ip().is_loopback(),
        "admin_listen {} is loopback: kubelet probes (to the pod IP) would fail",
        config.admin_listen
    );
    let (_, tr) = pod_and_sidecar();
    let named: HashMap<&str, u64> = tr["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (str_of(&p["name"]), p["containerPort"].as_u64().unwrap()))
        .collect();
    let ports: BTreeSet<u64> = named.values().copied().collect();
    for port in [config.listen.port(), config.admin_listen.port()] {
        assert!(ports.contains(&u64::from(port)), "containerPort {port}");
    }
    for (probe, path) in [
        ("readinessProbe", Some("/readyz")),
        ("livenessProbe", Some("/healthz")),
        ("startupProbe", None),
    ] {
        let get = &tr[probe]["httpGet"];
        if probe == "startupProbe" && tr[probe].is_null() {
            continue;
        }
        assert!(get.is_object(), "tokenrelay has no {probe}");
        let port = match &get["port"] {
            Value::String(name) => named[name.as_str()],
            p => p.as_u64().unwrap(),
        };
        assert_eq!(
            port,
            u64::from(config.admin_listen.port()),
            "{probe} is not on admin_listen's port"
        );
        let got = str_of(&get["path"]);
        match path {
            Some(p) => assert_eq!(got, p, "{probe}"),
            None => assert!(["/healthz", "/readyz"].contains(&got), "{probe} {got}"),
        }
    }
}

#[test]
fn the_sidecar_is_locked_down() {
    let (pod, tr) = pod_and_sidecar();
    let sc = &tr["securityContext"];
    let psc = &pod["securityContext"];
    let either = |k: &str| {
        if sc[k].is_null() {
            psc[k].clone()
        } else {
            sc[k].clone()
        }
    };
    assert_eq!(either("runAsNonRoot"), true);
    assert_ne!(either("runAsUser"), 0);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert!(sc["capabilities"]["drop"]
        .as_array()
        .is_some_and(|d| d.iter().any(|c| c == "ALL")));
    assert!(tr["resources"]["requests"].is_object() && tr["resources"]["limits"].is_object());
    assert!(tr["image"].as_str().is_some_and(|i| i
        .split(':')
        .next()
        .unwrap()
        .ends_with("tokenrelay")));
}

#[test]
fn secrets_come_from_secrets() {
    let (_, tr) = pod_and_sidecar();
    let env = tr["env"].as_array().cloned().unwrap_or_default();
    for e in &env {
        let name = str_of(&e["name"]);
        let secret_like = ["KEY", "PASSWORD", "SECRET"]
            .iter()
            .any(|w| name.contains(w));
        assert!(
            !secret_like || e["value"].is_null(),
            "env {name} has a literal value: secrets come from Secrets"
        );
    }
    let master = env
        .iter()
        .find(|e| e["name"] == "TOKENRELAY_MASTER_KEY")
        .expect("TOKENRELAY_MASTER_KEY is set");
    let r = &master["valueFrom"]["secretKeyRef"];
    let secrets = objects("Secret");
    let secret = secrets
        .iter()
        .find(|s| s["metadata"]["name"] == r["name"])
        .unwrap_or_else(|| panic!("no Secret {}", r["name"]));
    let key = str_of(&r["key"]);
    assert!(
        !secret["data"][key].is_null() || !secret["stringData"][key].is_null(),
        "Secret {} has no key {key}",
        r["name"]
    );
}

/// Mount path -> volume, for the tokenrelay container.
fn mounts(pod: &Value, tr: &Value) -> Vec<(String, Value, bool)> {
    let volumes = pod["volumes"].as_array().cloned().unwrap_or_default();
    tr["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let vol = volumes
                .iter()
                .find(|v| v["name"] == m["name"])
                .unwrap_or_else(|| panic!("no volume {}", m["name"]))
                .clone();
            (
                str_of(&m["mountPath"]).trim_end_matches('/').to_owned(),
                vol,
                m["readOnly"] == true,
            )
        })
        .collect()
}

#[test]
fn the_config_path_is_the_configmap_and_the_vault_is_writable() {
    let (pod, tr) = pod_and_sidecar();
    let args: Vec<&str> = tr["args"]
        .as_array()
        .map(|a| a.iter().map(str_of).collect())
        .unwrap_or_default();
    // Without args, the Dockerfile's CMD (checked below) names this path.
    let path = args
        .iter()
        .position(|a| *a == "--config")
        .and_then(|i| args.get(i + 1).copied())
        .unwrap_or("/etc/tokenrelay/tokenrelay.toml");
    let (dir, file) = path.rsplit_once('/').unwrap();
    let mounts = mounts(&pod, &tr);
    let (_, vol, _) = mounts
        .iter()
        .find(|(p, _, _)| p == dir)
        .unwrap_or_else(|| panic!("nothing mounted at {dir}"));
    let cm = &vol["configMap"];
    let cm_name = one("ConfigMap")["metadata"]["name"].clone();
    assert_eq!(cm["name"], cm_name, "{dir} is not the tokenrelay ConfigMap");
    match cm["items"].as_array() {
        Some(items) => assert!(items
            .iter()
            .any(|i| i["key"] == "tokenrelay.toml" && i["path"] == file)),
        None => assert_eq!(file, "tokenrelay.toml"),
    }

    let config = deployed_config();
    if let VaultBackend::Sqlite { path } = &config.vault.backend {
        let writable: Vec<&str> = mounts
            .iter()
            .filter(|(_, v, ro)| !ro && v["configMap"].is_null() && v["secret"].is_null())
            .map(|(p, _, _)| p.as_str())
            .collect();
        assert!(
            path.is_absolute() && writable.iter().any(|w| path.starts_with(w)),
            "SQLite vault {} is not under a writable mount {writable:?} (the root filesystem is read-only)",
            path.display()
        );
    }
}

#[test]
fn the_grace_period_covers_prestop_and_the_drain() {
    let config = deployed_config();
    let (pod, _) = pod_and_sidecar();
    let grace = Duration::from_secs(pod["terminationGracePeriodSeconds"].as_u64().unwrap_or(30));
    let mut pre_stop = Duration::ZERO;
    for c in pod["containers"].as_array().unwrap() {
        if c["name"] == "tokenrelay" {
            continue;
        }
        let hook = &c["lifecycle"]["preStop"];
        assert!(hook.is_object(), "{} has no preStop hook", c["name"]);
        let secs = hook["sleep"]["seconds"].as_u64().or_else(|| {
            let cmd = hook["exec"]["command"].as_array()?;
            (cmd.len() >= 2 && str_of(&cmd[0]).ends_with("sleep"))
                .then(|| str_of(cmd.last()?).parse().ok())
                .flatten()
        });
        pre_stop = pre_stop.max(Duration::from_secs(secs.unwrap_or(0)));
    }
    assert!(
        grace > pre_stop + config.shutdown_grace,
        "terminationGracePeriodSeconds {grace:?} does not exceed preStop {pre_stop:?} + shutdown_grace {:?}: tokenrelay would be SIGKILLed mid-drain",
        config.shutdown_grace
    );
}

/// The Dockerfile as (INSTRUCTION, arguments), continuation lines joined.
fn dockerfile() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    let mut out = Vec::new();
    let mut buf = String::new();
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('#') || (buf.is_empty() && t.is_empty()) {
            continue;
        }
        if let Some(head) = t.strip_suffix('\\') {
            buf.push_str(head);
            buf.push(' ');
            continue;
        }
        buf.push_str(t);
        let (k, a) = buf.split_once(char::is_whitespace).unwrap_or((&buf, ""));
        out.push((k.to_ascii_uppercase(), a.trim().to_owned()));
        buf.clear();
    }
    out
}

/// Exec-form (`["a", "b"]`) or shell-form words.
fn words(args: &str) -> Vec<String> {
    serde_json::from_str(args)
        .unwrap_or_else(|_| args.split_whitespace().map(str::to_owned).collect())
}

#[test]
fn the_dockerfile_builds_locked_runs_non_root_and_exposes_both_ports() {
    let config = deployed_config();
    let ins = dockerfile();
    let froms: Vec<usize> = (0..ins.len()).filter(|&i| ins[i].0 == "FROM").collect();
    assert!(froms.len() >= 2, "multi-stage");
    assert!(ins
        .iter()
        .any(|(k, a)| k == "RUN" && a.contains("cargo build --release --locked")));
    let last = &ins[*froms.last().unwrap()..];
    let base = words(&last[0].1)[0].clone();
    let user = last
        .iter()
        .rev()
        .find(|(k, _)| k == "USER")
        .map(|(_, a)| a.clone())
        .unwrap_or_else(|| {
            if base.ends_with(":nonroot") {
                "nonroot".into()
            } else {
                "root".into()
            }
        });
    let user = user.split(':').next().unwrap();
    assert!(user != "root" && user != "0", "final stage runs as {user}");
    let exposed: BTreeSet<u16> = last
        .iter()
        .filter(|(k, _)| k == "EXPOSE")
        .flat_map(|(_, a)| {
            a.split_whitespace()
                .map(|p| p.split('/').next().unwrap().parse().unwrap())
        })
        .collect();
    for port in [config.listen.port(), config.admin_listen.port()] {
        assert!(
            exposed.contains(&port),
            "EXPOSE {port}; exposed {exposed:?}"
        );
    }
    let last_of = |kind: &str| {
        last.iter()
            .rev()
            .find(|(k, _)| k == kind)
            .map(|(_, a)| words(a))
    };
    assert_eq!(
        last_of("ENTRYPOINT").unwrap(),
        ["/usr/local/bin/tokenrelay"]
    );
    assert_eq!(
        last_of("CMD").unwrap(),
        ["serve", "--config", "/etc/tokenrelay/tokenrelay.toml"]
    );
    assert!(last.iter().any(|(k, a)| {
        let w = words(a);
        k == "COPY"
            && w.len() >= 2
            && w[w.len() - 2] == "config/tokenrelay.toml"
            && w[w.len() - 1] == "/etc/tokenrelay/tokenrelay.toml"
    }));
    let ignore = std::fs::read_to_string(root().join(".dockerignore")).unwrap();
    let entries: BTreeSet<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.trim_matches('/'))
        .collect();
    for e in ["target", "data", ".git"] {
        assert!(entries.contains(e), ".dockerignore does not exclude {e}/");
    }
}
