// Plays a session's terminal recording in the Wicket console, in a real
// browser.
//
//   node replay.mjs CONSOLE_URL SESSION_ID EXPECTED_TEXT
//
// Opens the session's page (signing in through the identity provider),
// presses Play at 8x, waits until the terminal shows EXPECTED_TEXT and the
// recording ends, and prints the screen's text as JSON. Exits non-zero on
// any failure (see browser.mjs).
import { withPage } from "./browser.mjs";

const [url, session, expected] = process.argv.slice(2);
if (!url || !session || !expected) {
  console.error("usage: node replay.mjs CONSOLE_URL SESSION_ID EXPECTED_TEXT");
  process.exit(2);
}
await withPage(async (page) => {
  await page.goto(url + "/sessions/" + encodeURIComponent(session));
  const rec = page.locator(".recording").first();
  await rec.waitFor({ timeout: 20000 });
  await rec.locator("select").selectOption("8");
  await rec.locator("button.play").click();
  await rec.locator("pre.terminal", { hasText: expected }).waitFor({ timeout: 20000 });
  await rec.locator(".meta", { hasText: "ended" }).waitFor({ timeout: 20000 });
  console.log(JSON.stringify({ screen: await rec.locator("pre.terminal").innerText() }));
});
