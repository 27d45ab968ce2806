// What the console's browser tests share: Debian's chromium driven by
// playwright-core, one page, and on failure a screenshot beside this file
// and a non-zero exit.
import { chromium } from "playwright-core";
import { fileURLToPath } from "node:url";
import path from "node:path";

const here = path.dirname(fileURLToPath(import.meta.url));

/** Runs `body(page)` in a fresh headless chromium page. */
export async function withPage(body) {
  const browser = await chromium.launch({
    executablePath: process.env.WICKET_TEST_CHROMIUM || "/usr/bin/chromium",
    headless: true,
    // The tests may run as root, where chromium's sandbox cannot start.
    args: ["--no-sandbox"],
  });
  const page = await browser.newPage();
  try {
    await body(page);
  } catch (e) {
    await page.screenshot({ path: path.join(here, "failure.png") }).catch(() => {});
    console.error(String(e));
    process.exitCode = 1;
  } finally {
    await browser.close();
  }
}
