//! The forward hot path beyond the template (see `benches/template.rs`):
//! response redaction per MiB (four echoes of the TPAN, and acquirer-like
//! JSON echoing nothing), a reference issue + take, and the token read
//! every forward makes on the default SQLite vault (`get_current`: the
//! status from the file, the rest from the cache).
//!
//! `cargo bench --bench hot_path`

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use tokenrelay::card::{Brand, CardNumber};
use tokenrelay::forward::redact::{RedactingBody, Redactor};
use tokenrelay::references::memory::MemoryReferenceStore;
use tokenrelay::references::{Payload, Reference, ReferenceStore};
use tokenrelay::tsp::CryptogramType;
use tokenrelay::vault::cached::CachedTokenStore;
use tokenrelay::vault::keyring::Keyring;
use tokenrelay::vault::sql::SqlTokenStore;
use tokenrelay::vault::{
    Metadata, NetworkToken, NetworkTokenType, TokenId, TokenStatus, TokenStore,
};

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
    // The common case: 1 MiB of acquirer-like JSON (digits, letters, `=`,
    // `/`, so the searchers meet many first-byte candidates) echoing
    // nothing, in 16 KiB chunks.
    let line = br#"{"pspReference":"8515931183264420","resultCode":"Authorised","amount":{"value":1250,"currency":"EUR"},"merchantReference":"order-20261201-0042/a=b","additionalData":{"cardSummary":"1111","expiryDate":"12/2031","authCode":"073215"}},"#;
    let clean: Vec<u8> = line.iter().copied().cycle().take(1 << 20).collect();
    let clean: Vec<Bytes> = clean
        .chunks(16 * 1024)
        .map(Bytes::copy_from_slice)
        .collect();
    let mut g = c.benchmark_group("redaction");
    g.throughput(Throughput::Bytes(1 << 20));
    for (name, chunks) in [
        ("1MiB_16KiB_chunks", &chunks),
        ("1MiB_16KiB_chunks_json_no_echo", &clean),
    ] {
        g.bench_function(name, |b| {
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
    }
    g.finish();
    // What redaction costs a typical forward: the redactor for a TPAN, a
    // cryptogram and a CVC built, then a 1 KB answer echoing none of them.
    let answer: Bytes = line
        .iter()
        .copied()
        .cycle()
        .take(1024)
        .collect::<Vec<u8>>()
        .into();
    c.bench_function("redaction_per_forward_1KB_answer", |b| {
        b.iter(|| {
            let redactor = Redactor::new([tpan, "AAAABWdpJA9VbNnRDnhXAAAAAAA=", "737"]);
            let frames = futures_util::stream::iter([Ok::<_, std::convert::Infallible>(
                Frame::data(answer.clone()),
            )]);
            let body = RedactingBody::new(StreamBody::new(frames), redactor);
            black_box(rt.block_on(body.collect()).unwrap().to_bytes().len())
        })
    });
}

fn references(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let store = MemoryReferenceStore::new(10_000_000).unwrap();
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
    // The forward's part alone: issuing happens outside the timing, in a
    // table already holding 400k unused references, as under load.
    for _ in 0..400_000 {
        rt.block_on(store.issue(Reference {
            token_id: token,
            expires_at: time::OffsetDateTime::now_utc() + Duration::from_secs(900),
            payload: payload.clone(),
        }))
        .unwrap();
    }
    c.bench_function("reference_take", |b| {
        b.iter_batched(
            || {
                rt.block_on(store.issue(Reference {
                    token_id: token,
                    expires_at: time::OffsetDateTime::now_utc() + Duration::from_secs(900),
                    payload: payload.clone(),
                }))
                .unwrap()
            },
            |id| rt.block_on(async { black_box(store.take(&id, token).await.unwrap()) }),
            BatchSize::SmallInput,
        )
    });
}

/// What every forward and cryptogram asks the default vault: the token,
/// with its status read from the SQLite file now (so another process's
/// revocation holds at once) and the rest from the in-process cache.
fn token_read(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("v.db").display());
    let sql = rt
        .block_on(SqlTokenStore::connect(&url, Arc::new(Keyring::ephemeral())))
        .unwrap();
    let store = CachedTokenStore::new(Arc::new(sql), Duration::from_secs(60));
    let now = time::OffsetDateTime::now_utc();
    let token = NetworkToken {
        id: TokenId::new(),
        status: TokenStatus::Active,
        network_token_type: NetworkTokenType::Vts,
        scheme: Brand::Visa,
        card_last4: "1111".into(),
        expiry_month: 12,
        expiry_year: 2031,
        pci_token_id: None,
        supports_device_binding: false,
        scheme_reference: "ref".into(),
        scheme_metadata: Metadata::new(),
        metadata: Metadata::new(),
        dauth_activated: false,
        created_at: now,
        updated_at: now,
        tpan: CardNumber::parse("4895370012003478").unwrap(),
    };
    let id = token.id;
    rt.block_on(store.insert(token, None)).unwrap();
    c.bench_function("token_get_current_sqlite", |b| {
        b.iter(|| rt.block_on(async { black_box(store.get_current(id).await.unwrap().unwrap()) }))
    });
}

criterion_group!(benches, redaction, references, token_read);
criterion_main!(benches);
