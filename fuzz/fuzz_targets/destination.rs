//! `x-destination-url` parsing and the allow-list (src/forward/
//! destination.rs: `parse`, `is_public`, `check_addresses`).
//!
//! Input (text): every line but the last is a rule, `<scheme> <host or
//! *.suffix> <port> [private]`; the last line is the URL. With no rule
//! lines, one rule is made from the URL's own host and port (so the fuzzer
//! reaches the accepting paths), private addresses allowed when byte 0
//! is odd.
//!
//! Invariants: nothing panics; an accepted destination matches the rule it
//! names on host, port and scheme; its host is lower-case, non-empty, a
//! host name of `[a-z0-9.-]` or an IPv6 literal, with no placeholder
//! delimiter; an IP host is public unless the rule allows private ones;
//! its path starts with `/` and carries no `?` or `#`; the URL the
//! forward sends to (`origin()` + path + query) parses back to the same
//! destination, and where `http::Uri` reads that URL it reads the same
//! host and port. `is_public` judges an IPv4-mapped IPv6 address as its
//! IPv4 address, and `check_addresses` refuses exactly when an address
//! is not public and private ones are not allowed.

#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use libfuzzer_sys::fuzz_target;
use tokenrelay::config::{DestScheme, DestinationRule, HostPattern};
use tokenrelay::forward::destination::{check_addresses, is_public, parse};

const DELIMS: [(&str, &str); 2] = [("<<", ">>"), ("{{", "}}")];

fn rule(host: &str, port: u16, scheme: DestScheme, allow_private: bool) -> DestinationRule {
    let host = host.to_ascii_lowercase();
    DestinationRule {
        host: match host.strip_prefix('*') {
            Some(suffix) if suffix.starts_with('.') => HostPattern::Wildcard(suffix.to_owned()),
            _ => HostPattern::Exact(host),
        },
        port,
        scheme,
        allow_private,
        ca_file: None,
        client_cert: None,
        client_key: None,
    }
}

fn parse_rule(line: &str) -> Option<DestinationRule> {
    let mut parts = line.split(' ');
    let scheme = match parts.next()? {
        "http" => DestScheme::Http,
        _ => DestScheme::Https,
    };
    let host = parts.next()?;
    let port = parts.next()?.parse().ok()?;
    Some(rule(host, port, scheme, parts.next() == Some("private")))
}

/// A rule admitting the URL's own host and port, read crudely.
fn own_rule(url: &str, allow_private: bool) -> Vec<DestinationRule> {
    let Some((scheme, rest)) = url.split_once("://") else {
        return Vec::new();
    };
    let scheme = if scheme.eq_ignore_ascii_case("http") {
        DestScheme::Http
    } else {
        DestScheme::Https
    };
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    let (host, port) = match authority.strip_prefix('[').and_then(|a| a.split_once(']')) {
        Some((h, p)) => (h, p.strip_prefix(':')),
        None => match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        },
    };
    let default = if scheme == DestScheme::Http { 80 } else { 443 };
    let port = port.and_then(|p| p.parse().ok()).unwrap_or(default);
    let mut rules = vec![rule(host, port, scheme, allow_private)];
    if let Some((_, parent)) = host.split_once('.') {
        rules.push(rule(&format!("*.{parent}"), port, scheme, allow_private));
    }
    rules
}

fn addresses(data: &[u8]) {
    let mut addrs = Vec::new();
    for c in data.chunks_exact(16).take(4) {
        let mut b = [0u8; 16];
        b.copy_from_slice(c);
        let v6 = Ipv6Addr::from(b);
        let v4 = Ipv4Addr::new(b[12], b[13], b[14], b[15]);
        assert_eq!(
            is_public(IpAddr::V6(v4.to_ipv6_mapped())),
            is_public(IpAddr::V4(v4)),
            "a mapped address judged unlike its IPv4 address"
        );
        let ip = if b[0] & 1 == 0 {
            IpAddr::V4(v4)
        } else {
            IpAddr::V6(v6)
        };
        addrs.push(SocketAddr::new(ip, 443));
    }
    let all_public = addrs.iter().all(|a| is_public(a.ip()));
    assert!(check_addresses(&addrs, true).is_ok());
    assert_eq!(check_addresses(&addrs, false).is_ok(), all_public);
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    addresses(rest);
    let text = String::from_utf8_lossy(rest);
    let (rule_lines, url) = match text.rsplit_once('\n') {
        Some((r, u)) => (r, u),
        None => ("", &*text),
    };
    let mut rules: Vec<DestinationRule> = rule_lines.lines().filter_map(parse_rule).collect();
    if rules.is_empty() {
        rules = own_rule(url, flags & 1 == 1);
    }
    let delims = DELIMS[usize::from(flags >> 1) % 2];
    let Ok(d) = parse(url, &rules, delims) else {
        return;
    };
    let r = &rules[d.rule];
    assert!(r.host.matches(&d.host) && r.port == d.port && r.scheme == d.scheme);
    assert!(!d.host.is_empty() && d.host == d.host.to_ascii_lowercase());
    assert!(!d.host.contains(delims.0) && !d.host.contains(delims.1));
    let ip = d.host.parse::<IpAddr>().ok();
    if d.host.contains(':') {
        assert!(
            matches!(ip, Some(IpAddr::V6(_))),
            "a host with `:` that is not IPv6"
        );
    } else {
        assert!(d
            .host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.'));
    }
    if let (Some(ip), false) = (ip, r.allow_private) {
        assert!(is_public(ip), "a private address accepted");
    }
    assert!(d.port != 0);
    assert!(d.path.starts_with('/') && !d.path.contains(['?', '#']));
    assert!(d.query.as_deref().is_none_or(|q| !q.contains('#')));

    let outbound = match &d.query {
        Some(q) => format!("{}{}?{q}", d.origin(), d.path),
        None => format!("{}{}", d.origin(), d.path),
    };
    let again = match parse(&outbound, &rules, delims) {
        Ok(a) => a,
        Err(e) => panic!("the outbound URL is refused: {e:?}"),
    };
    assert_eq!(
        (
            again.scheme,
            &again.host,
            again.port,
            &again.path,
            &again.query,
            again.rule
        ),
        (d.scheme, &d.host, d.port, &d.path, &d.query, d.rule)
    );
    if let Ok(uri) = outbound.parse::<http::Uri>() {
        let host = uri.host().unwrap_or_default();
        let host = host.trim_start_matches('[').trim_end_matches(']');
        assert_eq!(
            host.to_ascii_lowercase(),
            d.host,
            "http::Uri reads another host"
        );
        assert_eq!(uri.port_u16(), Some(d.port), "http::Uri reads another port");
    }
});
