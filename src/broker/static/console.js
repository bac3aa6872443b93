// The HTML5 console: noVNC over the broker's WebSocket proxy. The console token arrives in
// the URL fragment (never sent to any server), is kept for this tab only, and travels to
// the proxy in the WebSocket subprotocol list, not in a URL that a log could record.
import RFB from '/novnc/core/rfb.js';

const status = document.getElementById('status');
const cad = document.getElementById('cad');
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

if (!token || !/^[0-9a-f]{64}$/.test(token)) {
  show('error', 'No console token: open the console link the broker gave you.');
} else {
  const ws = (location.protocol === 'https:' ? 'wss://' : 'ws://') + location.host + location.pathname + '/ws';
  const rfb = new RFB(document.getElementById('screen'), ws, {
    wsProtocols: ['binary', 'vdim-console-token.' + token],
  });
  rfb.scaleViewport = true;
  rfb.addEventListener('connect', () => { show('connected', 'Connected'); cad.disabled = false; });
  rfb.addEventListener('disconnect', (e) => {
    cad.disabled = true;
    show('disconnected', e.detail.clean ? 'Disconnected' : 'Connection lost');
  });
  rfb.addEventListener('securityfailure', (e) => show('error', 'Refused: ' + e.detail.reason));
  rfb.addEventListener('desktopname', (e) => { document.title = e.detail.name + ' - vdim'; });
  cad.addEventListener('click', () => rfb.sendCtrlAltDel());
  window.vdimConsole = rfb;
}
