//! Template parse + render on realistic acquirer request bodies: a ~1 KB
//! JSON authorisation, a ~10 KB one with a large line-items array, a form
//! body and an XML body. Throughput is the template's size, so criterion
//! reports bytes per second as well as time per body.
//!
//! `route_vs_free_form` sets an operator route (minijinja, the Adyen
//! fixture in `fixtures/routes/`) beside the free-form template that sends
//! the same Adyen body: per request, a route parses the merchant's JSON input
//! and renders its compiled template; a free-form forward parses and renders
//! the merchant's `<< >>` body.
//!
//! `cargo bench --bench template -- --warm-up-time 1 --measurement-time 2`

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tokenrelay::template::{Context, Field, Namespace, Syntax, Template, Value, Values};

/// The values of one network token.
struct TokenValues {
    metadata: BTreeMap<String, String>,
}

impl TokenValues {
    fn new() -> TokenValues {
        let mut metadata = BTreeMap::new();
        metadata.insert("order_id".to_owned(), "ORD-2024-000123".to_owned());
        metadata.insert("merchant".to_owned(), "acme-shop".to_owned());
        TokenValues { metadata }
    }
}

impl Values for TokenValues {
    fn get(&self, field: Field, key: Option<&str>) -> Value<'_> {
        match field {
            Field::Number => Value::Str("4895370012345678"),
            Field::Cryptogram => Value::Str("AAAABWdpJA9VbNnRDnhXAAAAAAA="),
            Field::Eci => Value::Str("07"),
            Field::ExpiryMonth => Value::Int(11),
            Field::ExpiryYear => Value::Int(2029),
            Field::Type => Value::Str("TAVV"),
            Field::NetworkTokenType => Value::Str("vts"),
            Field::Metadata => match key {
                None => Value::Map(&self.metadata),
                Some(k) => self.metadata.get(k).map_or(Value::Null, |v| Value::Str(v)),
            },
            _ => Value::Null,
        }
    }
}

/// The card part shared by the JSON bodies: six placeholders.
const JSON_CARD: &str = r#""payment_method": {
    "type": "network_token",
    "network_token": {
      "number": "<< number >>",
      "expiry_month": "<< expiry_month | unwrap >>",
      "expiry_year": "<< expiry_year | unwrap >>",
      "cryptogram": "<< cryptogram >>",
      "eci": "<< eci >>",
      "token_requestor_id": "40012345678"
    }
  },
  "reference": "<< metadata.order_id >>","#;

/// A ~1 KB JSON authorisation.
fn json_small() -> String {
    format!(
        r#"{{
  "merchant_account": "AcmeShopEUR",
  "amount": {{ "value": 12999, "currency": "EUR" }},
  {JSON_CARD}
  "shopper_interaction": "Ecommerce",
  "recurring_processing_model": "CardOnFile",
  "shopper_reference": "shopper-7f3c2a91",
  "shopper_email": "jane.doe@example.com",
  "shopper_ip": "203.0.113.42",
  "billing_address": {{
    "street": "Keizersgracht", "house_number_or_name": "126",
    "postal_code": "1015 CW", "city": "Amsterdam", "country": "NL"
  }},
  "browser_info": {{
    "user_agent": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko)",
    "accept_header": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",
    "language": "nl-NL", "color_depth": 24, "screen_height": 1080, "screen_width": 1920,
    "time_zone_offset": -60, "java_enabled": false
  }},
  "metadata": {{ "channel": "web", "campaign": "spring-sale", "note": "escaped \"quote\" here" }}
}}"#
    )
}

/// A ~10 KB JSON authorisation: the same with a large line-items array.
fn json_large() -> String {
    let mut items = String::new();
    for i in 0..48 {
        if i > 0 {
            items.push_str(",\n");
        }
        write!(
            items,
            r#"    {{ "id": "SKU-{i:05}", "description": "Item {i} \"deluxe\" edition", "quantity": {q}, "amount_excluding_tax": {a}, "tax_percentage": 2100, "product_url": "https://shop.example.com/p/{i}" }}"#,
            q = i % 3 + 1,
            a = 1000 + i * 37,
        )
        .unwrap();
    }
    let small = json_small();
    let body = small.trim_end().trim_end_matches('}');
    format!("{body},\n  \"line_items\": [\n{items}\n  ]\n}}")
}

/// A form body.
fn form() -> String {
    "merchant_id=acme&amount=12999&currency=EUR&card%5Bnumber%5D=<< number >>\
     &card%5Bexp_month%5D=<< expiry_month | mm >>&card%5Bexp_year%5D=<< expiry_year | yy >>\
     &card%5Bcryptogram%5D=<< cryptogram >>&card%5Beci%5D=<< eci >>\
     &reference=<< metadata.order_id >>&description=Order+for+Jane+Doe\
     &return_url=https%3A%2F%2Fshop.example.com%2Freturn%3Fid%3D42"
        .to_owned()
}

/// An XML body.
fn xml() -> String {
    r#"<?xml version="1.0" encoding="UTF-8"?>
<paymentService version="1.4" merchantCode="ACME">
  <submit>
    <order orderCode="<< metadata.order_id >>">
      <description>Order for Jane Doe &amp; family</description>
      <amount currencyCode="EUR" exponent="2" value="12999"/>
      <paymentDetails>
        <NETWORKTOKEN-SSL>
          <tokenNumber><< number >></tokenNumber>
          <expiryDate><date month="<< expiry_month | mm >>" year="<< expiry_year >>"/></expiryDate>
          <cryptogram><< cryptogram >></cryptogram>
          <eciIndicator><< eci >></eciIndicator>
        </NETWORKTOKEN-SSL>
      </paymentDetails>
      <shopper><shopperEmailAddress>jane.doe@example.com</shopperEmailAddress></shopper>
    </order>
  </submit>
</paymentService>"#
        .to_owned()
}

/// The 1 KB body with its placeholders behind format filters.
fn json_filters() -> String {
    json_small()
        .replace("<< number >>", "<< number | last4 >>")
        .replace("<< expiry_month | unwrap >>", "<< expiry_month | mm >>")
        .replace("<< expiry_year | unwrap >>", "<< expiry_year | yy >>")
        .replace("<< eci >>", "<< eci | first6 >>")
}

fn bench(c: &mut Criterion) {
    let values = TokenValues::new();
    let bodies = [
        ("json_1k", json_small(), Context::Json),
        ("json_10k", json_large(), Context::Json),
        ("json_1k_filters", json_filters(), Context::Json),
        ("form", form(), Context::Form),
        ("xml", xml(), Context::Xml),
    ];
    let mut g = c.benchmark_group("template_parse_render");
    for (name, body, ctx) in &bodies {
        let input = body.as_bytes();
        // Check once that the body parses and renders as intended.
        let t = Template::parse(input, Syntax::Angle, *ctx, Namespace::NetworkToken).unwrap();
        assert_eq!(t.placeholders().count(), 6, "{name}");
        let out = t.render_to_vec(input, &values);
        if *ctx == Context::Json {
            serde_json::from_slice::<serde_json::Value>(&out).unwrap();
        }
        g.throughput(Throughput::Bytes(input.len() as u64));
        g.bench_function(*name, |b| {
            b.iter(|| {
                let t = Template::parse(
                    black_box(input),
                    Syntax::Angle,
                    *ctx,
                    Namespace::NetworkToken,
                )
                .unwrap();
                black_box(t.render_to_vec(input, &values))
            });
        });
    }
    g.finish();

    let mut g = c.benchmark_group("template_render_only");
    for (name, body, ctx) in &bodies {
        let input = body.as_bytes();
        let t = Template::parse(input, Syntax::Angle, *ctx, Namespace::NetworkToken).unwrap();
        g.throughput(Throughput::Bytes(input.len() as u64));
        g.bench_function(*name, |b| {
            b.iter(|| black_box(t.render_to_vec(black_box(input), &values)));
        });
    }
    g.finish();
}

/// The Adyen `/payments` body of `fixtures/routes/adyen-payments.json.j2`,
/// written as a free-form template.
const ADYEN_FREE_FORM: &str = r#"{
  "merchantAccount": "AcmeShopEUR",
  "reference": "ORD-2024-000123",
  "amount": {"currency": "EUR", "value": 12999},
  "paymentMethod": {
    "type": "networkToken",
    "brand": "visa",
    "number": "<< number >>",
    "expiryMonth": "<< expiry_month | mm >>",
    "expiryYear": "<< expiry_year >>"
  },
  "mpiData": {
    "directoryResponse": "Y",
    "authenticationResponse": "Y",
    "tokenAuthenticationVerificationValue": "<< cryptogram >>",
    "eci": "<< eci >>"
  },
  "shopperInteraction": "Ecommerce",
  "recurringProcessingModel": "CardOnFile"
}"#;

/// The merchant's input to the Adyen route.
const ADYEN_INPUT: &str = r#"{"merchant_account": "AcmeShopEUR", "reference": "ORD-2024-000123",
  "amount": {"value": 12999, "currency": "EUR"}, "recurring_processing_model": "CardOnFile"}"#;

fn route_vs_free_form(c: &mut Criterion) {
    use tokenrelay::config::Config;
    use tokenrelay::forward::route::{Rendering, Routes};
    let config = Config::parse_in(
        r#"
[[destinations]]
host = "checkout-test.adyen.com"
port = 443
scheme = "https"

[[routes]]
name = "adyen-payments"
destination = "https://checkout-test.adyen.com/v71/payments"
method = "POST"
template = "fixtures/routes/adyen-payments.json.j2"
subjects = ["network_token"]
"#,
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")),
    )
    .unwrap();
    let routes = Routes::build(&config, &config.destinations, ("<<", ">>")).unwrap();
    let route = routes.get("adyen-payments").unwrap();
    let values = TokenValues::new();
    // Both send the same body: check it once.
    let from_route: serde_json::Value = serde_json::from_slice(
        &Rendering::from_body(route, ADYEN_INPUT.as_bytes(), Namespace::NetworkToken)
            .unwrap()
            .render(&values)
            .unwrap(),
    )
    .unwrap();
    let free = ADYEN_FREE_FORM.as_bytes();
    let t = Template::parse(free, Syntax::Angle, Context::Json, Namespace::NetworkToken).unwrap();
    let from_free: serde_json::Value =
        serde_json::from_slice(&t.render_to_vec(free, &values)).unwrap();
    assert_eq!(from_route, from_free);

    let mut g = c.benchmark_group("route_vs_free_form");
    g.bench_function("adyen_route", |b| {
        b.iter(|| {
            let r = Rendering::from_body(
                route,
                black_box(ADYEN_INPUT.as_bytes()),
                Namespace::NetworkToken,
            )
            .unwrap();
            black_box(r.render(&values).unwrap())
        });
    });
    g.bench_function("adyen_free_form", |b| {
        b.iter(|| {
            let t = Template::parse(
                black_box(free),
                Syntax::Angle,
                Context::Json,
                Namespace::NetworkToken,
            )
            .unwrap();
            black_box(t.render_to_vec(free, &values))
        });
    });
    g.finish();
}

criterion_group!(benches, bench, route_vs_free_form);
criterion_main!(benches);
