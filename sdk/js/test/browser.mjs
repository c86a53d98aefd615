// Drives the example checkout page in headless Chromium (playwright-core,
// Debian's /usr/bin/chromium — no browser download): types a test card,
// pays, waits for the outcome. Prints one JSON line {outcome, result,
// steps, console_errors}; exits 0 only when the payment was approved.
//
//   node test/browser.mjs http://127.0.0.1:PORT/ [screenshot.png]
//
// Run by tests/browser.rs (cargo test), which starts the page's server
// in-process and checks what that server received.

import { chromium } from "playwright-core";

const [url, screenshot] = process.argv.slice(2);
if (!url) {
  console.error("usage: node test/browser.mjs URL [screenshot.png]");
  process.exit(2);
}
const executablePath = process.env.TOKENRELAY_CHROMIUM || "/usr/bin/chromium";

const browser = await chromium.launch({
  executablePath,
  headless: true,
  // As root in a container, and on a machine without outside network.
  args: [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
  ],
});
let code = 1;
try {
  const page = await browser.newPage();
  const consoleErrors = [];
  page.on("console", (m) => m.type() === "error" && consoleErrors.push(m.text()));
  page.on("pageerror", (e) => consoleErrors.push(String(e)));
  await page.goto(url);
  // Typed like a person: keystrokes into the fields.
  await page.locator("#number").pressSequentially("4111 1111 1111 1111");
  await page.locator("#expiry_month").pressSequentially("12");
  await page.locator("#expiry_year").pressSequentially("2031");
  await page.locator("#cvc").pressSequentially("737");
  await page.locator("#cardholder_name").pressSequentially("Ada Lovelace");
  await page.locator("#pay").click();
  await page.waitForSelector('#result[data-outcome="approved"], #result[data-outcome="declined"], #result[data-outcome="error"]', {
    timeout: 60_000,
  });
  const outcome = await page.locator("#result").getAttribute("data-outcome");
  const result = await page.locator("#result").textContent();
  const steps = await page.locator("#steps li b").allTextContents();
  const details = await page.locator("#steps li pre").allTextContents();
  if (screenshot) await page.screenshot({ path: screenshot, fullPage: true });
  console.log(JSON.stringify({ outcome, result, steps, details, console_errors: consoleErrors }));
  code = outcome === "approved" ? 0 : 1;
} finally {
  await browser.close();
}
process.exit(code);
