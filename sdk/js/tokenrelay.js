// tokenrelay browser SDK: encrypts a card in the cardholder's browser to a
// tokenrelay session's public key, so the merchant's server only ever holds
// ciphertext (contract §11).
//
// One ES module, no dependencies, WebCrypto only. The output is a JWE in
// compact serialization (RFC 7516): `alg` ECDH-ES (direct key agreement,
// RFC 7518 §4.6), `enc` A256GCM, `kid` the session id, a fresh ephemeral
// P-256 key per card. tokenrelay accepts exactly this profile.
//
//   import { encryptCard } from "./tokenrelay.js";
//   const session = await (await fetch("/checkout/session", { method: "POST" })).json();
//   const data = await encryptCard(session.public_key, {
//     number: "4111 1111 1111 1111", expiry_month: 12, expiry_year: 2031, cvc: "737",
//   });
//   // send { session_id: session.id, data } to your server, which passes
//   // {"source": {"type": "session", "id", "data"}} to tokenrelay.

const ALG = "ECDH-ES";
const ENC = "A256GCM";

/** The SDK's version. */
export const version = "0.1.0";

const utf8 = new TextEncoder();

function b64url(bytes) {
  let s = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    s += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  }
  return btoa(s).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

function u32(n) {
  return new Uint8Array([n >>> 24, (n >>> 16) & 255, (n >>> 8) & 255, n & 255]);
}

function concat(...parts) {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

function fail(message) {
  throw new TypeError("tokenrelay: " + message);
}

// The card as tokenrelay reads it: digits only for the number, integers
// for the expiry (a two-digit year means 20yy), optional CVC and name.
// Only shape is checked here; tokenrelay applies the card rules.
function normalise(card) {
  if (!card || typeof card !== "object") fail("card must be an object");
  const number = String(card.number ?? "").replace(/[\s-]/g, "");
  if (!/^\d{12,19}$/.test(number)) fail("card.number must be 12 to 19 digits");
  const month = Number(card.expiry_month);
  let year = Number(card.expiry_year);
  if (!Number.isInteger(month) || month < 1 || month > 12) fail("card.expiry_month must be 1 to 12");
  if (Number.isInteger(year) && year >= 0 && year < 100) year += 2000;
  if (!Number.isInteger(year) || year < 2000 || year > 2099) fail("card.expiry_year must be a year");
  const out = { number, expiry_month: month, expiry_year: year };
  if (card.cvc != null && card.cvc !== "") {
    const cvc = String(card.cvc).trim();
    if (!/^\d{3,4}$/.test(cvc)) fail("card.cvc must be 3 or 4 digits");
    out.cvc = cvc;
  }
  if (card.cardholder_name != null && String(card.cardholder_name).trim() !== "") {
    out.cardholder_name = String(card.cardholder_name).trim();
  }
  return out;
}

function checkJwk(jwk) {
  if (!jwk || typeof jwk !== "object") fail("publicKeyJwk must be the session's public_key object");
  if (jwk.kty !== "EC" || jwk.crv !== "P-256") fail("publicKeyJwk must be an EC P-256 key");
  if (jwk.alg !== undefined && jwk.alg !== ALG) fail("publicKeyJwk.alg must be ECDH-ES");
  if (jwk.use !== undefined && jwk.use !== "enc") fail("publicKeyJwk.use must be enc");
  if (typeof jwk.kid !== "string" || jwk.kid === "") fail("publicKeyJwk.kid (the session id) is missing");
  if (jwk.d !== undefined) fail("publicKeyJwk must be a public key");
}

/**
 * Encrypts `card` ({number, expiry_month, expiry_year, cvc?, cardholder_name?})
 * to the session key `publicKeyJwk` (the `public_key` of POST /api/sessions).
 * Resolves to a JWE compact string for `{"source": {"type": "session", "id",
 * "data"}}`. Nothing is sent anywhere and nothing is kept.
 */
export async function encryptCard(publicKeyJwk, card) {
  checkJwk(publicKeyJwk);
  const plaintext = utf8.encode(JSON.stringify(normalise(card)));
  const subtle = globalThis.crypto && globalThis.crypto.subtle;
  if (!subtle) fail("WebCrypto is unavailable (a secure context, https or localhost, is required)");
  const curve = { name: "ECDH", namedCurve: "P-256" };
  const recipient = await subtle.importKey(
    "jwk",
    { kty: "EC", crv: "P-256", x: publicKeyJwk.x, y: publicKeyJwk.y, ext: true },
    curve,
    false,
    [],
  );
  const ephemeral = await subtle.generateKey(curve, true, ["deriveBits"]);
  const z = new Uint8Array(
    await subtle.deriveBits({ name: "ECDH", public: recipient }, ephemeral.privateKey, 256),
  );
  const epk = await subtle.exportKey("jwk", ephemeral.publicKey);
  const header = {
    alg: ALG,
    enc: ENC,
    kid: publicKeyJwk.kid,
    epk: { kty: "EC", crv: "P-256", x: epk.x, y: epk.y },
  };
  const protectedHeader = b64url(utf8.encode(JSON.stringify(header)));
  // Concat KDF (RFC 7518 §4.6.2): one SHA-256 round for a 256-bit key;
  // AlgorithmID is `enc` (direct mode), PartyUInfo and PartyVInfo empty.
  const cekBytes = new Uint8Array(
    await subtle.digest(
      "SHA-256",
      concat(u32(1), z, u32(ENC.length), utf8.encode(ENC), u32(0), u32(0), u32(256)),
    ),
  );
  z.fill(0);
  const cek = await subtle.importKey("raw", cekBytes, { name: "AES-GCM" }, false, ["encrypt"]);
  cekBytes.fill(0);
  const iv = globalThis.crypto.getRandomValues(new Uint8Array(12));
  const sealed = new Uint8Array(
    await subtle.encrypt(
      { name: "AES-GCM", iv, additionalData: utf8.encode(protectedHeader), tagLength: 128 },
      cek,
      plaintext,
    ),
  );
  plaintext.fill(0);
  const ciphertext = sealed.subarray(0, sealed.length - 16);
  const tag = sealed.subarray(sealed.length - 16);
  return [protectedHeader, "", b64url(iv), b64url(ciphertext), b64url(tag)].join(".");
}
