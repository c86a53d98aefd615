// Interoperability with an independent JOSE implementation (npm `jose`):
//
// 1. what the SDK makes (tokenrelay.js and its minified copy) decrypts with
//    jose, header and plaintext as specified;
// 2. what jose makes decrypts in tokenrelay: `tokenrelay demo --browser`
//    is started (tokenrelay at SAQ-A behind the merchant stand-in), a
//    session is opened, jose encrypts a card to its key, and the stand-in
//    provisions a network token from it and forwards a payment;
// 3. the SDK's output, from Node, does the same.
//
// Needs the tokenrelay binary: TOKENRELAY_BIN, else ../../target/debug/
// tokenrelay (`cargo build` first). Run with `npm test` in sdk/js.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { existsSync } from "node:fs";
import { fileURLToPath } from "node:url";
import path from "node:path";
import * as jose from "jose";

import * as sdk from "../tokenrelay.js";
import * as sdkMin from "../tokenrelay.min.js";

const here = path.dirname(fileURLToPath(import.meta.url));
const CARD = { number: "4111 1111 1111 1111", expiry_month: "12", expiry_year: "31", cvc: "737", cardholder_name: " Ada Lovelace " };
const NORMALISED = { number: "4111111111111111", expiry_month: 12, expiry_year: 2031, cvc: "737", cardholder_name: "Ada Lovelace" };

async function recipient() {
  const { publicKey, privateKey } = await jose.generateKeyPair("ECDH-ES", { crv: "P-256", extractable: true });
  const jwk = { ...(await jose.exportJWK(publicKey)), kid: "sess_interopinteropinterop", alg: "ECDH-ES", use: "enc" };
  return { jwk, privateKey };
}

for (const [name, lib] of [["tokenrelay.js", sdk], ["tokenrelay.min.js", sdkMin]]) {
  test(`${name}: its JWE decrypts with jose`, async () => {
    const { jwk, privateKey } = await recipient();
    const jwe = await lib.encryptCard(jwk, CARD);
    const parts = jwe.split(".");
    assert.equal(parts.length, 5);
    assert.equal(parts[1], "", "ECDH-ES direct: no encrypted key");
    const { plaintext, protectedHeader } = await jose.compactDecrypt(jwe, privateKey, {
      keyManagementAlgorithms: ["ECDH-ES"],
      contentEncryptionAlgorithms: ["A256GCM"],
    });
    assert.deepEqual(JSON.parse(new TextDecoder().decode(plaintext)), NORMALISED);
    assert.equal(protectedHeader.alg, "ECDH-ES");
    assert.equal(protectedHeader.enc, "A256GCM");
    assert.equal(protectedHeader.kid, jwk.kid);
    assert.deepEqual(Object.keys(protectedHeader.epk).sort(), ["crv", "kty", "x", "y"]);
    assert.equal(protectedHeader.zip, undefined);
    // A fresh ephemeral key and IV each time.
    const again = await lib.encryptCard(jwk, CARD);
    assert.notEqual(again.split(".")[0], parts[0]);
    assert.notEqual(again.split(".")[2], parts[2]);
  });

  test(`${name}: refuses what is not a session key or a card`, async () => {
    const { jwk } = await recipient();
    await assert.rejects(lib.encryptCard({ ...jwk, crv: "P-384" }, CARD), /P-256/);
    await assert.rejects(lib.encryptCard({ ...jwk, alg: "RSA-OAEP" }, CARD), /ECDH-ES/);
    await assert.rejects(lib.encryptCard({ ...jwk, kid: undefined }, CARD), /kid/);
    await assert.rejects(lib.encryptCard(jwk, { ...CARD, number: "4111" }), /number/);
    await assert.rejects(lib.encryptCard(jwk, { ...CARD, expiry_month: "13" }), /expiry_month/);
    await assert.rejects(lib.encryptCard(jwk, { ...CARD, cvc: "7a7" }), /cvc/);
  });
}

// --- against tokenrelay -----------------------------------------------------

const bin = process.env.TOKENRELAY_BIN || path.resolve(here, "../../../target/debug/tokenrelay");
let demo;
let base;

before(async () => {
  if (!existsSync(bin)) {
    throw new Error(`tokenrelay binary not found at ${bin}: run cargo build, or set TOKENRELAY_BIN`);
  }
  demo = spawn(bin, ["demo", "--browser", "--listen", "127.0.0.1:0"], { stdio: ["ignore", "pipe", "inherit"] });
  base = await new Promise((resolve, reject) => {
    let out = "";
    const timer = setTimeout(() => reject(new Error("demo printed no URL in 60 s:\n" + out)), 60_000);
    demo.stdout.on("data", (chunk) => {
      out += chunk;
      const m = out.match(/checkout page \(merchant backend stand-in\): (http:\/\/127\.0\.0\.1:\d+)\//);
      if (m) {
        clearTimeout(timer);
        resolve(m[1]);
      }
    });
    demo.on("exit", (code) => reject(new Error(`demo exited (${code}):\n${out}`)));
  });
  demo.stdout.resume();
});

after(() => {
  if (demo) demo.kill("SIGINT");
});

async function post(p, body) {
  const r = await fetch(base + p, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body) });
  assert.equal(r.status, 200, p);
  return r.json();
}

async function payWith(encrypt) {
  const session = await post("/checkout/session", {});
  assert.match(session.id, /^sess_/);
  assert.equal(session.public_key.kid, session.id);
  const data = await encrypt(session);
  const result = await post("/checkout/pay", { session_id: session.id, data });
  assert.equal(result.error, null, JSON.stringify(result));
  assert.equal(result.approved, true, JSON.stringify(result));
  assert.match(result.steps[0].detail, /"last4": "1111"/);
  return result;
}

test("a JWE made by jose decrypts in tokenrelay, and the token pays", async () => {
  await payWith(async (session) => {
    const key = await jose.importJWK(session.public_key, "ECDH-ES");
    return new jose.CompactEncrypt(new TextEncoder().encode(JSON.stringify(NORMALISED)))
      .setProtectedHeader({ alg: "ECDH-ES", enc: "A256GCM", kid: session.id })
      .encrypt(key);
  });
});

test("the SDK's JWE, made in Node, decrypts in tokenrelay", async () => {
  await payWith((session) => sdkMin.encryptCard(session.public_key, CARD));
  const received = await (await fetch(base + "/checkout/received")).json();
  assert.ok(received.length >= 4);
  for (const r of received) assert.ok(!r.body.includes("4111111111111111") && !r.body.includes("4111 1111"), r.request);
});
