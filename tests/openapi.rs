//! The OpenAPI documents stay true to the code: valid OpenAPI 3.1, and the
//! main document's operations are exactly the router's routes — a route
//! added without documentation, or documentation for a route that does not
//! exist, fails here. (CI also runs schemathesis against a live server with
//! this document: `.ci/schemathesis.sh`.)
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;

use http::Method;
use serde_json::Value;
use tokenrelay::api::surfaces::Surface;
use tokenrelay::api::{self, Route, RouteKind};
use tokenrelay::config::Surfaces;
use tokenrelay::openapi;

const OPERATION_KEYS: [&str; 8] = [
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

fn document(bytes: bytes::Bytes) -> Value {
    serde_json::from_slice(&bytes).expect("the document is JSON")
}

fn assert_valid_openapi_31(doc: &Value) {
    let schema: Value =
        serde_json::from_str(include_str!("schemas/openapi-3.1.json")).expect("schema JSON");
    let validator = jsonschema::draft202012::new(&schema).expect("the OAS 3.1 schema compiles");
    let errors: Vec<String> = validator
        .iter_errors(doc)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(errors.is_empty(), "not valid OpenAPI 3.1: {errors:#?}");
    assert_eq!(doc["openapi"], "3.1.0");
}

/// Every `$ref` in the document points at something that exists.
fn assert_refs_resolve(doc: &Value, node: &Value) {
    match node {
        Value::Object(map) => {
            if let Some(Value::String(r)) = map.get("$ref") {
                let pointer = r.strip_prefix('#').expect("local $ref");
                assert!(doc.pointer(pointer).is_some(), "dangling $ref {r}");
            }
            map.values().for_each(|v| assert_refs_resolve(doc, v));
        }
        Value::Array(items) => items.iter().for_each(|v| assert_refs_resolve(doc, v)),
        _ => {}
    }
}

#[test]
fn both_documents_are_valid_openapi_3_1() {
    for doc in [
        document(openapi::main_document()),
        document(openapi::admin_document()),
    ] {
        assert_valid_openapi_31(&doc);
        assert_refs_resolve(&doc, &doc);
    }
}

#[test]
#[should_panic(expected = "not valid OpenAPI 3.1")]
fn the_validity_check_can_fail() {
    let mut doc = document(openapi::main_document());
    doc["paths"]["/api/network/tokens"]["post"]["responses"] = serde_json::json!("none");
    assert_valid_openapi_31(&doc);
}

/// `(method, concrete path, x-tokenrelay-route)` of every operation.
fn operations(doc: &Value) -> Vec<(Method, String, String)> {
    let mut out = Vec::new();
    let paths = doc["paths"].as_object().expect("paths");
    for (template, item) in paths {
        let concrete = template
            .replace("{id}", "6f1c2a9e-9a43-4a53-9f35-4b1b2d6f5c11")
            .replace("{card_id}", "0b7d9c2e-31f4-4a8e-b0d5-2c6f1e9a7b44")
            .replace("{route}", "adyen-payments");
        for key in OPERATION_KEYS {
            let Some(op) = item.get(key) else { continue };
            let label = op["x-tokenrelay-route"]
                .as_str()
                .unwrap_or_else(|| panic!("{key} {template} has no x-tokenrelay-route"))
                .to_owned();
            let method = Method::from_bytes(key.to_uppercase().as_bytes()).expect("method");
            out.push((method, concrete.clone(), label));
        }
    }
    out
}

#[test]
fn every_documented_operation_is_served_by_the_route_it_names() {
    let doc = document(openapi::main_document());
    for (method, path, label) in operations(&doc) {
        if path == api::OPENAPI_PATH {
            assert_eq!(label, "openapi");
            continue;
        }
        let on = Surfaces {
            vgs_cmp: true,
            jpmc: true,
        };
        // The documented ids are well formed, so the route carries them,
        // and its kind is the one the router matched.
        let routed = match Surface::for_path(on, &path) {
            Some(surface) => surface.route(&method, &path).map(|m| {
                let op = m.route.map(|op| RouteKind::Surface(op.kind()));
                (RouteKind::Surface(m.kind), op)
            }),
            None => api::route(&method, &path).map(|m| (m.kind, m.route.map(Route::kind))),
        };
        let (kind, route) =
            routed.unwrap_or_else(|e| panic!("{method} {path} is documented but not routed: {e}"));
        assert_eq!(kind.label(), label, "{method} {path}");
        let route = route.unwrap_or_else(|e| panic!("{method} {path}: its ids refused: {e}"));
        assert_eq!(route, kind, "{method} {path}");
    }
}

#[test]
fn every_route_is_documented() {
    let doc = document(openapi::main_document());
    let documented: BTreeSet<String> = operations(&doc).into_iter().map(|o| o.2).collect();
    for route in RouteKind::ALL {
        assert!(
            documented.contains(route.label()),
            "route {} has no operation in the OpenAPI document",
            route.label()
        );
    }
}

#[test]
fn the_surfaces_schemas_are_embedded_with_their_definitions() {
    let doc = document(openapi::main_document());
    let schemas = doc["components"]["schemas"].as_object().expect("schemas");
    for name in [
        "VgsNetworkTokenResponse",
        "VgsCryptogramResponse",
        "VgsCryptoFetchRequest",
        "VgsError",
        "JpmcCryptogramResponse",
        "JpmcError",
        "JpmcCryptogramRequest",
    ] {
        let schema = schemas
            .get(name)
            .unwrap_or_else(|| panic!("{name} missing"));
        assert!(
            schema.get("$defs").is_none() && schema.get("$id").is_none(),
            "{name}"
        );
    }
    assert!(
        !doc.to_string().contains("#/$defs/"),
        "a $ref was left unrewritten"
    );
}

#[test]
fn operation_ids_are_unique() {
    let doc = document(openapi::main_document());
    let mut seen = BTreeSet::new();
    for item in doc["paths"].as_object().expect("paths").values() {
        for key in OPERATION_KEYS {
            if let Some(op) = item.get(key) {
                let id = op["operationId"].as_str().expect("operationId").to_owned();
                assert!(seen.insert(id.clone()), "duplicate operationId {id}");
            }
        }
    }
}

#[test]
fn the_admin_document_lists_the_admin_endpoints() {
    let doc = document(openapi::admin_document());
    let paths: BTreeSet<&str> = doc["paths"]
        .as_object()
        .expect("paths")
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        paths,
        BTreeSet::from(["/healthz", "/readyz", "/metrics", "/openapi.json"])
    );
}
