// Drives Debian's chromium (headless, through playwright-core from scripts/setup-console) to
// the HTML5 console through a broker that will die, for tests/session_failover.rs:
//   node tests/console_reconnect.cjs CONSOLE_URL BEFORE.png AFTER.png
// Talks to the test in lines: prints {"phase":"connected",...} once noVNC drew the screen,
// waits for "crashed" on stdin, then for the page to reconnect and draw again, prints
// {"phase":"reconnected",...}; waits for "ended" on stdin (the test logged the session off),
// then for the page to give up, and prints {"phase":"ended",...}. Every status the page
// showed is in "states".
const path = require('path');
const readline = require('readline');
const dir = process.env.VDIM_CONSOLE_DIR || '/var/cache/vdim/console';
const { chromium } = require(path.join(dir, 'node_modules', 'playwright-core'));

const lines = readline.createInterface({ input: process.stdin })[Symbol.asyncIterator]();
async function expectLine(want) {
  const { value } = await lines.next();
  if (value !== want) throw new Error(`expected ${want} on stdin, got ${value}`);
}
const say = (o) => console.log(JSON.stringify(o));

async function main() {
  const [url, before, after] = process.argv.slice(2);
  const browser = await chromium.launch({
    executablePath: process.env.VDIM_CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args: [
      '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
    ],
  });
  const logs = [];
  try {
    const page = await browser.newPage({ viewport: { width: 1024, height: 768 } });
    page.on('console', (m) => logs.push(`${m.type()}: ${m.text()}`));
    page.on('pageerror', (e) => logs.push(`pageerror: ${e.message}`));
    await page.goto(url);
    // Every status the page shows, in order.
    await page.evaluate(() => {
      const s = document.getElementById('status');
      window.vdimStates = [s.dataset.state + ': ' + s.textContent];
      new MutationObserver(() => window.vdimStates.push(s.dataset.state + ': ' + s.textContent))
        .observe(s, { attributes: true, childList: true, characterData: true, subtree: true });
    });
    const state = () => page.evaluate(() => document.getElementById('status').dataset.state);
    const until = (want, ms) => page.waitForFunction(
      (w) => document.getElementById('status').dataset.state === w, want, { timeout: ms });
    const canvas = () => page.evaluate(() => {
      const c = [...document.querySelectorAll('#screen canvas')];
      return { canvases: c.length, width: c[0] ? c[0].width : 0, height: c[0] ? c[0].height : 0 };
    });
    const report = async (phase, extra) => say({
      phase, state: await state(), ...(await canvas()), ...extra,
      states: await page.evaluate(() => window.vdimStates), logs: logs.slice(-20),
    });

    await until('connected', 30000);
    await page.waitForTimeout(3000); // the first framebuffer update drawn
    await page.screenshot({ path: before });
    await report('connected', {});

    await expectLine('crashed');
    const t0 = Date.now();
    let error;
    try {
      await until('reconnecting', 15000);
      await until('connected', 60000);
    } catch (e) {
      error = String(e);
    }
    const reconnectMs = Date.now() - t0;
    await page.waitForTimeout(3000);
    await page.screenshot({ path: after });
    await report('reconnected', { reconnectMs, error });

    await expectLine('ended');
    try {
      await until('disconnected', 15000);
    } catch (e) {
      error = String(e);
    }
    // It stays closed: a session that ended is not reconnected.
    await page.waitForTimeout(4000);
    await report('ended', { error, status: await page.evaluate(() => document.getElementById('status').textContent) });
  } finally {
    await browser.close();
  }
}

main().catch((e) => { console.error(e, logs); process.exit(1); });
