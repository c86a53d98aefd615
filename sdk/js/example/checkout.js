// The example checkout page's script. It talks only to the merchant's own
// server (here the stand-in of `tokenrelay demo --browser`):
//   POST /checkout/session → the session id and its public key (the
//                            server opened it with POST /api/sessions)
//   encryptCard(...)       → the card as a JWE, in this browser
//   POST /checkout/pay     → {session_id, data}: ciphertext only; the server
//                            provisions, takes a reference and forwards
import { encryptCard } from "../tokenrelay.min.js";

const $ = (id) => document.getElementById(id);

function show(title, detail) {
  const li = document.createElement("li");
  const b = document.createElement("b");
  b.textContent = title;
  const pre = document.createElement("pre");
  pre.textContent = detail;
  li.append(b, pre);
  $("steps").append(li);
}

function outcome(kind, text) {
  $("result").dataset.outcome = kind;
  $("result").textContent = text;
}

async function post(path, body) {
  const r = await fetch(path, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify(body),
  });
  const v = await r.json();
  if (!r.ok) throw new Error(v.error || path + " answered " + r.status);
  return v;
}

$("checkout").addEventListener("submit", async (event) => {
  event.preventDefault();
  $("pay").disabled = true;
  $("steps").replaceChildren();
  outcome("pending", "Paying…");
  try {
    const session = await post("/checkout/session", {});
    show(
      "Session opened by the merchant's server",
      `${session.id}\npublic key (P-256): x ${session.public_key.x.slice(0, 16)}…  expires ${session.expires_at}`,
    );
    const data = await encryptCard(session.public_key, {
      number: $("number").value,
      expiry_month: $("expiry_month").value,
      expiry_year: $("expiry_year").value,
      cvc: $("cvc").value,
      cardholder_name: $("cardholder_name").value,
    });
    // The card leaves the form only as ciphertext.
    for (const id of ["number", "cvc"]) $(id).value = "";
    show(
      "Card encrypted in this browser (JWE, ECDH-ES + A256GCM)",
      `${data.slice(0, 40)}… (${data.length} characters; only tokenrelay can open it)`,
    );
    const result = await post("/checkout/pay", { session_id: session.id, data });
    for (const s of result.steps) show(s.title, s.detail);
    if (result.approved) outcome("approved", "Payment approved");
    else outcome("declined", "Payment declined" + (result.error ? ": " + result.error : ""));
  } catch (err) {
    outcome("error", "Error: " + err.message);
  } finally {
    $("pay").disabled = false;
  }
});
