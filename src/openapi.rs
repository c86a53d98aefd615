//! The OpenAPI 3.1 documents (contract §13): `GET /openapi.json` on the
//! main listener describes every route of [`crate::api`], the same path on
//! the admin listener describes [`crate::admin`].
//!
//! The documents are written here, in one place, as data — not generated
//! from the handlers, whose JSON is shaped by hand for the contract. What
//! can be derived is derived, so the document cannot drift from the code
//! where it matters most: each operation lists the [`ApiError`]s it can
//! answer with, and their statuses and classifiers come from
//! [`ApiError::status_and_classifier`], the one HTTP mapping. The route
//! table and the document are compared by a test (`tests/openapi.rs`), and
//! CI runs schemathesis against a live server with this document.
//!
//! Each operation carries `x-tokenrelay-route`, the [`crate::api::RouteKind`]
//! label it is served by, so that test can match them. The documents are
//! built once, on first use, and served as shared bytes; the main one is
//! reached through `AppState::openapi` (so this module depends on
//! [`crate::api`], never the other way).

use std::collections::BTreeMap;
use std::sync::OnceLock;

use bytes::Bytes;
use serde_json::{json, Map, Value};

use crate::api::ApiError;
use crate::auth::Scope;

/// The main listener's document, serialised once.
pub fn main_document() -> Bytes {
    static DOC: OnceLock<Bytes> = OnceLock::new();
    DOC.get_or_init(|| Bytes::from(main_value().to_string()))
        .clone()
}

/// The admin listener's document, serialised once.
pub fn admin_document() -> Bytes {
    static DOC: OnceLock<Bytes> = OnceLock::new();
    DOC.get_or_init(|| Bytes::from(admin_value().to_string()))
        .clone()
}

/// A sample of each error, for its status and classifier; the payloads are
/// never shown.
fn e_invalid_request() -> ApiError {
    ApiError::InvalidRequest(String::new())
}

/// Errors every authenticated route can answer with.
fn auth_errors(scope: Scope) -> Vec<ApiError> {
    vec![
        ApiError::Unauthorized,
        ApiError::Forbidden(scope),
        ApiError::Unavailable(String::new()),
    ]
}

/// Errors of every route that reads a JSON body.
fn body_errors() -> Vec<ApiError> {
    vec![e_invalid_request(), ApiError::BodyTooLarge(0)]
}

/// `responses` entries for `errors`, one per status, each naming the
/// classifiers it carries.
fn error_responses(errors: &[ApiError]) -> Map<String, Value> {
    let mut by_status: BTreeMap<u16, Vec<&'static str>> = BTreeMap::new();
    for e in errors {
        let (status, classifier) = e.status_and_classifier();
        let list = by_status.entry(status.as_u16()).or_default();
        if !list.contains(&classifier) {
            list.push(classifier);
        }
    }
    by_status
        .into_iter()
        .map(|(status, classifiers)| {
            let description = format!("tokenrelay error: {}", classifiers.join(", "));
            let schema = json!({
                "allOf": [
                    {"$ref": "#/components/schemas/Error"},
                    {"type": "object", "properties": {
                        "code": {"const": status},
                        "classifier": {"enum": classifiers},
                    }},
                ]
            });
            (
                status.to_string(),
                json!({
                    "description": description,
                    "headers": {"x-relay-error": {"$ref": "#/components/headers/RelayError"}},
                    "content": {"application/json": {"schema": schema}},
                }),
            )
        })
        .collect()
}

/// A JSON response with `schema` (a `$ref` name) and an example.
fn json_ok(description: &str, schema: &str, example: Value) -> Value {
    json!({
        "description": description,
        "headers": {"x-request-id": {"$ref": "#/components/headers/RequestId"}},
        "content": {"application/json": {
            "schema": {"$ref": format!("#/components/schemas/{schema}")},
            "example": example,
        }},
    })
}

/// `response` with OpenAPI links to the operations that take what it
/// returns, so property-based testers can chain them.
fn with_links(mut response: Value, links: &[(&str, Value)]) -> Value {
    let links: Map<String, Value> = links
        .iter()
        .map(|(op, params)| {
            (
                op.to_string(),
                json!({"operationId": op, "parameters": params}),
            )
        })
        .collect();
    response["links"] = Value::Object(links);
    response
}

fn no_content(description: &str) -> Value {
    json!({
        "description": description,
        "headers": {"x-request-id": {"$ref": "#/components/headers/RequestId"}},
    })
}

/// One operation: its route label, scope, summary, parameters, request body
/// (a `$ref` name), success responses and errors.
struct Op<'a> {
    route: &'static str,
    scope: Scope,
    summary: &'a str,
    description: &'a str,
    params: Vec<Value>,
    body: Option<(&'a str, Value)>,
    body_required: bool,
    ok: Vec<(&'a str, Value)>,
    errors: Vec<ApiError>,
}

impl Op<'_> {
    fn build(self, operation_id: &str, tag: &str) -> Value {
        let mut errors = auth_errors(self.scope);
        errors.extend(self.errors);
        let mut responses = Map::new();
        for (status, response) in self.ok {
            responses.insert(status.to_owned(), response);
        }
        responses.extend(error_responses(&errors));
        let mut op = json!({
            "operationId": operation_id,
            "x-tokenrelay-route": self.route,
            "tags": [tag],
            "summary": self.summary,
            "description": self.description,
            "security": [{"apiKey": []}],
            "parameters": self.params,
            "responses": responses,
        });
        if let Some((schema, example)) = self.body {
            op["requestBody"] = json!({
                "required": self.body_required,
                "content": {"application/json": {
                    "schema": {"$ref": format!("#/components/schemas/{schema}")},
                    "example": example,
                }},
            });
        }
        op
    }
}

fn param_ref(name: &str) -> Value {
    json!({"$ref": format!("#/components/parameters/{name}")})
}

const TOKEN_ID: &str = "6f1c2a9e-9a43-4a53-9f35-4b1b2d6f5c11";
const PCI_ID: &str = "0b7d9c2e-31f4-4a8e-b0d5-2c6f1e9a7b44";
const NOW: &str = "2026-12-01T10:00:00Z";

fn token_example() -> Value {
    json!({
        "id": TOKEN_ID,
        "status": "active",
        "network_token_type": "vts",
        "scheme": "visa",
        "last4": "0978",
        "expiry_month": 12,
        "expiry_year": 2030,
        "pci_token_id": PCI_ID,
        "supports_device_binding": false,
        "scheme_reference": "sbx_tr_5f0c",
        "scheme_metadata": {},
        "metadata": {"order": "1234"},
        "created_at": NOW,
        "updated_at": NOW,
    })
}

fn pci_example() -> Value {
    json!({
        "id": PCI_ID,
        "last4": "0978",
        "bin": "489537",
        "scheme": "visa",
        "expiry_month": 12,
        "expiry_year": 2030,
        "cardholder_name": "A. Cardholder",
        "metadata": {},
        "created_at": NOW,
    })
}

/// The network-token operations.
fn network_paths(paths: &mut Map<String, Value>) {
    let tag = "network tokens";
    let provision = Op {
        route: "provision_token",
        scope: Scope::Tokens,
        summary: "Provision a network token",
        description: "From a card number (compliance `saq-d`/`roc` only) or a PCI token. \
                      A card number also creates (or reuses, by fingerprint) the card's PCI token.",
        params: vec![param_ref("IdempotencyKey")],
        body: Some((
            "ProvisionRequest",
            json!({
                "source": {"type": "pan", "number": "4111111111111111", "expiry_month": 12,
                           "expiry_year": 2030, "cardholder_name": "A. Cardholder"},
                "metadata": {"order": "1234"},
            }),
        )),
        body_required: true,
        ok: vec![(
            "201",
            with_links(
                json_ok("The new token.", "Token", token_example()),
                &[
                    ("getNetworkToken", json!({"path.id": "$response.body#/id"})),
                    ("createCryptogram", json!({"path.id": "$response.body#/id"})),
                    ("applyTokenEvent", json!({"path.id": "$response.body#/id"})),
                    (
                        "deleteNetworkToken",
                        json!({"path.id": "$response.body#/id"}),
                    ),
                ],
            ),
        )],
        errors: {
            let mut e = body_errors();
            e.extend([
                ApiError::SourceNotPermitted("pan", "saq-a"),
                ApiError::SourceNotSupported(String::new()),
                ApiError::InvalidCard {
                    field: "",
                    reason: "",
                },
                ApiError::InvalidMetadata(String::new()),
                ApiError::IdempotencyKeyReused,
                ApiError::PciTokenNotFound,
            ]);
            e.extend(session_errors());
            e
        },
    };
    paths.insert(
        "/api/network/tokens".into(),
        json!({"post": provision.build("provisionNetworkToken", tag)}),
    );

    let get = Op {
        route: "get_token",
        scope: Scope::Tokens,
        summary: "Read a network token",
        description: "Never the TPAN or the card number.",
        params: vec![],
        body: None,
        body_required: false,
        ok: vec![("200", json_ok("The token.", "Token", token_example()))],
        errors: vec![ApiError::TokenNotFound],
    };
    let delete = Op {
        route: "delete_token",
        scope: Scope::Tokens,
        summary: "Delete a network token",
        description: "The token becomes `deleted` and all its outstanding references die.",
        params: vec![],
        body: None,
        body_required: false,
        ok: vec![("204", no_content("Deleted."))],
        errors: vec![ApiError::TokenNotFound],
    };
    paths.insert(
        "/api/network/tokens/{id}".into(),
        json!({
            "parameters": [param_ref("TokenId")],
            "get": get.build("getNetworkToken", tag),
            "delete": delete.build("deleteNetworkToken", tag),
        }),
    );

    let cryptogram = Op {
        route: "create_cryptogram",
        scope: Scope::Cryptograms,
        summary: "Request a cryptogram",
        description: "Inline (compliance `saq-d`/`roc`, their default) or as a single-use \
                      cryptogram reference (the only mode at `saq-a`).",
        params: vec![param_ref("IdempotencyKey")],
        body: Some((
            "CryptogramRequest",
            json!({"type": "ecom", "mode": "reference", "amount": "10.00", "currency": "EUR"}),
        )),
        body_required: true,
        ok: vec![
            (
                "200",
                json_ok(
                    "An inline cryptogram.",
                    "InlineCryptogram",
                    json!({
                        "cryptogram": "AAAAImsOa0Bo2dC4PV6M8gAAAAA=", "dynamic_cvv": null,
                        "type": "tavv", "eci": "07", "expiry_month": 12, "expiry_year": 2030,
                        "number": "4895370000000978", "metadata": {},
                    }),
                ),
            ),
            (
                "201",
                with_links(
                    json_ok(
                        "A cryptogram reference.",
                        "CryptogramReference",
                        json!({
                            "cryptogram_reference": "cref_9mN2q4wYb7Rk1sT8vX3zA6",
                            "expires_at": "2026-12-01T10:15:00Z", "type": "tavv", "eci": "07",
                            "metadata": {},
                        }),
                    ),
                    &[(
                        "forward_post",
                        json!({
                            "path.id": "$request.path.id",
                            "header.x-cryptogram-reference": "$response.body#/cryptogram_reference",
                        }),
                    )],
                ),
            ),
        ],
        errors: {
            let mut e = body_errors();
            e.extend([
                ApiError::TokenNotFound,
                ApiError::InlineNotPermitted,
                ApiError::DauthNotActivated,
                ApiError::TokenNotActive(""),
                ApiError::InvalidCryptogramRequest(String::new()),
                ApiError::InvalidMetadata(String::new()),
                ApiError::IdempotencyKeyReused,
                ApiError::ReferenceStoreFull,
            ]);
            e
        },
    };
    paths.insert(
        "/api/network/tokens/{id}/cryptograms".into(),
        json!({
            "parameters": [param_ref("TokenId")],
            "post": cryptogram.build("createCryptogram", tag),
        }),
    );

    let event = Op {
        route: "token_event",
        scope: Scope::Admin,
        summary: "Apply a sandbox lifecycle event",
        description: "As a token service would send it: suspend, resume, delete, \
                      update_expiry, activate_dauth.",
        params: vec![],
        body: Some(("TokenEvent", json!({"event": "suspend"}))),
        body_required: true,
        ok: vec![(
            "200",
            json_ok("The token after the event.", "Token", token_example()),
        )],
        errors: {
            let mut e = body_errors();
            e.extend([ApiError::TokenNotFound, ApiError::TokenNotActive("")]);
            e
        },
    };
    paths.insert(
        "/api/network/tokens/{id}/events".into(),
        json!({
            "parameters": [param_ref("TokenId")],
            "post": event.build("applyTokenEvent", tag),
        }),
    );
}

/// What spending a session source can answer with.
fn session_errors() -> Vec<ApiError> {
    vec![
        ApiError::SessionNotFound,
        ApiError::SessionAlreadyUsed,
        ApiError::InvalidSessionData(""),
    ]
}

/// `POST /api/sessions` (contract §11).
fn session_paths(paths: &mut Map<String, Value>) {
    let create = Op {
        route: "create_session",
        scope: Scope::Tokens,
        summary: "Open a card-capture session",
        description: "A fresh P-256 key for the browser to encrypt one card to (JWE, ECDH-ES + \
                      A256GCM, `kid` the session id); single use, `session_ttl`. The body is \
                      empty or `{}`.",
        params: vec![],
        body: Some(("SessionRequest", json!({}))),
        body_required: false,
        ok: vec![(
            "201",
            json_ok(
                "The session and its public key.",
                "Session",
                json!({
                    "id": "sess_4mR8vN2qT6wYb1sK9xZ3aC",
                    "public_key": {"kty": "EC", "crv": "P-256",
                                   "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
                                   "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0",
                                   "kid": "sess_4mR8vN2qT6wYb1sK9xZ3aC",
                                   "alg": "ECDH-ES", "use": "enc"},
                    "expires_at": "2026-12-01T10:15:00Z",
                }),
            ),
        )],
        errors: body_errors(),
    };
    paths.insert(
        "/api/sessions".into(),
        json!({"post": create.build("createSession", "sessions")}),
    );
}

/// The PCI-token operations.
fn pci_paths(paths: &mut Map<String, Value>) {
    let tag = "pci tokens";
    let create = Op {
        route: "create_pci_token",
        scope: Scope::Tokens,
        summary: "Store a card as a PCI token",
        description: "Compliance `saq-d`/`roc`. The CVC, if given, is held in memory for one \
                      forward and at most `cvc_ttl`, never stored.",
        params: vec![],
        body: Some((
            "PciTokenRequest",
            json!({"number": "4111111111111111", "expiry_month": 12, "expiry_year": 2030,
                   "cvc": "123", "cardholder_name": "A. Cardholder"}),
        )),
        body_required: true,
        ok: vec![
            (
                "201",
                with_links(
                    json_ok("The new PCI token.", "PciToken", pci_example()),
                    &[
                        ("getPciToken", json!({"path.id": "$response.body#/id"})),
                        ("forward_pci_post", json!({"path.id": "$response.body#/id"})),
                        ("deletePciToken", json!({"path.id": "$response.body#/id"})),
                    ],
                ),
            ),
            (
                "200",
                json_ok(
                    "The card was already stored: its PCI token's id, and only what the card \
                     number itself gives (never the stored expiry or cardholder name). A later \
                     expiry in the request (a reissued card) replaced the stored one, with the \
                     cardholder name if given; an earlier or equal one changed nothing.",
                    "PciTokenExisting",
                    json!({"id": PCI_ID, "last4": "0978", "bin": "489537", "scheme": "visa",
                           "created_at": NOW}),
                ),
            ),
        ],
        errors: {
            let mut e = body_errors();
            e.extend([
                ApiError::SourceNotPermitted("pan", "saq-a"),
                ApiError::InvalidCard {
                    field: "",
                    reason: "",
                },
                ApiError::InvalidMetadata(String::new()),
            ]);
            e.extend(session_errors());
            e
        },
    };
    paths.insert(
        "/api/pci/tokens".into(),
        json!({"post": create.build("createPciToken", tag)}),
    );

    let get = Op {
        route: "get_pci_token",
        scope: Scope::Tokens,
        summary: "Read a PCI token",
        description: "Never the card number.",
        params: vec![],
        body: None,
        body_required: false,
        ok: vec![("200", json_ok("The PCI token.", "PciToken", pci_example()))],
        errors: vec![ApiError::PciTokenNotFound],
    };
    let delete = Op {
        route: "delete_pci_token",
        scope: Scope::Tokens,
        summary: "Delete a PCI token",
        description: "The card is removed; network tokens made from it keep their own lifecycle.",
        params: vec![],
        body: None,
        body_required: false,
        ok: vec![("204", no_content("Deleted."))],
        errors: vec![ApiError::PciTokenNotFound],
    };
    paths.insert(
        "/api/pci/tokens/{id}".into(),
        json!({
            "parameters": [param_ref("PciTokenId")],
            "get": get.build("getPciToken", tag),
            "delete": delete.build("deletePciToken", tag),
        }),
    );
}

/// The methods a forward relays (and is documented for); any other is a 405.
const FORWARD_METHODS: [&str; 7] = ["get", "head", "post", "put", "patch", "delete", "options"];

/// Both forward endpoints, one operation per method.
fn forward_paths(paths: &mut Map<String, Value>) {
    let common = || {
        vec![
            ApiError::MissingHeader(""),
            ApiError::InvalidDestination(String::new()),
            ApiError::DestinationNotAllowed(String::new()),
            ApiError::BodyTooLarge(0),
            ApiError::InvalidTemplate(String::new()),
            ApiError::DestinationUnreachable(String::new()),
            ApiError::DestinationFailed(String::new()),
            ApiError::DestinationTimeout(String::new()),
            ApiError::HeaderNotAllowed(String::new()),
            ApiError::RenderedTooLarge(0),
            ApiError::ResponseNotRedactable(String::new()),
            ApiError::InvalidUpstreamResponse(String::new()),
            ApiError::IdempotencyKeyReused,
            ApiError::ForwardOutcomeUnknown,
            e_invalid_request(),
        ]
    };
    let free_form = || {
        let mut e = common();
        e.push(ApiError::FreeFormForwardDisabled);
        e
    };
    let relayed = json!({
        "description": "The acquirer's response, relayed as it arrives (status, headers and body; \
                        at `saq-a` injected values are masked in it), with \
                        `x-relay-upstream-duration-ms`. With `x-relay-dry-run: true`: the rendered \
                        request with every injected value masked (schema `DryRun`).",
        "headers": {
            "x-relay-upstream-duration-ms": {"schema": {"type": "string", "pattern": "^[0-9]+$"},
                "description": "Milliseconds to the acquirer's response head (not on a dry run)."},
            "x-relay-idempotent-replay": {"schema": {"type": "string", "enum": ["true"]},
                "description": "The answer recorded for this `x-idempotency-key`, given again: \
                                nothing was consumed or sent."},
            "x-relay-idempotent-body": {"schema": {"type": "string", "enum": ["truncated"]},
                "description": "On a replay: the recorded body is the head of the answer, \
                                cut at `forward_record_max_bytes`."},
        },
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/DryRun"}},
            "*/*": {"schema": {}},
        },
    });
    let acquirer = json!({"description": "Any other answer of the acquirer, relayed unchanged \
                                          (without `x-relay-error`)."});
    for (path, route, tag, id_param, needs_reference, extra) in [
        (
            "/api/network/tokens/{id}/forward",
            "forward",
            "forward",
            "TokenId",
            true,
            (|| {
                vec![
                    ApiError::TokenNotFound,
                    ApiError::ReferenceNotFound,
                    ApiError::ReferenceAlreadyUsed,
                    ApiError::ReferenceTokenMismatch,
                    ApiError::TokenNotActive(""),
                ]
            }) as fn() -> Vec<ApiError>,
        ),
        (
            "/api/pci/tokens/{id}/forward",
            "forward_pci",
            "forward",
            "PciTokenId",
            false,
            || {
                vec![
                    ApiError::PciTokenNotFound,
                    ApiError::SecurityCodeUnavailable,
                ]
            },
        ),
    ] {
        let mut item = Map::new();
        item.insert("parameters".into(), json!([param_ref(id_param)]));
        for method in FORWARD_METHODS {
            let mut params = vec![param_ref("DestinationUrl")];
            if needs_reference {
                params.push(param_ref("CryptogramReference"));
            }
            params.extend([
                param_ref("DryRun"),
                param_ref("IdempotencyKey"),
                param_ref("RelayHeaderName"),
                param_ref("RelayHeaderValue"),
            ]);
            let mut errors = free_form();
            errors.extend(extra());
            let has_body = matches!(method, "post" | "put" | "patch");
            let op = Op {
                route,
                scope: Scope::Forward,
                summary: if needs_reference {
                    "Forward a request with a network token and a cryptogram"
                } else {
                    "Forward a request with the card number (FPAN fallback)"
                },
                description:
                    "The request is sent to `x-destination-url` with `<< placeholders >>` \
                              in its body, header values, path and query rendered. Nothing is \
                              consumed until every check has passed.",
                params,
                body: None,
                body_required: false,
                ok: vec![("200", relayed.clone()), ("default", acquirer.clone())],
                errors,
            };
            let mut built = op.build(&format!("{route}_{method}"), tag);
            if has_body {
                built["requestBody"] = json!({
                    "required": false,
                    "description": "The acquirer's request with placeholders, in any content type.",
                    "content": {"*/*": {"schema": {}}},
                });
            }
            item.insert(method.into(), built);
        }
        paths.insert(path.into(), Value::Object(item));
    }

    // Routes (contract §10): destination, method and template fixed in the
    // config; the merchant's JSON object is the template's `input`.
    for (path, route, id_param, needs_reference, extra) in [
        (
            "/api/network/tokens/{id}/forward/{route}",
            "forward_route",
            "TokenId",
            true,
            (|| {
                vec![
                    ApiError::TokenNotFound,
                    ApiError::ReferenceNotFound,
                    ApiError::ReferenceAlreadyUsed,
                    ApiError::ReferenceTokenMismatch,
                    ApiError::TokenNotActive(""),
                ]
            }) as fn() -> Vec<ApiError>,
        ),
        (
            "/api/pci/tokens/{id}/forward/{route}",
            "forward_pci_route",
            "PciTokenId",
            false,
            || {
                vec![
                    ApiError::PciTokenNotFound,
                    ApiError::SecurityCodeUnavailable,
                ]
            },
        ),
    ] {
        let mut params = vec![param_ref("RouteName")];
        if needs_reference {
            params.push(param_ref("CryptogramReference"));
        }
        params.push(param_ref("DryRun"));
        params.push(param_ref("IdempotencyKey"));
        let mut errors = common();
        errors.retain(|e| {
            !matches!(
                e,
                ApiError::MissingHeader(_)
                    | ApiError::InvalidDestination(_)
                    | ApiError::DestinationNotAllowed(_)
                    | ApiError::InvalidTemplate(_)
            )
        });
        errors.extend([
            ApiError::MissingHeader(""),
            ApiError::UnknownRoute,
            ApiError::RouteNotPermitted(String::new()),
            ApiError::InvalidRouteInput(String::new()),
        ]);
        errors.extend(extra());
        let op = Op {
            route,
            scope: Scope::Forward,
            summary: "Forward through an operator-defined route",
            description: "The route's template, compiled at start-up, is rendered with the \
                          token's values and the request body as `input`, and sent to the \
                          route's fixed destination. Nothing is consumed until it has \
                          rendered once with masked values.",
            params,
            body: Some((
                "RouteInput",
                json!({"amount": {"currency": "EUR", "value": 1000}, "reference": "order-1234"}),
            )),
            body_required: false,
            ok: vec![("200", relayed.clone()), ("default", acquirer.clone())],
            errors,
        };
        paths.insert(
            path.into(),
            json!({
                "parameters": [param_ref(id_param)],
                "post": op.build(route, "routes"),
            }),
        );
    }
}

fn components() -> Value {
    let metadata = json!({
        "type": "object",
        "description": "At most 20 pairs; keys up to 20 characters, values up to 80, strings only.",
        "maxProperties": 20,
        "propertyNames": {"maxLength": 20},
        "additionalProperties": {"type": "string", "maxLength": 80},
    });
    // Responses carry numbers; requests also take a decimal string, and null
    // for any optional member (read as absent), as the handlers do.
    let month = json!({"type": "integer", "minimum": 1, "maximum": 12});
    let year = json!({"type": "integer", "minimum": 2000, "maximum": 2100});
    let in_month = json!({"anyOf": [month, {"type": "string", "pattern": "^(0?[1-9]|1[0-2])$"}]});
    let in_year = json!({"anyOf": [year, {"type": "string", "pattern": "^(20[0-9]{2}|2100)$"}]});
    let opt = |schema: Value| json!({"anyOf": [schema, {"type": "null"}]});
    let card_number = json!({"type": "string", "pattern": "^[0-9]{12,19}$",
                              "description": "The card number (PAN)."});
    json!({
        "securitySchemes": {
            "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key",
                       "description": "A key from `[[api_keys]]` (stored there as a hash)."},
            "bearer": {"type": "http", "scheme": "bearer",
                       "description": "The same API key as `Authorization: Bearer`, on the \
                                       compatible surfaces only."},
        },
        "headers": {
            "RelayError": {"schema": {"type": "string"},
                           "description": "The classifier: marks an error tokenrelay produced."},
            "RequestId": {"schema": {"type": "string"},
                          "description": "The request id (passed through or generated)."},
        },
        "parameters": {
            "TokenId": {"name": "id", "in": "path", "required": true,
                        "schema": {"type": "string", "format": "uuid"}, "example": TOKEN_ID},
            "PciTokenId": {"name": "id", "in": "path", "required": true,
                           "schema": {"type": "string", "format": "uuid"}, "example": PCI_ID},
            "IdempotencyKey": {"name": "x-idempotency-key", "in": "header", "required": false,
                               "schema": {"type": "string", "minLength": 1, "maxLength": 255}},
            "DestinationUrl": {"name": "x-destination-url", "in": "header", "required": true,
                               "description": "Absolute URL on the allow-list; placeholders may \
                                               appear in its path and query.",
                               "schema": {"type": "string"},
                               "example": "https://api.acquirer.example/v1/payments"},
            "CryptogramReference": {"name": "x-cryptogram-reference", "in": "header",
                                    "required": true, "schema": {"type": "string"},
                                    "example": "cref_9mN2q4wYb7Rk1sT8vX3zA6"},
            "RouteName": {"name": "route", "in": "path", "required": true,
                          "description": "A `[[routes]]` name.",
                          "schema": {"type": "string", "pattern": "^[a-z0-9-]+$"},
                          "example": "adyen-payments"},
            "DryRun": {"name": "x-relay-dry-run", "in": "header", "required": false,
                       "schema": {"type": "string", "enum": ["true", "false"]}},
            "RelayHeaderName": {"name": "x-relay-header-name", "in": "header", "required": false,
                                "description": "A header name tokenrelay reserves, to send to \
                                                the acquirer under that name.",
                                "schema": {"type": "string"}},
            "RelayHeaderValue": {"name": "x-relay-header-value", "in": "header",
                                 "required": false, "schema": {"type": "string"}},
        },
        "schemas": {
            "Error": {
                "type": "object",
                "required": ["code", "classifier", "message"],
                "additionalProperties": false,
                "properties": {
                    "code": {"type": "integer"},
                    "classifier": {"type": "string", "pattern": "^[a-z_]+$"},
                    "message": {"type": "string"},
                },
            },
            "Metadata": metadata,
            "Token": {
                "type": "object",
                "additionalProperties": false,
                "required": ["id", "status", "network_token_type", "scheme", "last4",
                             "expiry_month", "expiry_year", "pci_token_id",
                             "supports_device_binding", "scheme_reference", "scheme_metadata",
                             "metadata", "created_at", "updated_at"],
                "properties": {
                    "id": {"type": "string", "format": "uuid"},
                    "status": {"enum": ["active", "inactive", "deleted", "unprovisioned"]},
                    "network_token_type": {"enum": ["vts", "mdes", "tms", "hgts"]},
                    "scheme": {"enum": ["visa", "mastercard", "amex", "discover"]},
                    "last4": {"type": "string", "pattern": "^[0-9]{4}$"},
                    "expiry_month": month,
                    "expiry_year": year,
                    "pci_token_id": {"type": ["string", "null"], "format": "uuid"},
                    "supports_device_binding": {"type": "boolean"},
                    "scheme_reference": {"type": "string"},
                    "scheme_metadata": {"type": "object",
                                        "additionalProperties": {"type": "string"}},
                    "metadata": {"$ref": "#/components/schemas/Metadata"},
                    "created_at": {"type": "string", "format": "date-time"},
                    "updated_at": {"type": "string", "format": "date-time"},
                },
            },
            "PciToken": {
                "type": "object",
                "additionalProperties": false,
                "required": ["id", "last4", "bin", "scheme", "expiry_month", "expiry_year",
                             "metadata", "created_at"],
                "properties": {
                    "id": {"type": "string", "format": "uuid"},
                    "last4": {"type": "string", "pattern": "^[0-9]{4}$"},
                    "bin": {"type": "string", "pattern": "^[0-9]{6}$"},
                    "scheme": {"enum": ["visa", "mastercard", "amex", "discover"]},
                    "expiry_month": month,
                    "expiry_year": year,
                    "cardholder_name": {"type": ["string", "null"]},
                    "metadata": {"$ref": "#/components/schemas/Metadata"},
                    "created_at": {"type": "string", "format": "date-time"},
                },
            },
            "PciTokenExisting": {
                "type": "object",
                "additionalProperties": false,
                "required": ["id", "last4", "bin", "scheme", "created_at"],
                "properties": {
                    "id": {"type": "string", "format": "uuid"},
                    "last4": {"type": "string", "pattern": "^[0-9]{4}$"},
                    "bin": {"type": "string", "pattern": "^[0-9]{6}$"},
                    "scheme": {"enum": ["visa", "mastercard", "amex", "discover"]},
                    "created_at": {"type": "string", "format": "date-time"},
                },
            },
            "PanSource": {
                "type": "object",
                "additionalProperties": false,
                "required": ["type", "number", "expiry_month", "expiry_year"],
                "properties": {
                    "type": {"const": "pan"},
                    "number": card_number,
                    "expiry_month": in_month,
                    "expiry_year": in_year,
                    "cvc": opt(json!({"type": "string", "pattern": "^[0-9]{3,4}$"})),
                    "cardholder_name": opt(json!({"type": "string", "maxLength": 100})),
                },
            },
            "SessionSource": {
                "type": "object",
                "additionalProperties": false,
                "required": ["type", "id", "data"],
                "description": "A card the browser encrypted to a session's key.",
                "properties": {
                    "type": {"const": "session"},
                    "id": {"type": "string"},
                    "data": {"type": "string", "description": "JWE compact serialization."},
                },
            },
            "SessionRequest": {"type": "object", "additionalProperties": false},
            "Session": {
                "type": "object",
                "additionalProperties": false,
                "required": ["id", "public_key", "expires_at"],
                "properties": {
                    "id": {"type": "string", "pattern": "^sess_"},
                    "public_key": {
                        "type": "object",
                        "required": ["kty", "crv", "x", "y", "kid", "alg", "use"],
                        "properties": {
                            "kty": {"const": "EC"}, "crv": {"const": "P-256"},
                            "x": {"type": "string"}, "y": {"type": "string"},
                            "kid": {"type": "string"}, "alg": {"const": "ECDH-ES"},
                            "use": {"const": "enc"},
                        },
                    },
                    "expires_at": {"type": "string", "format": "date-time"},
                },
            },
            "PciTokenSource": {
                "type": "object",
                "additionalProperties": false,
                "required": ["type", "id"],
                "properties": {
                    "type": {"const": "pci_token"},
                    "id": {"type": "string", "format": "uuid"},
                },
            },
            "ProvisionRequest": {
                "type": "object",
                "additionalProperties": false,
                "required": ["source"],
                "properties": {
                    "source": {"oneOf": [
                        {"$ref": "#/components/schemas/PanSource"},
                        {"$ref": "#/components/schemas/PciTokenSource"},
                        {"$ref": "#/components/schemas/SessionSource"},
                    ]},
                    "metadata": opt(json!({"$ref": "#/components/schemas/Metadata"})),
                    "dauth_activated": {"type": ["boolean", "null"],
                                        "description": "Sandbox: activate delegated authentication."},
                },
            },
            "PciTokenRequest": {"oneOf": [
                {"$ref": "#/components/schemas/PciCardRequest"},
                {"$ref": "#/components/schemas/PciSessionRequest"},
            ]},
            "PciCardRequest": {
                "type": "object",
                "additionalProperties": false,
                "description": "The card itself (compliance `saq-d`/`roc`).",
                "required": ["number", "expiry_month", "expiry_year"],
                "properties": {
                    "number": card_number,
                    "expiry_month": in_month,
                    "expiry_year": in_year,
                    "cvc": opt(json!({"type": "string", "pattern": "^[0-9]{3,4}$"})),
                    "cardholder_name": opt(json!({"type": "string", "maxLength": 100})),
                    "metadata": opt(json!({"$ref": "#/components/schemas/Metadata"})),
                },
            },
            "PciSessionRequest": {
                "type": "object",
                "additionalProperties": false,
                "description": "A card encrypted in the browser (any compliance level).",
                "required": ["source"],
                "properties": {
                    "source": {"$ref": "#/components/schemas/SessionSource"},
                    "metadata": opt(json!({"$ref": "#/components/schemas/Metadata"})),
                },
            },
            "CryptogramRequest": {
                "type": "object",
                "additionalProperties": false,
                "required": ["type"],
                "properties": {
                    "type": {"enum": ["ecom", "dauth"]},
                    "mode": {"enum": ["inline", "reference", null]},
                    "metadata": opt(json!({"$ref": "#/components/schemas/Metadata"})),
                    "amount": opt(json!({"anyOf": [
                        {"type": "number", "minimum": 0},
                        {"type": "string", "pattern": "^[0-9]{1,15}(\\.[0-9]{1,3})?$"},
                    ]})),
                    "currency": opt(json!({"type": "string", "pattern": "^[A-Za-z]{3}$",
                                         "description": "ISO 4217"})),
                    "transaction_type": opt(json!({"type": "string", "minLength": 1, "maxLength": 32})),
                    "cryptogram_type": {"enum": ["tavv", "dynamic_cvv", null]},
                },
            },
            "InlineCryptogram": {
                "type": "object",
                "additionalProperties": false,
                "required": ["cryptogram", "dynamic_cvv", "type", "eci", "expiry_month",
                             "expiry_year", "number", "metadata"],
                "properties": {
                    "cryptogram": {"type": ["string", "null"]},
                    "dynamic_cvv": {"type": ["string", "null"], "pattern": "^[0-9]{3}$"},
                    "type": {"enum": ["tavv", "dynamic_cvv"]},
                    "eci": {"type": "string", "pattern": "^[0-9]{2}$"},
                    "expiry_month": month,
                    "expiry_year": year,
                    "number": {"type": "string", "pattern": "^[0-9]{12,19}$"},
                    "metadata": {"$ref": "#/components/schemas/Metadata"},
                },
            },
            "CryptogramReference": {
                "type": "object",
                "additionalProperties": false,
                "required": ["cryptogram_reference", "expires_at", "type", "eci", "metadata"],
                "properties": {
                    "cryptogram_reference": {"type": "string", "minLength": 22},
                    "expires_at": {"type": "string", "format": "date-time"},
                    "type": {"enum": ["tavv", "dynamic_cvv"]},
                    "eci": {"type": "string", "pattern": "^[0-9]{2}$"},
                    "metadata": {"$ref": "#/components/schemas/Metadata"},
                },
            },
            "TokenEvent": {
                "type": "object",
                "additionalProperties": false,
                "required": ["event"],
                "properties": {
                    "event": {"enum": ["suspend", "resume", "delete", "update_expiry",
                                       "activate_dauth"]},
                    "expiry_month": opt(in_month.clone()),
                    "expiry_year": opt(in_year.clone()),
                },
            },
            "RouteInput": {
                "type": "object",
                "description": "The merchant's own fields, as the route's template reads them \
                                (`input.…`).",
            },
            "DryRun": {
                "type": "object",
                "additionalProperties": false,
                "required": ["method", "url", "headers", "body"],
                "properties": {
                    "method": {"type": "string"},
                    "url": {"type": "string"},
                    "headers": {"type": "object", "additionalProperties": {"type": "string"}},
                    "body": {"type": "string"},
                },
            },
        },
    })
}

fn main_value() -> Value {
    let mut components = components();
    if let Some(Value::Object(schemas)) = components.get_mut("schemas") {
        for (name, text) in SURFACE_SCHEMAS {
            embed(schemas, name, text);
        }
        schemas.insert("JpmcCryptogramRequest".into(), jpmc_request_schema());
    }
    let mut paths = Map::new();
    network_paths(&mut paths);
    pci_paths(&mut paths);
    forward_paths(&mut paths);
    session_paths(&mut paths);
    surface_paths(&mut paths);
    paths.insert(
        "/openapi.json".into(),
        json!({"get": {
            "operationId": "openapi",
            "x-tokenrelay-route": "openapi",
            "tags": ["meta"],
            "summary": "This document",
            "security": [],
            "responses": {"200": {"description": "OpenAPI 3.1",
                                  "content": {"application/json": {"schema": {"type": "object"}}}}},
        }}),
    );
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "tokenrelay",
            "version": env!("CARGO_PKG_VERSION"),
            "summary": "Network-token vault and forward-injection reverse proxy.",
            "description": "Provision network tokens, take single-use cryptogram references and \
                            forward acquirer requests with `<< placeholders >>` that tokenrelay \
                            renders. Every error tokenrelay produces carries `x-relay-error`.",
            "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
        },
        "servers": [{"url": "http://127.0.0.1:8080", "description": "The local-try profile."}],
        "security": [{"apiKey": []}],
        "tags": [
            {"name": "network tokens"}, {"name": "pci tokens"}, {"name": "forward"},
            {"name": "routes"}, {"name": "sessions"},
            {"name": "vgs cmp", "description": "VGS Card Management Platform compatible (seed 003)."},
            {"name": "j.p. morgan", "description": "J.P. Morgan `/cryptograms` compatible (seed 001)."},
            {"name": "meta"},
        ],
        "paths": paths,
        "components": components,
    })
}

fn admin_value() -> Value {
    let text = |description: &str| {
        json!({"description": description,
               "content": {"text/plain": {"schema": {"type": "string"}}}})
    };
    let op = |id: &str, summary: &str, responses: Value| json!({"get": {"operationId": id, "summary": summary, "responses": responses}});
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "tokenrelay admin",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Health and metrics, on `admin_listen`; no API key, no secrets.",
            "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
        },
        "servers": [{"url": "http://127.0.0.1:9090"}],
        "paths": {
            "/healthz": op("healthz", "Process up", json!({"200": text("Serving.")})),
            "/readyz": op("readyz", "Stores reachable", json!({
                "200": text("The vault and the reference store answer."),
                "503": text("A store does not answer; the body names which."),
            })),
            "/metrics": op("metrics", "Prometheus metrics", json!({"200": {
                "description": "OpenMetrics text exposition.",
                "content": {"application/openmetrics-text": {"schema": {"type": "string"}}},
            }})),
            "/openapi.json": op("openapi", "This document", json!({"200": {
                "description": "OpenAPI 3.1",
                "content": {"application/json": {"schema": {"type": "object"}}},
            }})),
        },
    })
}

/// The seed-derived JSON Schemas of the compatible surfaces, shared with
/// `tests/surfaces.rs`, which validates every answer against them.
const SURFACE_SCHEMAS: [(&str, &str); 6] = [
    (
        "VgsNetworkTokenResponse",
        include_str!("../openapi/schemas/vgs_network_token_response.json"),
    ),
    (
        "VgsCryptogramResponse",
        include_str!("../openapi/schemas/vgs_cryptogram_response.json"),
    ),
    (
        "VgsCryptoFetchRequest",
        include_str!("../openapi/schemas/vgs_crypto_fetch_request.json"),
    ),
    (
        "VgsError",
        include_str!("../openapi/schemas/vgs_error_response.json"),
    ),
    (
        "JpmcCryptogramResponse",
        include_str!("../openapi/schemas/jpmc_cryptogram_response.json"),
    ),
    (
        "JpmcError",
        include_str!("../openapi/schemas/jpmc_error_response.json"),
    ),
];

/// Puts a standalone JSON Schema into `schemas` as `name`: its `$defs` go
/// beside it as `{name}_{def}`, its local `$ref`s are rewritten to match, and
/// the resource keywords (`$schema`, `$id`) go, as components carry none.
fn embed(schemas: &mut Map<String, Value>, name: &str, text: &str) {
    fn rewrite(node: &mut Value, name: &str) {
        match node {
            Value::Object(map) => {
                if let Some(Value::String(r)) = map.get_mut("$ref") {
                    if let Some(def) = r.strip_prefix("#/$defs/") {
                        *r = format!("#/components/schemas/{name}_{def}");
                    }
                }
                map.values_mut().for_each(|v| rewrite(v, name));
            }
            Value::Array(items) => items.iter_mut().for_each(|v| rewrite(v, name)),
            _ => {}
        }
    }
    // The files are the project's own, checked by tests/openapi.rs: one that
    // does not parse shows there as a missing schema.
    let Ok(Value::Object(mut schema)) = serde_json::from_str::<Value>(text) else {
        return;
    };
    schema.remove("$schema");
    schema.remove("$id");
    if let Some(Value::Object(defs)) = schema.remove("$defs") {
        for (def, mut body) in defs {
            rewrite(&mut body, name);
            schemas.insert(format!("{name}_{def}"), body);
        }
    }
    let mut schema = Value::Object(schema);
    rewrite(&mut schema, name);
    schemas.insert(name.to_owned(), schema);
}

/// The J.P. Morgan request, from seed 001: the token named by
/// `tokenReferenceIdentifier` or `tokenNumber`; the brand table's fields
/// (`transactionType`, `initiatedBy`, `randomNumber`, `amounts.amount`) are
/// checked by the handler, per brand. The device block is echoed.
fn jpmc_request_schema() -> Value {
    json!({
        "type": "object",
        "required": ["paymentInstrument"],
        "properties": {
            "paymentOrder": {"type": "object", "properties": {
                "amounts": {"type": "object", "properties": {
                    "amount": {"type": "integer", "minimum": 0,
                               "description": "Minor units of `currency`."},
                    "currency": {"type": "string", "pattern": "^[A-Za-z]{3}$"},
                }},
                "device": {"type": "object"},
                "initiatedBy": {"type": "string"},
                "transactionType": {"type": "string"},
            }},
            "paymentInstrument": {"type": "object", "properties": {
                "tokenReferenceIdentifier": {"type": "string", "format": "uuid"},
                "tokenNumber": {"type": "string"},
                "tokenCryptogramType": {"enum": ["TAVV", "DTVV", "UCAF", "DCSC"]},
                "randomNumber": {"type": ["string", "integer"]},
                "accountholderName": {"type": "string"},
                "tokenType": {"type": "string"},
            }},
        },
    })
}

/// `responses` entries for a surface's errors, through that surface's own
/// status rule and in its own error shape.
fn surface_error_responses(
    errors: &[ApiError],
    status_of: fn(&ApiError) -> http::StatusCode,
    content_type: &str,
    schema: &str,
) -> Map<String, Value> {
    let mut by_status: BTreeMap<u16, Vec<&'static str>> = BTreeMap::new();
    for e in errors {
        let classifier = e.status_and_classifier().1;
        let list = by_status.entry(status_of(e).as_u16()).or_default();
        if !list.contains(&classifier) {
            list.push(classifier);
        }
    }
    by_status
        .into_iter()
        .map(|(status, classifiers)| {
            (
                status.to_string(),
                json!({
                    "description": format!("tokenrelay error: {}", classifiers.join(", ")),
                    "headers": {"x-relay-error": {"$ref": "#/components/headers/RelayError"}},
                    "content": {content_type: {"schema": {
                        "$ref": format!("#/components/schemas/{schema}")
                    }}},
                }),
            )
        })
        .collect()
}

/// The compatible surfaces (contract §12).
fn surface_paths(paths: &mut Map<String, Value>) {
    use crate::api::surfaces::{jpmc, vgs_cmp};
    let vgs = vgs_cmp::CONTENT_TYPE;
    let security = json!([{"apiKey": []}, {"bearer": []}]);
    let card_param = json!([{"name": "card_id", "in": "path", "required": true,
                             "description": "The card: a PCI token id.",
                             "schema": {"type": "string", "format": "uuid"}, "example": PCI_ID}]);
    let ok = |description: &str, content_type: &str, schema: &str| {
        json!({"description": description,
               "content": {content_type: {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}})
    };
    let vgs_errors = |scope: Scope, extra: Vec<ApiError>| {
        let mut e = auth_errors(scope);
        e.push(ApiError::PciTokenNotFound);
        e.extend(extra);
        surface_error_responses(&e, vgs_cmp::status, vgs, "VgsError")
    };
    let op = |id: &str,
              route: &str,
              summary: &str,
              mut responses: Map<String, Value>,
              errors: Map<String, Value>| {
        responses.extend(errors);
        json!({"operationId": id, "x-tokenrelay-route": route, "tags": ["vgs cmp"],
               "summary": summary, "security": security, "responses": responses})
    };

    let mut provision_ok = Map::new();
    provision_ok.insert(
        "201".into(),
        ok(
            "A new network token for the card.",
            vgs,
            "VgsNetworkTokenResponse",
        ),
    );
    provision_ok.insert(
        "200".into(),
        ok(
            "The card's existing active network token.",
            vgs,
            "VgsNetworkTokenResponse",
        ),
    );
    let mut delete_ok = Map::new();
    delete_ok.insert(
        "204".into(),
        json!({"description": "The card's network tokens are deleted."}),
    );
    let mut cryptogram_ok = Map::new();
    cryptogram_ok.insert(
        "200".into(),
        ok(
            "The token with a cryptogram (or, where inline is not permitted, a reference).",
            vgs,
            "VgsCryptogramResponse",
        ),
    );
    let mut cryptogram = op(
        "vgsRequestCryptogram",
        "vgs_cmp_cryptogram",
        "Request a cryptogram for the card's network token",
        cryptogram_ok,
        vgs_errors(
            Scope::Cryptograms,
            vec![
                e_invalid_request(),
                ApiError::BodyTooLarge(0),
                ApiError::TokenNotFound,
                ApiError::TokenNotActive(""),
                ApiError::InvalidCryptogramRequest(String::new()),
                ApiError::ReferenceStoreFull,
            ],
        ),
    );
    cryptogram["requestBody"] = json!({"required": false, "content": {vgs: {"schema": {
        "$ref": "#/components/schemas/VgsCryptoFetchRequest"}}}});
    paths.insert(
        "/cards/{card_id}/network-tokens".into(),
        json!({
            "parameters": card_param,
            "post": op("vgsProvisionNetworkToken", "vgs_cmp_provision",
                       "Provision a network token for a card", provision_ok,
                       vgs_errors(Scope::Tokens, vec![ApiError::InvalidCard { field: "", reason: "" }])),
            "delete": op("vgsDeleteNetworkTokens", "vgs_cmp_delete",
                         "Delete the card's network tokens", delete_ok,
                         vgs_errors(Scope::Tokens, vec![ApiError::TokenNotFound])),
        }),
    );
    paths.insert(
        "/cards/{card_id}/cryptogram".into(),
        json!({"parameters": card_param, "post": cryptogram}),
    );

    let mut jpmc_ok = Map::new();
    jpmc_ok.insert(
        "200".into(),
        ok(
            "The request echoed with the cryptogram (or a reference).",
            jpmc::CONTENT_TYPE,
            "JpmcCryptogramResponse",
        ),
    );
    let mut errors = auth_errors(Scope::Cryptograms);
    errors.extend([
        e_invalid_request(),
        ApiError::BodyTooLarge(0),
        ApiError::SourceNotPermitted("tokenNumber", "saq-a"),
        ApiError::TokenNotFound,
        ApiError::TokenNotActive(""),
        ApiError::InvalidCryptogramRequest(String::new()),
        ApiError::ReferenceStoreFull,
    ]);
    jpmc_ok.extend(surface_error_responses(
        &errors,
        jpmc::status,
        jpmc::CONTENT_TYPE,
        "JpmcError",
    ));
    paths.insert(
        "/cryptograms".into(),
        json!({"post": {
            "operationId": "jpmcRequestCryptogram",
            "x-tokenrelay-route": "jpmc_cryptogram",
            "tags": ["j.p. morgan"],
            "summary": "Request a cryptogram (J.P. Morgan shape)",
            "security": security,
            "parameters": [{"name": "request-id", "in": "header", "required": false,
                            "schema": {"type": "string"},
                            "description": "Echoed as `requestIdentifier` (generated when absent)."}],
            "requestBody": {"required": true, "content": {jpmc::CONTENT_TYPE: {"schema": {
                "$ref": "#/components/schemas/JpmcCryptogramRequest"}}}},
            "responses": jpmc_ok,
        }}),
    );
}
