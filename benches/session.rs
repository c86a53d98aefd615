//! The cost of a card-capture session's cryptography: decrypting one
//! browser-made JWE (header checks, the ECDH on P-256, the Concat KDF,
//! AES-256-GCM), and making the key pair a session is opened with.
//!
//!     cargo bench --bench session

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use tokenrelay::session::{generate_key, jwe};

fn session(c: &mut Criterion) {
    let key = generate_key();
    let card = br#"{"number":"4111111111111111","expiry_month":12,"expiry_year":2031,"cvc":"737","cardholder_name":"Ada Lovelace"}"#;
    let kid = "sess_AAAAAAAAAAAAAAAAAAAAAA";
    let data = jwe::encrypt(&key.public_key(), kid, card);
    assert_eq!(&jwe::decrypt(&data, kid, &key).unwrap()[..], card);
    c.bench_function("session_decrypt", |b| {
        b.iter(|| jwe::decrypt(black_box(&data), kid, &key).unwrap())
    });
    c.bench_function("session_keygen", |b| b.iter(|| generate_key().public_key()));
}

criterion_group!(benches, session);
criterion_main!(benches);
