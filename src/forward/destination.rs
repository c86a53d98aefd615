//! `x-destination-url`: parsing, the allow-list, and address checks.
//!
//! The URL is judged as written: placeholders may appear only in the path
//! and query, never in the scheme, host or port. The host is matched
//! against the rules, then resolved once (through [`Resolver`], whose pinned
//! answers the connector reuses) and every address checked: private,
//! loopback, link-local, multicast and other non-public ranges are refused
//! unless the matching rule sets `allow_private`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use moka::sync::Cache;

use crate::config::{DestScheme, DestinationRule};

/// A destination URL split into its parts; `path_and_query` still holds
/// placeholders, if any.
#[derive(Debug, Clone)]
pub struct Destination {
    /// `http` or `https`.
    pub scheme: DestScheme,
    /// Lower-case host name or IP literal (no brackets).
    pub host: String,
    /// Explicit or default port.
    pub port: u16,
    /// Path and query as written (starts with `/`; fragment dropped).
    pub path: String,
    /// Query as written, without `?`.
    pub query: Option<String>,
    /// Index of the rule that admits it.
    pub rule: usize,
}

impl Destination {
    /// `scheme://host:port` for the outbound URI (IPv6 bracketed).
    pub fn origin(&self) -> String {
        if self.host.contains(':') {
            format!("{}://[{}]:{}", self.scheme.as_str(), self.host, self.port)
        } else {
            format!("{}://{}:{}", self.scheme.as_str(), self.host, self.port)
        }
    }
}

/// Why a destination was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DestinationError {
    /// Malformed: 400 `invalid_destination`.
    Invalid(String),
    /// Refused by policy: 403 `destination_not_allowed`.
    NotAllowed(String),
}

fn invalid(m: impl Into<String>) -> DestinationError {
    DestinationError::Invalid(m.into())
}

/// Parses `x-destination-url` and matches it against the rules.
/// `delims` are the placeholder delimiters in force.
pub fn parse(
    url: &str,
    rules: &[DestinationRule],
    delims: (&str, &str),
) -> Result<Destination, DestinationError> {
    let (scheme_str, rest) = url
        .split_once("://")
        .ok_or_else(|| invalid("must be an absolute URL (scheme://host/path)"))?;
    let scheme = match scheme_str.to_ascii_lowercase().as_str() {
        "https" => DestScheme::Https,
        "http" => DestScheme::Http,
        s if s.contains(delims.0) => {
            return Err(invalid("placeholders are not allowed in the scheme"))
        }
        _ => return Err(invalid("scheme must be http or https")),
    };
    let split = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(split);
    if authority.contains(delims.0) || authority.contains(delims.1) {
        return Err(invalid("placeholders are not allowed in the host or port"));
    }
    if authority.contains('@') {
        return Err(invalid("userinfo is not allowed in the URL"));
    }
    let (host, port) = split_host_port(authority)?;
    let port = port.unwrap_or(match scheme {
        DestScheme::Https => 443,
        DestScheme::Http => 80,
    });
    let tail = tail.split_once('#').map_or(tail, |(t, _)| t);
    let (path, query) = match tail.split_once('?') {
        Some((p, q)) => (p, Some(q.to_owned())),
        None => (tail, None),
    };
    let path = if path.is_empty() {
        "/".to_owned()
    } else {
        path.to_owned()
    };

    let mut scheme_refused = false;
    let rule = rules.iter().position(|r| {
        let matched = r.host.matches(&host) && r.port == port;
        if matched && r.scheme != scheme {
            scheme_refused = true;
        }
        matched && r.scheme == scheme
    });
    let Some(rule) = rule else {
        return Err(DestinationError::NotAllowed(if scheme_refused {
            format!(
                "scheme {} is not allowed for {host}:{port}",
                scheme.as_str()
            )
        } else {
            format!("{host}:{port} is not on the allow-list")
        }));
    };
    if !rules[rule].allow_private {
        if let Ok(ip) = host.parse::<IpAddr>() {
            if !is_public(ip) {
                return Err(DestinationError::NotAllowed(format!(
                    "{host} is a private, loopback or link-local address"
                )));
            }
        }
    }
    Ok(Destination {
        scheme,
        host,
        port,
        path,
        query,
        rule,
    })
}

fn split_host_port(authority: &str) -> Result<(String, Option<u16>), DestinationError> {
    let bracketed = authority.starts_with('[');
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (h, after) = rest
            .split_once(']')
            .ok_or_else(|| invalid("unterminated IPv6 literal"))?;
        if h.parse::<Ipv6Addr>().is_err() {
            return Err(invalid("bad IPv6 literal"));
        }
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or_else(|| invalid("bad port"))?),
        };
        (h.to_ascii_lowercase(), port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_ascii_lowercase(), Some(p)),
            None => (authority.to_ascii_lowercase(), None),
        }
    };
    if host.is_empty() {
        return Err(invalid("host is empty"));
    }
    // Only a bracketed IPv6 literal (checked above) may hold a `:`; a
    // bare host is a name or IPv4 address. (A colon left in a bare host,
    // as in `a.example:x.allowed.example:443`, once passed here unchecked
    // and matched a `*.allowed.example` rule: found by fuzz/destination.)
    if !bracketed
        && !host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
    {
        return Err(invalid(
            "host contains characters not allowed in a host name",
        ));
    }
    let port = match port {
        None => None,
        Some(p) => Some(
            p.parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| invalid("port must be 1 to 65535"))?,
        ),
    };
    Ok((host, port))
}

/// Whether an address is publicly routable (not private, loopback,
/// link-local, multicast, unspecified, CGNAT, reserved or documentation).
///
/// IPv6 forms that carry an IPv4 address are judged by that address or
/// refused outright: IPv4-mapped (`::ffff:0:0/96`) and 6to4 (`2002::/16`)
/// by the embedded address; IPv4-compatible (`::/96`, deprecated),
/// IPv4-translated (`::ffff:0:0:0/96`), NAT64 (`64:ff9b::/96`,
/// `64:ff9b:1::/48`) and Teredo (`2001::/32`, whose client address is
/// obfuscated) always, since a relay or translator could reach any IPv4
/// address through them. Site-local (`fec0::/10`, deprecated but still
/// routed inside some networks), unique local, link-local, discard-only
/// (`100::/64`), benchmarking (`2001:2::/48`) and documentation are refused.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public_v4(v4);
            }
            let s = v6.segments();
            if s[0] == 0x2002 {
                // 6to4: the IPv4 address is bits 16..48.
                let [a, b] = s[1].to_be_bytes();
                let [c, d] = s[2].to_be_bytes();
                return is_public_v4(Ipv4Addr::new(a, b, c, d));
            }
            let ipv4_compatible = s[..6] == [0; 6];
            let ipv4_translated = s[..4] == [0; 4] && s[4] == 0xffff && s[5] == 0;
            !(ipv4_compatible // includes :: and ::1
                || ipv4_translated
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00 // unique local
                || (s[0] & 0xffc0) == 0xfe80 // link-local
                || (s[0] & 0xffc0) == 0xfec0 // site-local
                || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation
                || (s[0] == 0x2001 && s[1] == 0) // Teredo
                || (s[0] == 0x2001 && s[1] == 0x0002 && s[2] == 0) // benchmarking
                || (s[0] == 0x0100 && s[1..4] == [0; 3]) // discard-only
                || (s[0] == 0x0064 && s[1] == 0xff9b)) // NAT64, well-known and local-use
        }
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let o = ip.octets();
    !(ip.is_private()
        || ip.is_loopback()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || o[0] == 0
        || (o[0] == 100 && (o[1] & 0xc0) == 64) // CGNAT 100.64/10
        || (o[0] == 192 && o[1] == 0 && o[2] == 0) // IETF 192.0.0/24
        || (o[0] == 198 && (o[1] & 0xfe) == 18) // benchmarking 198.18/15
        || o[0] >= 240) // reserved
}

/// Where host names become addresses: the system's resolver in
/// production ([`SystemLookup`]); tests give the [`Resolver`] their own
/// answers (a name that rebinds, one that points at loopback).
#[async_trait::async_trait]
pub trait Lookup: Send + Sync + 'static {
    /// The addresses of `host:port`, in the order to try them.
    async fn lookup(&self, host: &str, port: u16) -> std::io::Result<Vec<SocketAddr>>;
}

/// The system's resolver (`getaddrinfo`, through tokio).
pub struct SystemLookup;

#[async_trait::async_trait]
impl Lookup for SystemLookup {
    async fn lookup(&self, host: &str, port: u16) -> std::io::Result<Vec<SocketAddr>> {
        Ok(tokio::net::lookup_host((host, port)).await?.collect())
    }
}

/// Resolves hosts and pins the answer for a short while, so the address
/// the allow-list checked is the address the connector dials (a name that
/// rebinds between the check and the connect changes nothing).
#[derive(Clone)]
pub struct Resolver {
    pinned: Cache<(String, u16), Arc<[SocketAddr]>>,
    lookup: Arc<dyn Lookup>,
}

/// Most pinned resolutions; beyond it the least used are re-resolved.
const RESOLVER_CAPACITY: u64 = 10_000;

impl Resolver {
    /// The system's answers, pinned for `ttl`.
    pub fn new(ttl: Duration) -> Self {
        Self::with_lookup(ttl, Arc::new(SystemLookup))
    }

    /// `lookup`'s answers, pinned for `ttl`.
    pub fn with_lookup(ttl: Duration, lookup: Arc<dyn Lookup>) -> Self {
        Self {
            pinned: Cache::builder()
                .max_capacity(RESOLVER_CAPACITY)
                .time_to_live(ttl)
                .build(),
            lookup,
        }
    }

    /// Resolves `host:port` (IP literals without a lookup).
    pub async fn resolve(&self, host: &str, port: u16) -> std::io::Result<Arc<[SocketAddr]>> {
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(Arc::from([SocketAddr::new(ip, port)]));
        }
        let key = (host.to_owned(), port);
        if let Some(hit) = self.pinned.get(&key) {
            return Ok(hit);
        }
        let addrs = self.lookup.lookup(host, port).await?;
        if addrs.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "host has no addresses",
            ));
        }
        let addrs: Arc<[SocketAddr]> = addrs.into();
        self.pinned.insert(key, addrs.clone());
        Ok(addrs)
    }
}

/// Checks resolved addresses against a rule: all must be public unless the
/// rule allows private ones (a name with one private address is refused).
pub fn check_addresses(addrs: &[SocketAddr], allow_private: bool) -> Result<(), DestinationError> {
    if allow_private {
        return Ok(());
    }
    match addrs.iter().find(|a| !is_public(a.ip())) {
        Some(a) => Err(DestinationError::NotAllowed(format!(
            "host resolves to a private, loopback or link-local address ({})",
            a.ip()
        ))),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HostPattern;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Answers each lookup with the next of `answers` (the last one again
    /// once they run out), counting the lookups.
    struct Rebinding {
        answers: Vec<SocketAddr>,
        calls: AtomicUsize,
    }

    #[async_trait::async_trait]
    impl Lookup for Rebinding {
        async fn lookup(&self, _: &str, _: u16) -> std::io::Result<Vec<SocketAddr>> {
            let n = self.calls.fetch_add(1, Ordering::SeqCst);
            Ok(vec![self.answers[n.min(self.answers.len() - 1)]])
        }
    }

    #[tokio::test]
    async fn a_name_that_rebinds_keeps_its_pinned_answer() {
        let public: SocketAddr = "8.8.8.8:443".parse().unwrap();
        let loopback: SocketAddr = "127.0.0.1:443".parse().unwrap();
        let lookup = Arc::new(Rebinding {
            answers: vec![public, loopback],
            calls: AtomicUsize::new(0),
        });
        let resolver = Resolver::with_lookup(Duration::from_secs(60), lookup.clone());
        for _ in 0..3 {
            let addrs = resolver.resolve("rebind.example", 443).await.unwrap();
            assert_eq!(&addrs[..], [public]);
            check_addresses(&addrs, false).unwrap();
        }
        assert_eq!(lookup.calls.load(Ordering::SeqCst), 1, "re-resolved");
        // IP literals are never looked up.
        resolver.resolve("127.0.0.1", 443).await.unwrap();
        assert_eq!(lookup.calls.load(Ordering::SeqCst), 1);
        // The name, looked up again now, would point at loopback: that is
        // what the pin keeps the connector from dialling.
        let fresh = Resolver::with_lookup(Duration::from_secs(60), lookup.clone());
        let rebound = fresh.resolve("rebind.example", 443).await.unwrap();
        assert!(check_addresses(&rebound, false).is_err());
    }

    fn rule(
        host: HostPattern,
        port: u16,
        scheme: DestScheme,
        allow_private: bool,
    ) -> DestinationRule {
        DestinationRule {
            host,
            port,
            scheme,
            allow_private,
            ca_file: None,
            client_cert: None,
            client_key: None,
        }
    }

    fn rules() -> Vec<DestinationRule> {
        vec![
            rule(
                HostPattern::Wildcard(".acquirer.example".into()),
                443,
                DestScheme::Https,
                false,
            ),
            rule(
                HostPattern::Exact("10.0.0.5".into()),
                8443,
                DestScheme::Https,
                true,
            ),
            rule(
                HostPattern::Exact("127.0.0.1".into()),
                443,
                DestScheme::Https,
                false,
            ),
            rule(
                HostPattern::Exact("plain.example".into()),
                80,
                DestScheme::Http,
                false,
            ),
        ]
    }

    const D: (&str, &str) = ("<<", ">>");

    #[test]
    fn parses_and_matches() {
        let d = parse("https://API.acquirer.example/v1/pay?x=1#frag", &rules(), D).unwrap();
        assert_eq!(d.host, "api.acquirer.example");
        assert_eq!(d.port, 443);
        assert_eq!(d.path, "/v1/pay");
        assert_eq!(d.query.as_deref(), Some("x=1"));
        assert_eq!(d.rule, 0);
        let d = parse("https://10.0.0.5:8443", &rules(), D).unwrap();
        assert_eq!((d.path.as_str(), d.rule), ("/", 1));
        assert!(parse("http://plain.example/x", &rules(), D).is_ok());
    }

    #[test]
    fn refusals() {
        let inv = |u: &str| matches!(parse(u, &rules(), D), Err(DestinationError::Invalid(_)));
        let na = |u: &str| matches!(parse(u, &rules(), D), Err(DestinationError::NotAllowed(_)));
        assert!(inv("api.acquirer.example/v1"));
        assert!(inv("ftp://api.acquirer.example/"));
        assert!(inv("https://<< number >>.acquirer.example/"));
        assert!(inv("https://api.acquirer.example:<< eci >>/"));
        assert!(inv("https://user@api.acquirer.example/"));
        assert!(inv("https://api.acquirer.example:99999/"));
        assert!(na("http://api.acquirer.example:443/"));
        assert!(na("https://acquirer.example/"));
        assert!(na("https://api.acquirer.example:444/"));
        assert!(na("https://127.0.0.1/"));
        assert!(na("https://evil.example/"));
    }

    /// fuzz/destination found that a colon outside brackets stayed in the
    /// host: `evil.example:x` + `.acquirer.example` matched the wildcard,
    /// and the outbound URL became `https://[evil.example:x…]:443`.
    #[test]
    fn a_colon_outside_brackets_is_never_part_of_the_host() {
        for url in [
            "https://evil.example:x.acquirer.example:443/",
            "https://acquirer.exa1:m:8443/pay",
            "https://::1/",
            "https://1:2:3:4:5:6:7:8:443/",
        ] {
            assert!(
                matches!(parse(url, &rules(), D), Err(DestinationError::Invalid(_))),
                "{url}"
            );
        }
        let d = parse(
            "https://[::1]:8443/",
            &[rule(
                HostPattern::Exact("::1".into()),
                8443,
                DestScheme::Https,
                true,
            )],
            D,
        )
        .unwrap();
        assert_eq!(
            (d.host.as_str(), d.origin()),
            ("::1", "https://[::1]:8443".to_owned())
        );
    }

    /// The classifier, one row per form: address, public?, why.
    #[test]
    fn public_and_private_ranges() {
        let table: &[(&str, bool, &str)] = &[
            ("127.0.0.1", false, "loopback"),
            ("10.1.2.3", false, "private"),
            ("172.16.0.1", false, "private"),
            ("192.168.1.1", false, "private"),
            ("169.254.169.254", false, "link-local (cloud metadata)"),
            ("100.64.0.1", false, "CGNAT"),
            ("0.0.0.0", false, "unspecified"),
            ("224.0.0.1", false, "multicast"),
            ("8.8.8.8", true, "public v4"),
            ("1.1.1.1", true, "public v4"),
            ("::1", false, "v6 loopback"),
            ("::", false, "v6 unspecified"),
            ("fe80::1", false, "v6 link-local"),
            ("fd00::1", false, "unique local"),
            ("fec0::1", false, "site-local"),
            ("feff::1", false, "site-local, top of fec0::/10"),
            ("ff02::1", false, "v6 multicast"),
            ("2001:db8::1", false, "documentation"),
            ("::ffff:127.0.0.1", false, "IPv4-mapped loopback"),
            ("::ffff:8.8.8.8", true, "IPv4-mapped public"),
            ("::7f00:1", false, "IPv4-compatible loopback"),
            ("::a9fe:a9fe", false, "IPv4-compatible link-local"),
            (
                "::808:808",
                false,
                "IPv4-compatible, deprecated even when public",
            ),
            ("::ffff:0:7f00:1", false, "IPv4-translated loopback"),
            ("::ffff:0:808:808", false, "IPv4-translated"),
            ("2002:7f00:1::1", false, "6to4 of 127.0.0.1"),
            ("2002:a9fe:a9fe::1", false, "6to4 of 169.254.169.254"),
            ("2002:c0a8:101::1", false, "6to4 of 192.168.1.1"),
            ("2002:808:808::1", true, "6to4 of a public address"),
            ("2001::1", false, "Teredo"),
            ("2001:0:4136:e378:8000:63bf:3fff:fdd2", false, "Teredo"),
            ("64:ff9b::7f00:1", false, "NAT64 well-known"),
            ("64:ff9b::808:808", false, "NAT64 well-known, any"),
            ("64:ff9b:1::1", false, "NAT64 local-use"),
            ("100::1", false, "discard-only"),
            ("2001:2::1", false, "benchmarking"),
            ("2606:4700::1111", true, "public v6"),
            ("2001:4860:4860::8888", true, "public v6 in 2001::/16"),
        ];
        for (addr, public, why) in table {
            assert_eq!(is_public(addr.parse().unwrap()), *public, "{addr} ({why})");
        }
    }
}
