// Decides a held command in the Wicket console from a real browser.
//
//   node decide.mjs CONSOLE_URL approve|deny COMMENT
//
// Opens the console (signing in through the identity provider), prints
// `ready` once the approvals page is up and live, then waits for an
// approval to arrive, prints its card's text as JSON, and decides it with
// COMMENT. Exits non-zero on any failure (see browser.mjs).
import { withPage } from "./browser.mjs";

const [url, verb, comment] = process.argv.slice(2);
if (!url || !["approve", "deny"].includes(verb)) {
  console.error("usage: node decide.mjs CONSOLE_URL approve|deny COMMENT");
  process.exit(2);
}
await withPage(async (page) => {
  await page.goto(url + "/approvals");
  await page.locator("#me", { hasText: "approver" }).waitFor({ timeout: 20000 });
  // Live: the event stream is connected (and the list read after it).
  await page.locator("body[data-live='1']").waitFor({ timeout: 20000 });
  await page.locator("#empty, article[data-approval]").first().waitFor({ timeout: 20000 });
  console.log("ready");
  const card = page.locator("article[data-approval]").first();
  await card.waitFor({ timeout: 30000 });
  console.log(JSON.stringify({ card: await card.innerText() }));
  await card.locator("input[name=comment]").fill(comment || "");
  await card.locator(verb === "approve" ? "button.approve" : "button.deny").click();
  await page.locator("#status", { hasText: verb === "approve" ? "Approved" : "Denied" })
    .waitFor({ timeout: 10000 });
  console.log("decided");
});
