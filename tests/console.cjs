// Drives Debian's chromium (headless, through playwright-core from scripts/setup-console) to
// the broker's HTML5 console, for tests/broker.rs:
//   node tests/console.cjs CONSOLE_URL SCREENSHOT.png [LOGOFF_URL]
// Waits for noVNC to report "Connected" and the screen to be drawn, takes a screenshot, then
// (with LOGOFF_URL and $VDIM_TOKEN) logs the session off and waits for the page to show the
// console closed. Prints one JSON line: {"connected", "width", "height", "afterLogoff", ...}.
const path = require('path');
const dir = process.env.VDIM_CONSOLE_DIR || '/var/cache/vdim/console';
const { chromium } = require(path.join(dir, 'node_modules', 'playwright-core'));

async function main() {
  const [url, shot, logoffUrl] = process.argv.slice(2);
  const browser = await chromium.launch({
    executablePath: process.env.VDIM_CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args: [
      '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
    ], // playwright gives chromium a fresh temporary --user-data-dir itself
  });
  const out = { connected: false };
  try {
    const page = await browser.newPage({ viewport: { width: 1024, height: 768 } });
    const logs = [];
    page.on('console', (m) => logs.push(`${m.type()}: ${m.text()}`));
    page.on('pageerror', (e) => logs.push(`pageerror: ${e.message}`));
    await page.goto(url);
    try {
      await page.waitForFunction(() => document.getElementById('status').dataset.state === 'connected', null, { timeout: 30000 });
      out.connected = true;
      out.urlAfterConnect = await page.evaluate(() => location.href);
    } catch (e) {
      out.error = String(e);
    }
    out.status = await page.evaluate(() => document.getElementById('status').textContent);
    // Let the first framebuffer update arrive and be drawn.
    await page.waitForTimeout(3000);
    const canvas = await page.evaluate(() => {
      const c = document.querySelector('#screen canvas');
      return c ? { width: c.width, height: c.height } : null;
    });
    Object.assign(out, canvas || {});
    await page.screenshot({ path: shot });
    if (logoffUrl && out.connected) {
      const r = await fetch(logoffUrl, { method: 'DELETE', headers: { Authorization: `Bearer ${process.env.VDIM_TOKEN}` } });
      out.logoffStatus = r.status;
      try {
        await page.waitForFunction(() => document.getElementById('status').dataset.state !== 'connected', null, { timeout: 15000 });
      } catch (e) {
        out.logoffError = String(e);
      }
      out.afterLogoff = await page.evaluate(() => document.getElementById('status').dataset.state);
    }
    out.logs = logs.slice(-20);
  } finally {
    await browser.close();
  }
  console.log(JSON.stringify(out));
}

main().catch((e) => { console.error(e); process.exit(1); });
