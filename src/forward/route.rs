//! Routes (contract §10): operator-defined forwards.
//!
//! A route fixes what a free-form forward leaves to the merchant: the
//! destination, the method and a body template, all in `[[routes]]`. The
//! merchant posts only its own fields (a JSON object, `input` in the
//! template) to `POST /api/network/tokens/{id}/forward/{route}` or
//! `POST /api/pci/tokens/{id}/forward/{route}`.
//!
//! This module owns:
//!
//! - start-up: [`Routes::build`] checks every destination against the
//!   allow-list, reads every template file and compiles it with minijinja
//!   (strict undefined; escaping by extension: `.json.j2` JSON-serialises
//!   every output, `.xml.j2` entity-escapes, `.form.j2` percent-encodes;
//!   the §6 filters `mm`, `yy`, `yyyy`, `last4`, `first6`). A template
//!   that does not compile stops the start with its file and line.
//!   Templates are never read or compiled per request;
//! - the request: [`handle`] finds the route (404 `route_not_found`),
//!   checks the subject (403 `route_not_permitted`), runs the same checks
//!   as a free-form forward, renders the body once with masked values
//!   (422 `invalid_route_input` naming the expression) and only then hands
//!   the request to the shared steps of [`super`] (consume, send, relay,
//!   restore), so dry run, redaction, timing and metrics are the same.
//!
//! It must never put a rendered value into an error or a log: render
//! errors name the template expression (text the operator wrote) and the
//! line, never minijinja's own message, which may quote values.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response};
use hyper::body::Incoming;
use minijinja::value::{Enumerator, Object, Value as Jv};
use minijinja::{AutoEscape, Environment, ErrorKind, Output, State, UndefinedBehavior};

use super::destination::{self, Destination, DestinationError};
use super::record::Origin;
use super::{
    check_headers, finish, keyed_by, namespace, needs_reference, read_and_parse, ClientError, Error,
};
use crate::audit::{Audit, Subject};
use crate::auth::ApiKey;
use crate::config::{Config, ConfigError, DestinationRule, RouteSubject};
use crate::idempotency;
use crate::references::ReferenceId;
use crate::template::{self as placeholders, Field, Filter, Namespace, Value, Values};
use crate::{AppState, Body};

/// How a template's `{{ }}` outputs are escaped, from its file name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Escaping {
    /// `.json.j2`: every output JSON-serialised (a string gets its quotes).
    Json,
    /// `.xml.j2`: the five XML special characters entity-escaped.
    Xml,
    /// `.form.j2`: percent-encoded (RFC 3986 unreserved bytes pass).
    Form,
    /// Anything else: written as it is.
    None,
}

impl Escaping {
    /// The escaping of a template file named `name`.
    pub fn for_name(name: &str) -> Escaping {
        if name.ends_with(".json.j2") {
            Escaping::Json
        } else if name.ends_with(".xml.j2") {
            Escaping::Xml
        } else if name.ends_with(".form.j2") {
            Escaping::Form
        } else {
            Escaping::None
        }
    }

    fn auto_escape(self) -> AutoEscape {
        match self {
            Escaping::Json => AutoEscape::Json,
            Escaping::Xml => AutoEscape::Custom("xml".into()),
            Escaping::Form => AutoEscape::Custom("form".into()),
            Escaping::None => AutoEscape::None,
        }
    }

    /// The `content-type` the outbound request carries, replacing the
    /// merchant's (which describes its JSON input, not the rendered body).
    fn content_type(self) -> Option<HeaderValue> {
        match self {
            Escaping::Json => Some(HeaderValue::from_static("application/json")),
            Escaping::Xml => Some(HeaderValue::from_static("application/xml")),
            Escaping::Form => Some(HeaderValue::from_static(
                "application/x-www-form-urlencoded",
            )),
            Escaping::None => None,
        }
    }
}

/// One compiled route.
pub struct Route {
    /// The configured name.
    pub name: String,
    /// The outbound method.
    pub method: Method,
    destination: Destination,
    network: bool,
    pci: bool,
    /// The template's name in the environment: its path as configured.
    template: String,
    /// The template source, to name the expression an error points at.
    source: Arc<str>,
    content_type: Option<HeaderValue>,
    /// The token fields the template names (what redaction masks and
    /// whether a CVC is taken).
    fields: Vec<Field>,
    env: Arc<Environment<'static>>,
}

impl std::fmt::Debug for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Route")
            .field("name", &self.name)
            .field("method", &self.method)
            .field("host", &self.destination.host)
            .field("template", &self.template)
            .finish_non_exhaustive()
    }
}

/// Every configured route, compiled at start-up.
#[derive(Debug, Default)]
pub struct Routes {
    by_name: HashMap<String, Arc<Route>>,
}

impl Routes {
    /// Checks each route's destination against `rules`, reads and compiles
    /// its template. Errors name the key (`routes[i].destination`,
    /// `routes[i].template`) and, for a template, its file and line.
    pub fn build(
        config: &Config,
        rules: &[DestinationRule],
        delims: (&str, &str),
    ) -> Result<Routes, ConfigError> {
        let mut env = environment();
        let mut staged = Vec::with_capacity(config.routes.len());
        for (i, r) in config.routes.iter().enumerate() {
            let key = |field: &str| format!("routes[{i}].{field}");
            let destination =
                destination::parse(&r.destination, rules, delims).map_err(|e| ConfigError {
                    key: key("destination"),
                    message: match e {
                        DestinationError::Invalid(m) => format!("{}: {m}", r.destination),
                        DestinationError::NotAllowed(m) => {
                            format!("{} is not on the allow-list: {m}", r.destination)
                        }
                    },
                })?;
            if destination.path.contains(delims.0)
                || destination
                    .query
                    .as_deref()
                    .is_some_and(|q| q.contains(delims.0))
            {
                return Err(ConfigError {
                    key: key("destination"),
                    message: "a route's destination is fixed: no placeholders".into(),
                });
            }
            let name = r.template.display().to_string();
            let source = std::fs::read_to_string(&r.template).map_err(|e| ConfigError {
                key: key("template"),
                message: format!("cannot read {name}: {e}"),
            })?;
            let escaping = Escaping::for_name(&name);
            env.add_template_owned(name.clone(), source.clone())
                .map_err(|e| ConfigError {
                    key: key("template"),
                    message: compile_message(&name, &e),
                })?;
            staged.push((i, r, destination, name, Arc::<str>::from(source), escaping));
        }
        // Which token values each template names: known once compiled.
        let env = Arc::new(env);
        let mut by_name = HashMap::with_capacity(staged.len());
        for (i, r, destination, name, source, escaping) in staged {
            let template = env.get_template(&name).map_err(|e| ConfigError {
                key: format!("routes[{i}].template"),
                message: compile_message(&name, &e),
            })?;
            let names = template.undeclared_variables(false);
            let fields = Field::ALL
                .into_iter()
                .filter(|f| names.contains(f.name()))
                .collect();
            by_name.insert(
                r.name.clone(),
                Arc::new(Route {
                    name: r.name.clone(),
                    method: r.method.clone(),
                    destination,
                    network: r.subjects.contains(&RouteSubject::NetworkToken),
                    pci: r.subjects.contains(&RouteSubject::PciToken),
                    template: name,
                    source,
                    content_type: escaping.content_type(),
                    fields,
                    env: env.clone(),
                }),
            );
        }
        Ok(Routes { by_name })
    }

    /// The route named `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<Route>> {
        self.by_name.get(name)
    }

    /// How many routes are configured.
    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    /// Whether no route is configured.
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }
}

/// `file line N: what` for a template that does not compile. Compile
/// errors come from the template text alone, so minijinja's detail is safe.
fn compile_message(name: &str, e: &minijinja::Error) -> String {
    let line = e.line().map_or_else(String::new, |l| format!(" line {l}"));
    let detail = e.detail().unwrap_or("");
    format!("{name}{line}: {} {detail}", e.kind())
        .trim_end()
        .to_owned()
}

/// The environment every route template is compiled into: strict
/// undefined, escaping by file name, the §6 filters, no loader (a template
/// cannot include a file).
fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.set_debug(true);
    env.set_auto_escape_callback(|name| Escaping::for_name(name).auto_escape());
    env.set_formatter(format);
    for filter in [
        Filter::Mm,
        Filter::Yy,
        Filter::Yyyy,
        Filter::Last4,
        Filter::First6,
    ] {
        env.add_filter(filter.name(), move |v: Jv| apply(filter, v));
    }
    env
}

/// A §6 format filter on the value's string form; `none` stays `none`.
fn apply(filter: Filter, v: Jv) -> Result<Jv, minijinja::Error> {
    if v.is_undefined() {
        return Err(minijinja::Error::new(
            ErrorKind::UndefinedError,
            "filter applied to an undefined value",
        ));
    }
    if v.is_none() {
        return Ok(v);
    }
    let mut text = match v.as_str() {
        Some(s) => s.to_owned(),
        None => v.to_string(),
    };
    placeholders::apply_filter(filter, &mut text);
    Ok(Jv::from(text))
}

/// Writes one `{{ }}` output, escaped for the template's format.
fn format(out: &mut Output, state: &mut State, value: &Jv) -> Result<(), minijinja::Error> {
    let escape: fn(&[u8], &mut Vec<u8>) = match state.auto_escape() {
        AutoEscape::Custom(name) if name == "xml" => placeholders::xml_escape,
        AutoEscape::Custom(name) if name == "form" => placeholders::percent_encode,
        AutoEscape::None if value.is_none() => return Ok(()),
        _ => return minijinja::escape_formatter(out, state, value),
    };
    if value.is_none() {
        // As in free-form templates: no value is empty text.
        return Ok(());
    }
    let text = match value.as_str() {
        Some(s) if value.is_safe() => return Ok(out.write_str(s)?),
        Some(s) => std::borrow::Cow::Borrowed(s),
        None => std::borrow::Cow::Owned(value.to_string()),
    };
    let mut buf = Vec::with_capacity(text.len() + 8);
    escape(text.as_bytes(), &mut buf);
    // The escapes only ever write ASCII in place of ASCII.
    out.write_str(&String::from_utf8_lossy(&buf))?;
    Ok(())
}

/// A route body to render: the route and the merchant's input.
pub struct Rendering {
    route: Arc<Route>,
    input: Jv,
    ns: Namespace,
}

impl Rendering {
    /// `route`'s body for the merchant's `input` (the parsed JSON object),
    /// rendered for a token of namespace `ns`.
    fn new(route: &Arc<Route>, input: Jv, ns: Namespace) -> Rendering {
        Rendering {
            route: route.clone(),
            input,
            ns,
        }
    }

    /// As the request path builds it, from the request body's bytes (a JSON
    /// object, or empty for `{}`); public for `benches/template.rs`.
    pub fn from_body(route: &Arc<Route>, body: &[u8], ns: Namespace) -> Result<Rendering, Error> {
        Ok(Rendering::new(route, input(body)?, ns))
    }

    /// The token fields the template names.
    pub(super) fn fields(&self) -> impl Iterator<Item = Field> + '_ {
        self.route.fields.iter().copied()
    }

    /// The body with the token's real values.
    pub fn render(&self, values: &dyn Values) -> Result<Bytes, Error> {
        let mut ctx = BTreeMap::new();
        for field in self.fields().filter(|f| f.in_namespace(self.ns)) {
            ctx.insert(field.name(), to_jinja(values.get(field, None)));
        }
        self.render_with(ctx)
    }

    /// The body with every token value masked (`***`; a metadata map has
    /// `***` under any key): the render that must succeed before anything
    /// is consumed, and what a dry run shows.
    pub(super) fn render_masked(&self) -> Result<Bytes, Error> {
        let mut ctx = BTreeMap::new();
        for field in self.fields().filter(|f| f.in_namespace(self.ns)) {
            let v = if field.takes_key() {
                Jv::from_object(MaskedMap)
            } else {
                Jv::from(MASK)
            };
            ctx.insert(field.name(), v);
        }
        self.render_with(ctx)
    }

    fn render_with(&self, mut ctx: BTreeMap<&'static str, Jv>) -> Result<Bytes, Error> {
        ctx.insert("input", self.input.clone());
        let route = &self.route;
        let template = route
            .env
            .get_template(&route.template)
            .map_err(|e| Error::bug(format!("route {}: {}", route.name, e.kind())))?;
        template
            .render(Jv::from_pairs(ctx))
            .map(Bytes::from)
            .map_err(|e| ClientError::InvalidRouteInput(render_message(route, &e)).into())
    }
}

const MASK: &str = "***";

/// A metadata map in a masked render: `***` under every key.
#[derive(Debug)]
struct MaskedMap;

impl Object for MaskedMap {
    fn get_value(self: &Arc<Self>, _key: &Jv) -> Option<Jv> {
        Some(Jv::from(MASK))
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::Empty
    }
}

/// A placeholder value as a template value.
fn to_jinja(v: Value<'_>) -> Jv {
    match v {
        Value::Str(s) => Jv::from(s),
        Value::Int(n) => Jv::from(n),
        Value::Bool(b) => Jv::from(b),
        Value::Null => Jv::from(()),
        Value::Map(m) => Jv::from_pairs(m.iter().map(|(k, v)| (k.as_str(), v.as_str()))),
    }
}

/// The merchant's JSON input as a template value.
fn from_json(v: &serde_json::Value) -> Jv {
    use serde_json::Value as J;
    match v {
        J::Null => Jv::from(()),
        J::Bool(b) => Jv::from(*b),
        J::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => Jv::from(i),
            (None, Some(u)) => Jv::from(u),
            (None, None) => Jv::from(n.as_f64().unwrap_or(f64::NAN)),
        },
        J::String(s) => Jv::from(s.as_str()),
        J::Array(a) => a.iter().map(from_json).collect(),
        J::Object(o) => Jv::from_pairs(o.iter().map(|(k, v)| (k.as_str(), from_json(v)))),
    }
}

/// Why a route did not render, naming the expression and the line: the
/// template's own text, never a value.
fn render_message(route: &Route, e: &minijinja::Error) -> String {
    // minijinja's span of `input.amount.value` may cover `.amount.value`
    // only: widen it to the whole dotted name.
    let src = &*route.source;
    let expr = e
        .range()
        .map(|r| {
            let start = src.get(..r.start).map_or(r.start, |head| {
                head.trim_end_matches(|c: char| c.is_ascii_alphanumeric() || c == '_' || c == '.')
                    .len()
            });
            start..r.end
        })
        .and_then(|r| src.get(r))
        .map(str::trim)
        .filter(|s| !s.is_empty() && s.len() <= 80);
    // The file name only: the merchant need not learn the server's paths.
    let file = Path::new(&route.template).file_name().map_or_else(
        || route.template.clone(),
        |f| f.to_string_lossy().into_owned(),
    );
    let at = match (expr, e.line()) {
        (Some(x), Some(l)) => format!("`{x}` ({file} line {l})"),
        (Some(x), None) => format!("`{x}` ({file})"),
        (None, Some(l)) => format!("{file} line {l}"),
        (None, None) => file,
    };
    match e.kind() {
        ErrorKind::UndefinedError => {
            format!(
                "route {}: {at} is not defined (missing input field?)",
                route.name
            )
        }
        kind => format!("route {}: {kind} at {at}", route.name),
    }
}

/// `POST /api/{network,pci}/tokens/{id}/forward/{route}`. The route found
/// is named in `audit.forward_route`; the caller, which turns the result
/// into HTTP, counts it under that name with its status.
pub async fn handle(
    state: &Arc<AppState>,
    key: &ApiKey,
    subject: Subject,
    name: &str,
    req: Request<Incoming>,
    audit: &mut Audit,
) -> Result<Response<Body>, Error> {
    let started = Instant::now();
    let route = state
        .forwarder
        .routes
        .get(name)
        .ok_or(ClientError::UnknownRoute)?
        .clone();
    audit.forward_route = Some(route.name.clone());
    forward(state, key, subject, &route, req, audit, started).await
}

async fn forward(
    state: &Arc<AppState>,
    key: &ApiKey,
    subject: Subject,
    route: &Arc<Route>,
    req: Request<Incoming>,
    audit: &mut Audit,
    started: Instant,
) -> Result<Response<Body>, Error> {
    let permitted = match subject {
        Subject::NetworkToken(_) => route.network,
        Subject::PciToken(_) => route.pci,
    };
    if !permitted {
        return Err(ClientError::RouteNotPermitted(format!(
            "route {} is not open to {} forwards",
            route.name,
            match subject {
                Subject::NetworkToken(_) => "network-token",
                Subject::PciToken(_) => "PCI-token",
            }
        ))
        .into());
    }
    if req.method() != Method::POST {
        return Err(ClientError::MethodNotAllowed("POST").into());
    }
    let client_key = idempotency::client_key(req.headers())?.map(str::to_owned);
    let fwd = &state.forwarder;
    let checked = check_headers(
        fwd,
        req.headers(),
        needs_reference(subject),
        Some(&route.destination),
    )
    .await?;
    audit.destination_host = Some(checked.destination.host.clone());
    let mut parsed = read_and_parse(state, &checked, req, namespace(subject), false).await?;
    let input = input(&parsed.body.input)?;
    parsed.method = route.method.clone();
    if let Some(ct) = &route.content_type {
        parsed.headers.retain(|(n, _)| n != header::CONTENT_TYPE);
        parsed.headers.push((
            header::CONTENT_TYPE,
            super::Part {
                input: Bytes::copy_from_slice(ct.as_bytes()),
                template: None,
            },
        ));
    }
    let rendering = Rendering::new(route, input, namespace(subject));
    // Nothing is consumed until the route renders with masked values.
    rendering.render_masked()?;
    parsed.route = Some(rendering);
    let reference = checked.reference.as_ref().map(ReferenceId::as_str);
    let keyed = keyed_by(
        key,
        client_key.as_deref(),
        subject,
        Origin::Route {
            name: &route.name,
            reference,
        },
        &checked,
        &parsed,
    );
    finish(state, keyed, subject, checked, parsed, audit, started).await
}

/// The merchant's body: a JSON object (empty means `{}`).
fn input(body: &[u8]) -> Result<Jv, Error> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Jv::from_pairs(std::iter::empty::<(&str, Jv)>()));
    }
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(v @ serde_json::Value::Object(_)) => Ok(from_json(&v)),
        _ => Err(ClientError::InvalidRequest(
            "a route forward's body must be a JSON object (the route's input)",
        )
        .into()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn env_with(name: &str, src: &str) -> Environment<'static> {
        let mut env = environment();
        env.add_template_owned(name.to_owned(), src.to_owned())
            .unwrap();
        env
    }

    fn render(name: &str, src: &str, ctx: Jv) -> Result<String, minijinja::Error> {
        env_with(name, src).get_template(name).unwrap().render(ctx)
    }

    #[test]
    fn escaping_follows_the_extension() {
        let ctx = Jv::from_pairs([
            ("s", Jv::from("a\"<&> b/+=")),
            ("n", Jv::from(12)),
            ("none", Jv::from(())),
        ]);
        assert_eq!(
            render("t.json.j2", "{{ s }} {{ n }} {{ none }}", ctx.clone()).unwrap(),
            r#""a\"<&> b/+=" 12 null"#
        );
        assert_eq!(
            render("t.xml.j2", "{{ s }}|{{ n }}|{{ none }}", ctx.clone()).unwrap(),
            "a&quot;&lt;&amp;&gt; b/+=|12|"
        );
        assert_eq!(
            render("t.form.j2", "{{ s }}|{{ n }}|{{ none }}", ctx.clone()).unwrap(),
            "a%22%3C%26%3E%20b%2F%2B%3D|12|"
        );
        assert_eq!(
            render("t.txt.j2", "{{ s }}|{{ none }}", ctx).unwrap(),
            "a\"<&> b/+=|"
        );
    }

    #[test]
    fn section_6_filters() {
        let ctx = Jv::from_pairs([
            ("m", Jv::from(3)),
            ("y", Jv::from(2031)),
            ("n", Jv::from("4111111111111111")),
            ("none", Jv::from(())),
        ]);
        assert_eq!(
            render(
                "t.json.j2",
                "{{ m | mm }} {{ y | yy }} {{ y | yy | yyyy }} {{ n | last4 }} {{ n | first6 }} {{ none | mm }}",
                ctx
            )
            .unwrap(),
            r#""03" "31" "2031" "1111" "411111" null"#
        );
    }

    #[test]
    fn strict_undefined_names_the_expression_never_a_value() {
        let src = "{\"pan\": {{ number }},\n \"amount\": {{ input.amount.value }}}";
        let env = Arc::new(env_with("r.json.j2", src));
        let route = Route {
            name: "r".into(),
            method: Method::POST,
            destination: destination::parse(
                "https://a.example/p",
                &[DestinationRule {
                    host: crate::config::HostPattern::Exact("a.example".into()),
                    port: 443,
                    scheme: crate::config::DestScheme::Https,
                    allow_private: false,
                    ca_file: None,
                    client_cert: None,
                    client_key: None,
                }],
                ("<<", ">>"),
            )
            .unwrap(),
            network: true,
            pci: false,
            template: "r.json.j2".into(),
            source: src.into(),
            content_type: None,
            fields: vec![Field::Number],
            env,
        };
        let r = Rendering {
            route: Arc::new(route),
            input: Jv::from_pairs([("amount", Jv::from_pairs([("currency", "EUR")]))]),
            ns: Namespace::NetworkToken,
        };
        let e = r.render_masked().unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("`input.amount.value`"), "{msg}");
        assert!(msg.contains("line 2"), "{msg}");
        assert!(!msg.contains("***"), "{msg}");
    }

    #[test]
    fn a_broken_template_names_its_file_and_line() {
        let mut env = environment();
        let e = env
            .add_template_owned("fixtures/x.json.j2", "{\n  \"a\": {{ input.a }\n}")
            .unwrap_err();
        let msg = compile_message("fixtures/x.json.j2", &e);
        assert!(msg.starts_with("fixtures/x.json.j2 line 2:"), "{msg}");
    }
}
