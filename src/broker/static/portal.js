// Browser-only entry for ChromeOS and other thin clients without remote-viewer: sign in with
// the token an administrator gave, pick a pool, open its desktop in the HTML5 console.
// The token stays in this tab's sessionStorage and only travels in Authorization headers.
const msg = document.getElementById('message');
const list = document.getElementById('pools');
const tokenInput = document.getElementById('token');
const say = (t) => { msg.textContent = t; };

async function api(method, path) {
  const token = sessionStorage.getItem('vdim-token');
  const r = await fetch(path, { method, headers: { Authorization: 'Bearer ' + token } });
  const body = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(body.error || r.statusText);
  return body;
}

async function showPools() {
  list.replaceChildren();
  try {
    const pools = await api('GET', '/api/v1/pools');
    if (pools.length === 0) say('You are not entitled to any pool yet.');
    for (const p of pools) {
      const li = document.createElement('li');
      const b = document.createElement('button');
      b.textContent = `${p.name} (${p.image} v${p.version}, ${p.available} free)`;
      b.disabled = !p.running;
      b.addEventListener('click', async () => {
        try {
          const s = await api('POST', `/api/v1/pools/${encodeURIComponent(p.name)}/sessions`);
          location.assign(s.console_url);
        } catch (e) { say(e.message); }
      });
      li.append(b);
      list.append(li);
    }
  } catch (e) {
    say(e.message);
  }
}

document.getElementById('login').addEventListener('submit', (ev) => {
  ev.preventDefault();
  sessionStorage.setItem('vdim-token', tokenInput.value.trim());
  tokenInput.value = '';
  showPools();
});
if (sessionStorage.getItem('vdim-token')) showPools();
