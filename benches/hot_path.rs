//! The forward hot path, piece by piece: template parse + render on
//! realistic acquirer bodies, response redaction per MB, and a reference
//! issue + take.
//!
//! `cargo bench --bench hot_path`

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use tokenrelay::forward::redact::{RedactingBody, Redactor};
use tokenrelay::references::memory::MemoryReferenceStore;
use tokenrelay::references::{Payload, Reference, ReferenceStore};
use tokenrelay::template::{Context, Field, Namespace, Syntax, Template, Value, Values};
use tokenrelay::tsp::CryptogramType;
use tokenrelay::vault::{Metadata, TokenId};

struct V(BTreeMap<String, String>);

impl Values for V {
    fn get(&self, field: Field, key: Option<&str>) -> Value<'_> {
        match field {
            Field::Number => Value::Str("4895370012345678"),
            Field::Cryptogram => Value::Str("AAAABWdpJA9VbNnRDnhXAAAAAAA="),
            Field::Eci => Value::Str("07"),
            Field::ExpiryMonth => Value::Int(11),
            Field::ExpiryYear => Value::Int(2029),
            Field::Metadata => key
                .and_then(|k| self.0.get(k))
                .map_or(Value::Null, |v| Value::Str(v)),
            _ => Value::Null,
        }
    }
}

fn values() -> V {
    let mut m = BTreeMap::new();
    m.insert("order_id".to_owned(), "ord-2026-11-29-000123".to_owned());
    V(m)
}

/// A ~1 KB JSON authorisation with 6 placeholders.
fn json_1k() -> String {
    let mut s = String::from(
        r#"{"merchant_account":"ACME_ECOM_EU","reference":"<< metadata.order_id >>","amount":{"value":1999,"currency":"EUR"},"payment_method":{"type":"networkToken","number":"<< number >>","expiry_month":"<< expiry_month | unwrap >>","expiry_year":"<< expiry_year | unwrap >>","token_authentication_verification_value":"<< cryptogram >>","eci":"<< eci >>"},"shopper":{"email":"jane.doe@example.com","ip":"203.0.113.7","reference":"shopper-8842","locale":"en_GB"},"billing_address":{"street":"1 Main Street","city":"London","postal_code":"EC1A 1BB","country":"GB"},"browser_info":{"user_agent":"Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Safari/537.36","accept_header":"text/html,application/xhtml+xml"},"return_url":"https://shop.example/checkout/return?order=123","channel":"web","recurring_processing_model":"CardOnFile","shopper_interaction":"Ecommerce","#,
    );
    while s.len() < 1000 {
        s.push_str(r#""x":"padding-padding-padding","#);
    }
    s.push_str(r#""end":true}"#);
    s
}

/// The same plus a large line-items array: ~10 KB.
fn json_10k() -> String {
    let mut s = json_1k();
    s.pop();
    s.push_str(r#","line_items":["#);
    let mut i = 0;
    while s.len() < 10_000 {
        s.push_str(&format!(
            r#"{{"id":"sku-{i:05}","description":"Widget number {i}, blue, large","quantity":1,"amount_including_tax":1999,"tax_percentage":2000}},"#
        ));
        i += 1;
    }
    s.pop();
    s.push_str("]}");
    s
}

/// The 1 KB body with every placeholder behind format filters.
fn json_1k_filters() -> String {
    json_1k()
        .replace("<< number >>", "<< number | last4 >>")
        .replace("<< expiry_month | unwrap >>", "<< expiry_month | mm >>")
        .replace("<< expiry_year | unwrap >>", "<< expiry_year | yy >>")
        .replace("<< eci >>", "<< eci | first6 >>")
}

fn form() -> String {
    "merchant=ACME&amount=1999&currency=EUR&card_number=<< number >>&exp_month=<< expiry_month | mm >>&exp_year=<< expiry_year >>&cavv=<< cryptogram >>&eci=<< eci >>&order=<< metadata.order_id >>&return_url=https%3A%2F%2Fshop.example%2Freturn".to_owned()
}

fn xml() -> String {
    r#"<?xml version="1.0" encoding="UTF-8"?><paymentService version="1.4" merchantCode="ACME"><submit><order orderCode="<< metadata.order_id >>"><description>Order</description><amount currencyCode="EUR" exponent="2" value="1999"/><paymentDetails><NETWORKTOKEN-SSL><tokenNumber><< number >></tokenNumber><expiryDate><date month="<< expiry_month | mm >>" year="<< expiry_year >>"/></expiryDate><cryptogram><< cryptogram >></cryptogram><eciIndicator><< eci >></eciIndicator></NETWORKTOKEN-SSL></paymentDetails></order></submit></paymentService>"#.to_owned()
}

fn template(c: &mut Criterion) {
    let v = values();
    let mut g = c.benchmark_group("template_parse_render");
    for (name, body, ctx) in [
        ("json_1k", json_1k(), Context::Json),
        ("json_10k", json_10k(), Context::Json),
        ("json_1k_filters", json_1k_filters(), Context::Json),
        ("form", form(), Context::Form),
        ("xml", xml(), Context::Xml),
    ] {
        g.throughput(Throughput::Bytes(body.len() as u64));
        g.bench_with_input(BenchmarkId::from_parameter(name), &body, |b, body| {
            b.iter(|| {
                let t =
                    Template::parse(body.as_bytes(), Syntax::Angle, ctx, Namespace::NetworkToken)
                        .unwrap();
                black_box(t.render_to_vec(body.as_bytes(), &v))
            })
        });
    }
    g.finish();
}

fn redaction(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let tpan = "4895370012345678";
    let redactor = Redactor::new([tpan, "AAAABWdpJA9VbNnRDnhXAAAAAAA="]);
    // 1 MiB in 16 KiB chunks, with the TPAN echoed in four places.
    let mut chunks = Vec::new();
    for i in 0..64 {
        let mut chunk = vec![b'x'; 16 * 1024];
        if i % 16 == 0 {
            chunk[100..116].copy_from_slice(tpan.as_bytes());
        }
        chunks.push(Bytes::from(chunk));
    }
    let mut g = c.benchmark_group("redaction");
    g.throughput(Throughput::Bytes(1 << 20));
    g.bench_function("1MiB_16KiB_chunks", |b| {
        b.iter(|| {
            let frames = futures_util::stream::iter(
                chunks
                    .iter()
                    .cloned()
                    .map(|c| Ok::<_, std::convert::Infallible>(Frame::data(c))),
            );
            let body = RedactingBody::new(StreamBody::new(frames), redactor.clone());
            black_box(rt.block_on(body.collect()).unwrap().to_bytes().len())
        })
    });
    g.finish();
}

fn references(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let store = MemoryReferenceStore::new(10_000_000);
    let token = TokenId::new();
    let payload = Arc::new(Payload {
        cryptogram: None,
        dynamic_cvv: None,
        cryptogram_type: CryptogramType::Tavv,
        eci: "07",
        metadata: Metadata::new(),
    });
    c.bench_function("reference_issue_take", |b| {
        b.iter(|| {
            rt.block_on(async {
                let id = store
                    .issue(Reference {
                        token_id: token,
                        expires_at: time::OffsetDateTime::now_utc() + Duration::from_secs(900),
                        payload: payload.clone(),
                    })
                    .await
                    .unwrap();
                black_box(store.take(&id, token).await.unwrap());
            })
        })
    });
}

criterion_group!(benches, template, redaction, references);
criterion_main!(benches);
