//! The forward proxy (contract §6): `<ANY> /api/network/tokens/{id}/forward`.
//!
//! One request walks these named steps, and nothing is consumed until the
//! request is known to be good:
//!
//! 1. auth — done by the router (`forward` scope); `CONNECT`, `TRACE` and
//!    `TRACK` refused (405);
//! 2. [`check_headers`] — both headers present, destination parsed, on the
//!    allow-list, resolved once and its addresses checked; `x-relay-dry-run`
//!    is `true` or `false`;
//! 3. [`read_and_parse`] — body read under `max_body_bytes`, placeholders
//!    parsed in the body, header values and the URL's path and query; the
//!    reserved-header escape only for tokenrelay's own names; the rendered
//!    size bounded by `max_rendered_bytes`;
//! 4. [`consume`] — token active, reference taken atomically (or only
//!    peeked, for a dry run); for a PCI token, the held CVC taken;
//! 5. [`send`] — render, connect, send; a connection that fails before any
//!    byte was written restores the reference;
//! 6. [`relay`] — status, headers and body streamed back. With redaction
//!    on, the acquirer is asked for `accept-encoding: identity` and an
//!    answer with any other `content-encoding` is refused (502
//!    `response_not_redactable`): compressed echoes cannot be masked, and
//!    decoding, masking and re-encoding would cost a decompressor per
//!    forward for no merchant benefit on a sidecar hop. An answer framed
//!    by both `content-length` and `transfer-encoding` is refused (502
//!    `invalid_upstream_response`).
//!
//! With `x-idempotency-key`, steps 4 to 6 run under [`record::keyed`]
//! (contract §9): a retry gets the first answer, recorded as it streamed.
//! Every forward endpoint passes its request through that hook once it is
//! checked and parsed, naming what it spends ([`record::Origin`]).
//!
//! Its failures are [`Error`]s, classified by source (the merchant's
//! request, the acquirer, ours; see [`error`]): the module knows nothing of
//! `api`, whose `error` module alone turns them into HTTP.
//!
//! This module never logs a rendered body or header, and its errors name
//! placeholders and hosts, never values.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;

use crate::audit::{Audit, Subject};
use crate::auth::ApiKey;
use crate::body::{check_content_length, json_response, read_body};
use crate::card::Secret;
use crate::config::{Config, DestinationRule, PlaceholderSyntax};
use crate::idempotency;
use crate::references::{Payload, Reference, ReferenceId, TakeError};
use crate::template::{Context, Field, Namespace, Syntax, Template, Value, Values};
use crate::vault::{NetworkToken, PciToken, TokenStatus};
use crate::{AppState, Body};

pub mod claim;
pub mod destination;
pub mod error;
pub mod headers;
pub mod record;
pub mod redact;
pub mod route;
pub mod upstream;

pub use error::{ClientError, Error, InternalError, UpstreamError};

use destination::{Destination, DestinationError, Resolver};
use headers::{
    X_CRYPTOGRAM_REFERENCE, X_DESTINATION_URL, X_RELAY_DRY_RUN, X_RELAY_HEADER_NAME,
    X_RELAY_HEADER_VALUE, X_RELAY_REQUEST_ID, X_RELAY_UPSTREAM_DURATION_MS,
};
use record::{Executed, Origin};
use redact::{RedactingBody, Redactor};
use upstream::{ConnectError, PooledBody, SendError};

/// How long a DNS answer stays pinned for the allow-list and the connector.
const RESOLUTION_PIN: Duration = Duration::from_secs(30);

/// The forward machinery built at start-up: allow-list, resolver, client.
pub struct Forwarder {
    rules: Arc<[DestinationRule]>,
    resolver: Resolver,
    clients: upstream::Clients,
    syntax: Syntax,
    delims: (&'static str, &'static str),
    connect_timeout: Duration,
    response_timeout: Duration,
    /// The operator's `[[routes]]`, compiled.
    pub routes: route::Routes,
    /// Keyed forwards in flight on this replica, by record key.
    pub flights: claim::Flights,
}

impl Forwarder {
    /// Builds TLS configs and the pooled client; fails on bad TLS files.
    pub fn new(
        config: &Config,
        metrics: Arc<crate::telemetry::Metrics>,
    ) -> Result<Self, crate::config::ConfigError> {
        let rules: Arc<[DestinationRule]> = config.destinations.clone().into();
        let resolver = Resolver::new(RESOLUTION_PIN);
        let clients = upstream::Clients::new(
            rules.clone(),
            &config.upstream,
            resolver.clone(),
            metrics,
            config.workers,
        )?;
        let (syntax, delims) = match config.placeholder_syntax {
            PlaceholderSyntax::Angle => (Syntax::Angle, ("<<", ">>")),
            PlaceholderSyntax::Braces => (Syntax::Braces, ("{{", "}}")),
        };
        let routes = route::Routes::build(config, &rules, delims)?;
        Ok(Self {
            routes,
            flights: claim::Flights::default(),
            rules,
            resolver,
            clients,
            syntax,
            delims,
            connect_timeout: config.upstream.connect_timeout,
            response_timeout: config.upstream.response_timeout,
        })
    }
}

/// Step 2's result.
struct Checked {
    reference: Option<ReferenceId>,
    destination: Destination,
    dry_run: bool,
}

/// A piece of the outbound request: as given, or a template over it.
struct Part {
    input: Bytes,
    template: Option<Template>,
}

impl Part {
    fn parse(
        input: Bytes,
        fwd: &Forwarder,
        ns: Namespace,
        ctx: Context,
        what: &dyn std::fmt::Display,
    ) -> Result<Part, Error> {
        if memchr::memmem::find(&input, fwd.delims.0.as_bytes()).is_none() {
            return Ok(Part {
                input,
                template: None,
            });
        }
        let t = Template::parse(&input, fwd.syntax, ctx, ns)
            .map_err(|e| ClientError::InvalidTemplate(format!("{what}: {e}")))?;
        Ok(Part {
            template: (!t.is_static()).then_some(t),
            input,
        })
    }

    /// Most bytes this part can render to.
    fn max_len(&self) -> usize {
        self.template
            .as_ref()
            .map_or(self.input.len(), Template::max_rendered_len)
    }

    fn fields(&self) -> impl Iterator<Item = Field> + '_ {
        self.template
            .iter()
            .flat_map(|t| t.placeholders().map(|p| p.field))
    }

    fn render(&self, values: &dyn Values) -> Bytes {
        match &self.template {
            None => self.input.clone(),
            Some(t) => Bytes::from(t.render_to_vec(&self.input, values)),
        }
    }
}

/// Step 3's result: everything needed to build the outbound request.
struct Parsed {
    method: Method,
    path: Part,
    query: Option<Part>,
    headers: Vec<(HeaderName, Part)>,
    body: Part,
    /// A route forward: the body is the route's template over the
    /// merchant's input (`body`), not `body` itself.
    route: Option<route::Rendering>,
}

impl Parsed {
    fn parts(&self) -> impl Iterator<Item = &Part> {
        std::iter::once(&self.path)
            .chain(self.query.iter())
            .chain(self.headers.iter().map(|(_, p)| p))
            .chain(std::iter::once(&self.body))
    }

    /// Every token field the outbound request names.
    fn fields(&self) -> impl Iterator<Item = Field> + '_ {
        self.parts()
            .flat_map(Part::fields)
            .chain(self.route.iter().flat_map(route::Rendering::fields))
    }

    /// The outbound body with `values`.
    fn body(&self, values: &dyn Values) -> Result<Bytes, Error> {
        match &self.route {
            None => Ok(self.body.render(values)),
            Some(r) => r.render(values),
        }
    }

    /// The outbound body with every value masked (dry run).
    fn masked_body(&self) -> Result<Bytes, Error> {
        match &self.route {
            None => Ok(self.body.render(&Masked)),
            Some(r) => r.render_masked(),
        }
    }

    /// The secret values this request injects: what redaction masks.
    fn redactor(&self, values: &dyn Values) -> Redactor {
        let mut secrets = Vec::new();
        for field in self.fields() {
            if matches!(
                field,
                Field::Number
                    | Field::Cryptogram
                    | Field::DynamicCvv
                    | Field::AccountNumber
                    | Field::SecurityCode
            ) {
                if let Value::Str(v) = values.get(field, None) {
                    secrets.push(v);
                }
            }
        }
        Redactor::new(secrets)
    }
}

/// A forward for a network token spends a cryptogram reference.
fn needs_reference(subject: Subject) -> bool {
    matches!(subject, Subject::NetworkToken(_))
}

/// The placeholder namespace a forward for `subject` renders.
fn namespace(subject: Subject) -> Namespace {
    match subject {
        Subject::NetworkToken(_) => Namespace::NetworkToken,
        Subject::PciToken(_) => Namespace::PciToken,
    }
}

/// The methods a forward relays.
const FORWARD_METHODS: [Method; 7] = [
    Method::GET,
    Method::HEAD,
    Method::POST,
    Method::PUT,
    Method::PATCH,
    Method::DELETE,
    Method::OPTIONS,
];

/// What a forward's 405 lists in `Allow`: [`FORWARD_METHODS`].
const FORWARD_ALLOW: &str = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS";

/// `<ANY> /api/network/tokens/{id}/forward`
pub async fn handle(
    state: &Arc<AppState>,
    key: &ApiKey,
    subject: Subject,
    req: Request<Incoming>,
    audit: &mut Audit,
) -> Result<Response<Body>, Error> {
    let started = Instant::now();
    if state.config.routes_only {
        return Err(ClientError::FreeFormForwardDisabled.into());
    }
    let fwd = &state.forwarder;
    // The methods an acquirer API takes, and nothing else: CONNECT would
    // open a tunnel, TRACE/TRACK echo the request (with its rendered values)
    // back, and an extension method is no payment either.
    if !FORWARD_METHODS.contains(req.method()) {
        return Err(ClientError::MethodNotAllowed(FORWARD_ALLOW).into());
    }
    let client_key = idempotency::client_key(req.headers())?.map(str::to_owned);
    let checked = check_headers(fwd, req.headers(), needs_reference(subject), None).await?;
    audit.destination_host = Some(checked.destination.host.clone());
    let parsed = read_and_parse(state, &checked, req, namespace(subject), true).await?;
    let reference = checked.reference.as_ref().map(ReferenceId::as_str);
    let keyed = keyed_by(
        key,
        client_key.as_deref(),
        subject,
        Origin::Reference(reference),
        &checked,
        &parsed,
    );
    finish(state, keyed, subject, checked, parsed, audit, started).await
}

/// The record key and fingerprint a forward runs under: `None` without an
/// `x-idempotency-key`, and for a dry run (it consumes and sends nothing,
/// so there is nothing to record).
fn keyed_by(
    key: &ApiKey,
    client_key: Option<&str>,
    subject: Subject,
    origin: Origin<'_>,
    checked: &Checked,
    parsed: &Parsed,
) -> Option<(String, [u8; 32])> {
    let client_key = client_key.filter(|_| !checked.dry_run)?;
    Some((
        idempotency::record_key((&key.name, RECORD_SCOPE), client_key),
        record::fingerprint(subject, origin, checked, parsed),
    ))
}

/// Steps 4 to 6, shared by free-form and route forwards ([`execute`]),
/// under the idempotency record `keyed` names when there is one (see
/// [`record::keyed`]).
async fn finish(
    state: &Arc<AppState>,
    keyed: Option<(String, [u8; 32])>,
    subject: Subject,
    checked: Checked,
    parsed: Parsed,
    audit: &mut Audit,
    started: Instant,
) -> Result<Response<Body>, Error> {
    let result = match keyed {
        Some((record_key, fingerprint)) => {
            let sent = &mut audit.sent_upstream;
            record::keyed(
                state,
                record_key,
                fingerprint,
                sent,
                move |state| async move {
                    execute(&state, subject, &checked, &parsed, &mut false).await
                },
            )
            .await
        }
        None => execute(state, subject, &checked, &parsed, &mut audit.sent_upstream)
            .await
            .into_result(),
    };
    state
        .metrics
        .forward_duration
        .observe(started.elapsed().as_secs_f64());
    result
}

/// The idempotency scope of every forward endpoint: one key names one
/// payment, whichever endpoint and token it went through.
const RECORD_SCOPE: &str = "forward";

/// Steps 4 to 6, once the request is known to be good: consume, send,
/// relay, restoring what was consumed when nothing was sent.
/// `sent_upstream` is set while the acquirer may have the request (see
/// [`Audit::sent_upstream`]).
async fn execute(
    state: &AppState,
    subject: Subject,
    checked: &Checked,
    parsed: &Parsed,
    sent_upstream: &mut bool,
) -> Executed {
    let bound = match consume(state, subject, checked, parsed).await {
        Ok(b) => b,
        Err(e) => return Executed::NotSent(Err(e)),
    };
    if checked.dry_run {
        return Executed::NotSent(dry_run(&checked.destination, parsed));
    }
    // Until `send` says nothing left, the acquirer may have the request.
    *sent_upstream = true;
    let result = match &bound {
        Bound::Network { token, reference } => {
            send(
                state,
                checked,
                parsed,
                &NetworkTokenValues::new(token, &reference.payload),
            )
            .await
        }
        Bound::Pci { card, cvc } => {
            send(
                state,
                checked,
                parsed,
                &PciTokenValues::new(card, cvc.as_ref().map(crate::cvc::HeldCvc::secret)),
            )
            .await
        }
    };
    match result {
        Ok(r) => Executed::Sent(Ok(r)),
        Err(e) if !e.sent() => {
            *sent_upstream = false;
            // The payment was never attempted: what it used is usable again.
            match bound {
                Bound::Network { reference, .. } => {
                    if let Some(rid) = &checked.reference {
                        if let Err(e) = state.references.restore(rid, reference).await {
                            return Executed::NotSent(Err(e.into()));
                        }
                        state.metrics.references_restored.inc();
                    }
                }
                Bound::Pci {
                    card,
                    cvc: Some(cvc),
                } => {
                    if let Err(e) = state.cvcs.restore(card.id, cvc).await {
                        return Executed::NotSent(Err(e.into()));
                    }
                }
                Bound::Pci { cvc: None, .. } => {}
            }
            Executed::NotSent(Err(e))
        }
        Err(e) => Executed::Sent(Err(e)),
    }
}

/// Step 2: headers present; destination well-formed, allowed, resolved and
/// its addresses checked.
/// A route passes its `fixed` destination (then `x-destination-url` must
/// be absent).
async fn check_headers(
    fwd: &Forwarder,
    headers: &HeaderMap,
    needs_reference: bool,
    fixed: Option<&Destination>,
) -> Result<Checked, Error> {
    let reference = match headers.get(&X_CRYPTOGRAM_REFERENCE) {
        Some(r) => Some(r),
        None if needs_reference => {
            return Err(ClientError::MissingHeader("x-cryptogram-reference").into())
        }
        None => None,
    };
    let destination = match fixed {
        Some(_) if headers.contains_key(&X_DESTINATION_URL) => {
            return Err(ClientError::InvalidDestination(
                "a route's destination is fixed; send no x-destination-url".into(),
            )
            .into())
        }
        Some(d) => d.clone(),
        None => {
            let url = headers
                .get(&X_DESTINATION_URL)
                .ok_or(ClientError::MissingHeader("x-destination-url"))?
                .to_str()
                .map_err(|_| ClientError::InvalidDestination("URL must be ASCII".into()))?;
            destination::parse(url, &fwd.rules, fwd.delims).map_err(|e| match e {
                DestinationError::Invalid(m) => ClientError::InvalidDestination(m),
                DestinationError::NotAllowed(m) => ClientError::DestinationNotAllowed(m),
            })?
        }
    };
    let addrs = fwd
        .resolver
        .resolve(&destination.host, destination.port)
        .await
        .map_err(|e| {
            Error::unsent(UpstreamError::Unreachable(format!(
                "cannot resolve {}: {e}",
                destination.host
            )))
        })?;
    destination::check_addresses(&addrs, fwd.rules[destination.rule].allow_private).map_err(
        |e| match e {
            DestinationError::Invalid(m) | DestinationError::NotAllowed(m) => {
                ClientError::DestinationNotAllowed(m)
            }
        },
    )?;
    let dry_run = dry_run_flag(headers)?;
    Ok(Checked {
        // A malformed reference cannot exist; it is reported at step 4.
        reference: reference
            .and_then(|r| r.to_str().ok())
            .and_then(ReferenceId::parse),
        destination,
        dry_run,
    })
}

/// `x-relay-dry-run`: absent, `true` or `false` (any case); anything else
/// is refused, so a typo never sends a real payment.
fn dry_run_flag(headers: &HeaderMap) -> Result<bool, Error> {
    let mut values = headers.get_all(&X_RELAY_DRY_RUN).iter();
    let flag = match values.next() {
        None => false,
        Some(v) if v.as_bytes().eq_ignore_ascii_case(b"true") => true,
        Some(v) if v.as_bytes().eq_ignore_ascii_case(b"false") => false,
        Some(_) => {
            return Err(
                ClientError::InvalidRequest("x-relay-dry-run must be `true` or `false`").into(),
            )
        }
    };
    if values.next().is_some() {
        return Err(ClientError::InvalidRequest("x-relay-dry-run given more than once").into());
    }
    Ok(flag)
}

/// Step 3: body under the limit, every placeholder parsed (in the body
/// only when `body_template`: a route's body is the merchant's input).
async fn read_and_parse(
    state: &AppState,
    checked: &Checked,
    req: Request<Incoming>,
    ns: Namespace,
    body_template: bool,
) -> Result<Parsed, Error> {
    let fwd = &state.forwarder;
    check_content_length(&req, state.config.max_body_bytes)?;
    let (parts, body) = req.into_parts();
    let body = read_body(body, state.config.max_body_bytes).await?;

    let ctx = Context::for_content_type(
        parts
            .headers
            .get(header::CONTENT_TYPE)
            .map(HeaderValue::as_bytes),
    );
    let body = if body_template {
        Part::parse(body, fwd, ns, ctx, &"body")?
    } else {
        Part {
            input: body,
            template: None,
        }
    };
    let dest = &checked.destination;
    let path = Part::parse(
        Bytes::from(dest.path.clone()),
        fwd,
        ns,
        Context::UrlPath,
        &"destination path",
    )?;
    let query = match &dest.query {
        Some(q) => Some(Part::parse(
            Bytes::from(q.clone()),
            fwd,
            ns,
            Context::UrlQuery,
            &"destination query",
        )?),
        None => None,
    };
    // The literal parts of the URL must make a valid URI whatever the values.
    outbound_uri(
        dest,
        &path.render(&Placeholder),
        query.as_ref().map(|q| q.render(&Placeholder)).as_deref(),
    )?;

    let mut headers = Vec::with_capacity(parts.headers.len());
    let mut map = parts.headers;
    headers::strip_hop_by_hop(&mut map);
    let escape_name = map.get(&X_RELAY_HEADER_NAME).cloned();
    let escape_value = map.get(&X_RELAY_HEADER_VALUE).cloned();
    for (name, value) in map.iter() {
        if headers::is_reserved(name) {
            continue;
        }
        let part = Part::parse(
            Bytes::copy_from_slice(value.as_bytes()),
            fwd,
            ns,
            Context::Header,
            &format_args!("header {name}"),
        )?;
        headers.push((name.clone(), part));
    }
    match (escape_name, escape_value) {
        (None, None) => {}
        (Some(n), Some(v)) => {
            let name = HeaderName::from_bytes(n.as_bytes()).map_err(|_| {
                ClientError::InvalidRequest("x-relay-header-name is not a valid header name")
            })?;
            if !headers::escapable(&name) {
                return Err(ClientError::HeaderNotAllowed(format!(
                    "x-relay-header-name may only name a header tokenrelay reserves \
                     (x-api-key, x-cryptogram-reference, x-destination-url, x-relay-dry-run, \
                     x-relay-header-name, x-relay-header-value), not `{name}`"
                ))
                .into());
            }
            let part = Part::parse(
                Bytes::copy_from_slice(v.as_bytes()),
                fwd,
                ns,
                Context::Header,
                &"x-relay-header-value",
            )?;
            headers.push((name, part));
        }
        _ => {
            return Err(ClientError::MissingHeader(
                "x-relay-header-name and x-relay-header-value go together",
            )
            .into())
        }
    }
    let parsed = Parsed {
        method: parts.method,
        path,
        query,
        headers,
        body,
        route: None,
    };
    let limit = state.config.max_rendered_bytes;
    let bound = parsed
        .parts()
        .map(Part::max_len)
        .fold(0usize, usize::saturating_add);
    if bound > limit {
        return Err(ClientError::RenderedTooLarge(limit).into());
    }
    Ok(parsed)
}

/// What step 4 bound the request to.
enum Bound {
    Network {
        token: Arc<NetworkToken>,
        reference: Reference,
    },
    Pci {
        card: Arc<PciToken>,
        cvc: Option<crate::cvc::HeldCvc>,
    },
}

/// Step 4: the token must be active and the reference usable (a real
/// forward takes it, a dry run only looks); for a PCI token, a CVC the
/// template names must be held (and is taken).
async fn consume(
    state: &AppState,
    subject: Subject,
    checked: &Checked,
    parsed: &Parsed,
) -> Result<Bound, Error> {
    let token_id = match subject {
        Subject::NetworkToken(id) => id,
        Subject::PciToken(id) => {
            let card = state
                .tokens
                .get_pci(id)
                .await?
                .ok_or(ClientError::PciTokenNotFound)?;
            let wants_cvc = parsed.fields().any(|f| f == Field::SecurityCode);
            let cvc = match (wants_cvc, checked.dry_run) {
                (false, _) => None,
                (true, true) if state.cvcs.is_held(id).await? => None,
                (true, false) => Some(
                    state
                        .cvcs
                        .take(id)
                        .await?
                        .ok_or(ClientError::SecurityCodeUnavailable)?,
                ),
                (true, true) => return Err(ClientError::SecurityCodeUnavailable.into()),
            };
            return Ok(Bound::Pci { card, cvc });
        }
    };
    let token = state
        .tokens
        .get_current(token_id)
        .await?
        .ok_or(ClientError::TokenNotFound)?;
    if token.status != TokenStatus::Active {
        return Err(ClientError::TokenNotActive(token.status.as_str()).into());
    }
    let Some(rid) = &checked.reference else {
        state.metrics.references_refused.inc();
        return Err(ClientError::Reference(TakeError::NotFound).into());
    };
    let taken = if checked.dry_run {
        state.references.peek(rid, token_id).await
    } else {
        state.references.take(rid, token_id).await
    };
    match taken {
        Ok(reference) => {
            if !checked.dry_run {
                state.metrics.references_consumed.inc();
            }
            Ok(Bound::Network { token, reference })
        }
        Err(e) => {
            state.metrics.references_refused.inc();
            Err(e.into())
        }
    }
}

/// Step 5 and 6: render, send, relay. An error says whether anything
/// was sent ([`Error::sent`]): only then is what was consumed kept spent.
async fn send(
    state: &AppState,
    checked: &Checked,
    parsed: &Parsed,
    values: &(dyn Values + Sync),
) -> Result<Response<Body>, Error> {
    let fwd = &state.forwarder;
    let dest = &checked.destination;
    let redactor = if state.config.redact_responses {
        parsed.redactor(values)
    } else {
        Redactor::default()
    };
    let path = parsed.path.render(values);
    let query = parsed.query.as_ref().map(|q| q.render(values));
    let uri = outbound_uri(dest, &path, query.as_deref())?;
    let body = parsed.body(values)?;
    // The parse-time bound covers the vault's limits; this catches a value
    // beyond them (e.g. a token service's metadata) before anything is sent.
    if body.len() > state.config.max_rendered_bytes {
        return Err(ClientError::RenderedTooLarge(state.config.max_rendered_bytes).into());
    }
    let mut req = Request::builder()
        .method(parsed.method.clone())
        .uri(uri)
        .body(Full::new(body))
        .map_err(|e| Error::bug(format!("building the request: {e}")))?;
    let out = req.headers_mut();
    for (name, part) in &parsed.headers {
        if !redactor.is_empty() && name == header::ACCEPT_ENCODING {
            continue;
        }
        let value = HeaderValue::from_maybe_shared(part.render(values)).map_err(|_| {
            ClientError::InvalidTemplate(format!("header {name} renders to an invalid value"))
        })?;
        out.append(name.clone(), value);
    }
    if !redactor.is_empty() {
        // Only an uncompressed echo can be searched for the values.
        out.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("identity"),
        );
    }

    let sent_at = Instant::now();
    let budget = fwd.connect_timeout + fwd.response_timeout;
    let response = match tokio::time::timeout(budget, fwd.clients.get().request(req)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            return Err(match e {
                SendError::Connect(ConnectError::Timeout) => Error::unsent(UpstreamError::Timeout(
                    format!("connecting to {} timed out", dest.host),
                )),
                SendError::Connect(c) => {
                    Error::unsent(UpstreamError::Unreachable(format!("{}: {c}", dest.host)))
                }
                SendError::Unsent(_) => Error::unsent(UpstreamError::Unreachable(format!(
                    "{}: the connection closed before the request was written",
                    dest.host
                ))),
                SendError::Exchange(e) if upstream::tls_refused(&e) => {
                    Error::unsent(UpstreamError::Unreachable(format!(
                        "{}: TLS refused (client certificate missing or not accepted)",
                        dest.host
                    )))
                }
                SendError::Exchange(_) => Error::sent_then(UpstreamError::Failed(format!(
                    "{}: the connection failed after the request was sent; it may have reached the acquirer",
                    dest.host
                ))),
            })
        }
        Err(_) => {
            return Err(Error::sent_then(UpstreamError::Timeout(format!(
                "{} sent no response within {:?}",
                dest.host, fwd.response_timeout
            ))))
        }
    };
    let upstream_elapsed = sent_at.elapsed();
    state
        .metrics
        .upstream_duration
        .observe(upstream_elapsed.as_secs_f64());
    let h = response.headers();
    if h.contains_key(header::CONTENT_LENGTH) && h.contains_key(header::TRANSFER_ENCODING) {
        return Err(Error::sent_then(UpstreamError::InvalidResponse(format!(
            "{} framed its answer with both content-length and transfer-encoding",
            dest.host
        ))));
    }
    if !redactor.is_empty() {
        let identity = h.get_all(header::CONTENT_ENCODING).iter().all(|v| {
            v.as_bytes()
                .split(|b| *b == b',')
                .all(|c| c.trim_ascii().eq_ignore_ascii_case(b"identity"))
        });
        if !identity {
            return Err(Error::sent_then(UpstreamError::NotRedactable(format!(
                "{} answered with a content-encoding other than identity; \
                 its echoes could not be masked, so the answer was not relayed",
                dest.host
            ))));
        }
    }
    Ok(relay(response, upstream_elapsed, redactor))
}

/// Step 6: the acquirer's answer, streamed, without hop-by-hop headers.
fn relay(
    response: Response<PooledBody>,
    upstream_elapsed: Duration,
    redactor: Redactor,
) -> Response<Body> {
    let (mut parts, body) = response.into_parts();
    headers::strip_hop_by_hop(&mut parts.headers);
    // Only tokenrelay's own errors carry this header: an acquirer cannot
    // make its answer look like one.
    parts.headers.remove(&crate::X_RELAY_ERROR);
    parts.headers.remove(&X_RELAY_REQUEST_ID);
    parts.version = http::Version::default();
    parts.headers.insert(
        X_RELAY_UPSTREAM_DURATION_MS.clone(),
        HeaderValue::from(upstream_elapsed.as_millis() as u64),
    );
    let body = if redactor.is_empty() {
        body.map_err(Into::into).boxed()
    } else {
        redactor.mask_headers(&mut parts.headers);
        RedactingBody::new(body, redactor)
            .map_err(Into::into)
            .boxed()
    };
    Response::from_parts(parts, body)
}

fn outbound_uri(dest: &Destination, path: &[u8], query: Option<&[u8]>) -> Result<Uri, Error> {
    let mut s = dest.origin();
    s.reserve(path.len() + query.map_or(0, |q| q.len() + 1));
    let path = std::str::from_utf8(path)
        .map_err(|_| ClientError::InvalidDestination("path is not valid UTF-8".into()))?;
    s.push_str(path);
    if let Some(q) = query {
        s.push('?');
        s.push_str(
            std::str::from_utf8(q)
                .map_err(|_| ClientError::InvalidDestination("query is not valid UTF-8".into()))?,
        );
    }
    Uri::try_from(s).map_err(|_| {
        ClientError::InvalidDestination(
            "path or query contains characters not allowed in a URL".into(),
        )
        .into()
    })
}

/// The dry run's answer: the request as it would go out, every injected
/// value masked.
fn dry_run(dest: &Destination, parsed: &Parsed) -> Result<Response<Body>, Error> {
    let masked = Masked;
    let path = parsed.path.render(&masked);
    let query = parsed.query.as_ref().map(|q| q.render(&masked));
    let uri = outbound_uri(dest, &path, query.as_deref())?;
    let mut headers = serde_json::Map::new();
    for (name, part) in &parsed.headers {
        headers.insert(
            name.as_str().to_owned(),
            String::from_utf8_lossy(&part.render(&masked))
                .into_owned()
                .into(),
        );
    }
    Ok(json_response(
        StatusCode::OK,
        &serde_json::json!({
            "method": parsed.method.as_str(),
            "url": uri.to_string(),
            "headers": headers,
            "body": String::from_utf8_lossy(&parsed.masked_body()?),
        }),
    )?)
}

/// The values of a network-token forward.
pub struct NetworkTokenValues<'a> {
    token: &'a NetworkToken,
    payload: &'a Payload,
    id: String,
}

impl<'a> NetworkTokenValues<'a> {
    /// Values of `token` with the cryptogram in `payload`.
    pub fn new(token: &'a NetworkToken, payload: &'a Payload) -> Self {
        Self {
            token,
            payload,
            id: token.id.to_string(),
        }
    }
}

fn map_value<'m>(m: &'m crate::vault::Metadata, key: Option<&str>) -> Value<'m> {
    match key {
        None => Value::Map(m),
        Some(k) => m.get(k).map_or(Value::Null, |v| Value::Str(v)),
    }
}

impl Values for NetworkTokenValues<'_> {
    fn get(&self, field: Field, key: Option<&str>) -> Value<'_> {
        let t = self.token;
        let p = self.payload;
        match field {
            Field::Cryptogram => p
                .cryptogram
                .as_ref()
                .map_or(Value::Null, |c| Value::Str(c.expose())),
            Field::DynamicCvv => p
                .dynamic_cvv
                .as_ref()
                .map_or(Value::Null, |c| Value::Str(c.expose())),
            Field::Eci => Value::Str(p.eci),
            Field::ExpiryMonth => Value::Int(i64::from(t.expiry_month)),
            Field::ExpiryYear => Value::Int(i64::from(t.expiry_year)),
            Field::Number => Value::Str(t.tpan.expose()),
            Field::Type => Value::Str(p.cryptogram_type.as_str()),
            Field::Metadata => map_value(&p.metadata, key),
            Field::SchemeReference => Value::Str(&t.scheme_reference),
            Field::SchemeMetadata => map_value(&t.scheme_metadata, key),
            Field::Status => Value::Str(t.status.as_str()),
            Field::SupportsDeviceBinding => Value::Bool(t.supports_device_binding),
            Field::NetworkTokenId => Value::Str(&self.id),
            Field::NetworkTokenType => Value::Str(t.network_token_type.as_str()),
            Field::NetworkTokenMetadata => map_value(&t.metadata, key),
            // PCI-token names never parse in the network-token namespace.
            Field::AccountNumber
            | Field::CardholderName
            | Field::SecurityCode
            | Field::Bin
            | Field::Last4
            | Field::PciTokenId => Value::Null,
        }
    }
}

/// The values of a PCI-token forward (contract §4a).
pub struct PciTokenValues<'a> {
    card: &'a PciToken,
    cvc: Option<&'a Secret>,
    id: String,
}

impl<'a> PciTokenValues<'a> {
    /// Values of `card`, with its CVC if one was taken for this forward.
    pub fn new(card: &'a PciToken, cvc: Option<&'a Secret>) -> Self {
        Self {
            card,
            cvc,
            id: card.id.to_string(),
        }
    }
}

impl Values for PciTokenValues<'_> {
    fn get(&self, field: Field, key: Option<&str>) -> Value<'_> {
        let c = self.card;
        match field {
            Field::AccountNumber => Value::Str(c.pan.expose()),
            Field::ExpiryMonth => Value::Int(i64::from(c.expiry_month)),
            Field::ExpiryYear => Value::Int(i64::from(c.expiry_year)),
            Field::CardholderName => c.cardholder_name.as_deref().map_or(Value::Null, Value::Str),
            Field::SecurityCode => self.cvc.map_or(Value::Null, |s| Value::Str(s.expose())),
            Field::Bin => Value::Str(c.pan.first6()),
            Field::Last4 => Value::Str(c.pan.last4()),
            Field::Metadata => map_value(&c.metadata, key),
            Field::PciTokenId => Value::Str(&self.id),
            // Network-token names never parse in the PCI-token namespace.
            Field::Cryptogram
            | Field::DynamicCvv
            | Field::Eci
            | Field::Number
            | Field::Type
            | Field::SchemeReference
            | Field::SchemeMetadata
            | Field::Status
            | Field::SupportsDeviceBinding
            | Field::NetworkTokenId
            | Field::NetworkTokenType
            | Field::NetworkTokenMetadata => Value::Null,
        }
    }
}

/// Every value masked: what a dry run shows.
struct Masked;

impl Values for Masked {
    fn get(&self, _: Field, _: Option<&str>) -> Value<'_> {
        Value::Str("***")
    }
}

/// A harmless stand-in value, to check the URL's literal parts up front.
struct Placeholder;

impl Values for Placeholder {
    fn get(&self, _: Field, _: Option<&str>) -> Value<'_> {
        Value::Str("0")
    }
}
