//! Which headers cross the proxy.
//!
//! Hop-by-hop headers (RFC 9110 §7.6.1, plus the legacy ones RFC 2616 §13.5.1
//! listed) never cross in either direction, nor do headers named in the
//! `Connection` header. Outbound, tokenrelay's own headers and `host` are
//! dropped too, and `content-length` is recomputed by the client from the
//! rendered body.

use http::header::{self, HeaderName};
use http::HeaderMap;

/// tokenrelay's request headers; never sent to the acquirer.
pub static X_CRYPTOGRAM_REFERENCE: HeaderName = HeaderName::from_static("x-cryptogram-reference");
/// The destination URL header.
pub static X_DESTINATION_URL: HeaderName = HeaderName::from_static("x-destination-url");
/// Dry-run switch.
pub static X_RELAY_DRY_RUN: HeaderName = HeaderName::from_static("x-relay-dry-run");
/// Escape hatch: name of a reserved header to send.
pub static X_RELAY_HEADER_NAME: HeaderName = HeaderName::from_static("x-relay-header-name");
/// Escape hatch: value of that header.
pub static X_RELAY_HEADER_VALUE: HeaderName = HeaderName::from_static("x-relay-header-value");
/// Timing header on relayed responses.
pub static X_RELAY_UPSTREAM_DURATION_MS: HeaderName =
    HeaderName::from_static("x-relay-upstream-duration-ms");
/// tokenrelay's request id on every response (the acquirer's own
/// `x-request-id` passes through untouched).
pub static X_RELAY_REQUEST_ID: HeaderName = HeaderName::from_static("x-relay-request-id");
/// The API key header.
pub static X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");

/// Hop-by-hop headers, dropped in both directions.
pub static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Request headers tokenrelay reserves or recomputes.
pub static RESERVED_OUTBOUND: [&HeaderName; 9] = [
    &header::HOST,
    &header::CONTENT_LENGTH,
    &X_API_KEY,
    &X_CRYPTOGRAM_REFERENCE,
    &X_DESTINATION_URL,
    &X_RELAY_DRY_RUN,
    &X_RELAY_HEADER_NAME,
    &X_RELAY_HEADER_VALUE,
    &header::EXPECT,
];

/// The names the escape hatch (`x-relay-header-name`) may send: the
/// headers tokenrelay itself reads, which a merchant cannot send directly.
/// Never `host`, `content-length`, `transfer-encoding`, `expect` or a
/// hop-by-hop header: those decide framing and routing, which tokenrelay
/// owns.
pub static ESCAPABLE: [&HeaderName; 6] = [
    &X_API_KEY,
    &X_CRYPTOGRAM_REFERENCE,
    &X_DESTINATION_URL,
    &X_RELAY_DRY_RUN,
    &X_RELAY_HEADER_NAME,
    &X_RELAY_HEADER_VALUE,
];

/// Whether the escape hatch may send `name`.
pub fn escapable(name: &HeaderName) -> bool {
    ESCAPABLE.contains(&name)
}

/// Removes hop-by-hop headers and those the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none: find them by walking the few names there
    // are, and look names up (hash them) only to remove what was found.
    let present = headers.keys().any(|n| HOP_BY_HOP.contains(n));
    if !present {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        headers.remove(n);
    }
    for h in &HOP_BY_HOP {
        headers.remove(h);
    }
}

/// Whether `name` is reserved outbound (the escape hatch may still send it).
pub fn is_reserved(name: &HeaderName) -> bool {
    RESERVED_OUTBOUND.contains(&name) || HOP_BY_HOP.contains(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn escape_only_for_own_names() {
        for n in ESCAPABLE {
            assert!(escapable(n));
        }
        for n in HOP_BY_HOP.iter().chain([
            &header::HOST,
            &header::CONTENT_LENGTH,
            &header::EXPECT,
            &header::AUTHORIZATION,
        ]) {
            assert!(!escapable(n), "{n}");
        }
    }

    #[test]
    fn strips_hop_by_hop_and_connection_named() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret-hop"),
        );
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer acquirer"),
        );
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key(header::AUTHORIZATION));
    }

    #[test]
    fn strips_each_hop_by_hop_header_alone_and_keeps_the_rest() {
        for hop in &HOP_BY_HOP {
            let mut h = HeaderMap::new();
            h.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
            h.append(hop, HeaderValue::from_static("x"));
            h.append(hop, HeaderValue::from_static("y"));
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            strip_hop_by_hop(&mut h);
            assert!(!h.contains_key(hop), "{hop} crossed");
            assert_eq!(h.len(), 2, "{hop}: {h:?}");
        }
        let mut plain = HeaderMap::new();
        plain.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        plain.insert("x-merchant", HeaderValue::from_static("1"));
        let before = plain.clone();
        strip_hop_by_hop(&mut plain);
        assert_eq!(plain, before);
    }
}
