//! `[[routes]]` (contract §10): operator-defined forwards, each a name, a
//! fixed destination and method, a template file and the endpoints that may
//! use it; and `routes_only`. The destination is checked against the
//! allow-list and the template compiled where they are used
//! (`forward::route::Routes`), which `serve` and `check-config` both build.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use super::raw::RawRoute;
use super::ConfigError;

/// Which forward endpoint may use a route (`routes[].subjects`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteSubject {
    /// `POST /api/network/tokens/{id}/forward/{route}`
    NetworkToken,
    /// `POST /api/pci/tokens/{id}/forward/{route}`
    PciToken,
}

/// One `[[routes]]` entry (contract §10). Its destination is checked
/// against the allow-list and its template compiled when the forwarder is
/// built (`forward::route::Routes`), which `serve` and `check-config` both do.
#[derive(Debug, Clone)]
pub struct RouteConfig {
    /// `[a-z0-9-]+`, the `{route}` path segment.
    pub name: String,
    /// The fixed destination URL.
    pub destination: String,
    /// The outbound method.
    pub method: http::Method,
    /// The template file, resolved against the config file's folder.
    pub template: PathBuf,
    /// Which forward endpoints may use it.
    pub subjects: Vec<RouteSubject>,
}

/// Validates `[[routes]]`: names, methods, subjects; template paths resolved
/// against `base`. The destination and the template itself are checked
/// where they are used (`forward::route`).
pub(super) fn validate(raw: &[RawRoute], base: &Path) -> Result<Vec<RouteConfig>, ConfigError> {
    let mut seen = HashSet::new();
    let mut routes = Vec::with_capacity(raw.len());
    for (i, r) in raw.iter().enumerate() {
        let key = |field: &str| format!("routes[{i}].{field}");
        if r.name.is_empty()
            || r.name.len() > 64
            || !r
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(ConfigError::new(
                key("name"),
                format!("{:?} must be 1-64 characters of a-z 0-9 -", r.name),
            ));
        }
        if !seen.insert(r.name.as_str()) {
            return Err(ConfigError::new(
                key("name"),
                format!("route {:?} is defined twice", r.name),
            ));
        }
        let method = match r.method.as_deref() {
            None => http::Method::POST,
            Some(m) => {
                let m = m.to_ascii_uppercase();
                match m.as_str() {
                    "GET" | "POST" | "PUT" | "PATCH" | "DELETE" => {}
                    _ => {
                        return Err(ConfigError::new(
                            key("method"),
                            format!("{m:?} is not one of GET, POST, PUT, PATCH, DELETE"),
                        ))
                    }
                }
                http::Method::from_bytes(m.as_bytes())
                    .map_err(|_| ConfigError::new(key("method"), "not an HTTP method"))?
            }
        };
        if r.subjects.is_empty() {
            return Err(ConfigError::new(
                key("subjects"),
                "name at least one of \"network_token\", \"pci_token\"",
            ));
        }
        let mut subjects = Vec::with_capacity(r.subjects.len());
        for s in &r.subjects {
            let subject = match s.as_str() {
                "network_token" => RouteSubject::NetworkToken,
                "pci_token" => RouteSubject::PciToken,
                other => {
                    return Err(ConfigError::new(
                        key("subjects"),
                        format!("unknown subject {other:?} (network_token, pci_token)"),
                    ))
                }
            };
            if !subjects.contains(&subject) {
                subjects.push(subject);
            }
        }
        routes.push(RouteConfig {
            name: r.name.clone(),
            destination: r.destination.clone(),
            method,
            template: base.join(&r.template),
            subjects,
        });
    }
    Ok(routes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn routes_are_checked_and_their_templates_found_beside_the_config() {
        let ok = "[[routes]]\nname = \"adyen-payments\"\ndestination = \"https://a.example/p\"\ntemplate = \"routes/a.json.j2\"\nsubjects = [\"network_token\", \"pci_token\"]";
        let c = Config::parse_in(ok, Path::new("/etc/tokenrelay")).unwrap();
        let r = &c.routes[0];
        assert_eq!(r.method, http::Method::POST);
        assert_eq!(r.template, Path::new("/etc/tokenrelay/routes/a.json.j2"));
        assert_eq!(
            r.subjects,
            [RouteSubject::NetworkToken, RouteSubject::PciToken]
        );
        assert!(!c.routes_only);
        assert!(Config::parse("routes_only = true").unwrap().routes_only);
        for (doc, key) in [
            (ok.replace("adyen-payments", "Adyen"), "routes[0].name"),
            (ok.replace("adyen-payments", "a/b"), "routes[0].name"),
            (format!("{ok}\nmethod = \"CONNECT\""), "routes[0].method"),
            (
                ok.replace("\"network_token\", \"pci_token\"", ""),
                "routes[0].subjects",
            ),
            (ok.replace("pci_token", "card"), "routes[0].subjects"),
            (format!("{ok}\n{ok}"), "routes[1].name"),
        ] {
            let e = Config::parse(&doc).unwrap_err();
            assert_eq!(e.key, key, "{doc}: {e}");
        }
    }
}
