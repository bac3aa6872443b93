// The HTML5 console: noVNC over the broker's WebSocket proxy. The console token arrives in
// the URL fragment (never sent to any server), is kept for this tab only, and travels to
// the proxy in the WebSocket subprotocol list, not in a URL that a log could record.
//
// A connection that drops (the broker behind this name died, the network blinked) is opened
// again with the same token, after a growing delay, a few times: whichever broker answers
// checks the token against the catalog. Only a close that says the session is over (4000:
// ended, or another console took over) is final.
import RFB from '/novnc/core/rfb.js';

/** The proxy's close code for "the session ended" and "another console took over". */
const CLOSE_SESSION_ENDED = 4000;
/** Delays before each reconnect attempt; when they run out, the page gives up. */
const RETRY_DELAYS_MS = [500, 1000, 2000, 4000, 8000];

const status = document.getElementById('status');
const cad = document.getElementById('cad');
const screen = document.getElementById('screen');
const show = (state, text) => { status.dataset.state = state; status.textContent = text; };

const id = location.pathname.split('/').filter(Boolean).pop();
const key = 'vdim-console-token-' + id;
let token = new URLSearchParams(location.hash.slice(1)).get('token');
if (token) {
  sessionStorage.setItem(key, token);
  history.replaceState(null, '', location.pathname);
} else {
  token = sessionStorage.getItem(key);
}

const wsUrl = (location.protocol === 'https:' ? 'wss://' : 'ws://') + location.host + location.pathname + '/ws';
// Failed attempts since the console was last connected.
let failures = 0;

function connect() {
  // Our own socket, so the page sees the close code (noVNC reports only clean or not).
  const socket = new WebSocket(wsUrl, ['binary', 'vdim-console-token.' + token]);
  const closed = { code: 0, reason: '', refused: false };
  socket.addEventListener('close', (e) => { closed.code = e.code; closed.reason = e.reason; });
  const rfb = new RFB(screen, socket);
  rfb.scaleViewport = true;
  rfb.addEventListener('connect', () => {
    failures = 0;
    show('connected', 'Connected');
    cad.disabled = false;
  });
  rfb.addEventListener('disconnect', () => {
    cad.disabled = true;
    if (closed.refused) {
      return;
    }
    if (closed.code === CLOSE_SESSION_ENDED) {
      show('disconnected', 'Disconnected: ' + (closed.reason || 'the session ended'));
    } else if (failures < RETRY_DELAYS_MS.length) {
      const delay = RETRY_DELAYS_MS[failures];
      failures += 1;
      show('reconnecting', `Connection lost; reconnecting (attempt ${failures} of ${RETRY_DELAYS_MS.length})…`);
      setTimeout(connect, delay);
    } else {
      show('error', 'Connection lost; the console could not reconnect. Open the console link again.');
    }
  });
  rfb.addEventListener('securityfailure', (e) => {
    closed.refused = true;
    show('error', 'Refused: ' + e.detail.reason);
  });
  rfb.addEventListener('desktopname', (e) => { document.title = e.detail.name + ' - vdim'; });
  window.vdimConsole = rfb;
}

if (!token || !/^[0-9a-f]{64}$/.test(token)) {
  show('error', 'No console token: open the console link the broker gave you.');
} else {
  cad.addEventListener('click', () => window.vdimConsole && window.vdimConsole.sendCtrlAltDel());
  connect();
}
