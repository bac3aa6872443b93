//! `vdim serve`: the thin-client broker and admin API.

use super::global::Global;
use crate::broker::{self, ServeOptions};
use anyhow::Result;
use clap::Args;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Where `scripts/setup-console` installs noVNC.
pub const DEFAULT_NOVNC: &str = "/var/cache/vdim/console/node_modules/@novnc/novnc";

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Address to listen on; plain HTTP only on loopback (port 0 picks a free port)
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// TLS certificate chain (PEM)
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM)
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// The URL thin clients reach the broker at [default: from --listen]
    #[arg(long)]
    pub public_url: Option<String>,
    /// noVNC directory for the HTML5 console (scripts/setup-console installs it)
    #[arg(long, env = "VDIM_NOVNC", default_value = DEFAULT_NOVNC)]
    pub novnc: PathBuf,
    /// How long a session lasts before the broker logs it off
    #[arg(long, default_value = "12h", value_parser = humantime::parse_duration)]
    pub session_ttl: Duration,
    /// Host name or IP address thin clients reach this hypervisor at: the host of .vv files for
    /// pools whose displays listen on every address (--display-listen 0.0.0.0 or ::)
    #[arg(long, env = "VDIM_DISPLAY_HOST", value_name = "HOST", value_parser = broker::vv::parse_display_host)]
    pub display_host: Option<String>,
    /// CA certificate (PEM) that signed the hosts' SPICE TLS certificates, i.e. the ca-cert.pem
    /// of libvirt's spice_tls_x509_cert_dir: .vv files of TLS displays carry it
    #[arg(long, env = "VDIM_DISPLAY_CA", value_name = "FILE")]
    pub display_ca: Option<PathBuf>,
    /// Subject of the hosts' SPICE server certificate (e.g. "O=Example,CN=hv1.example") for
    /// remote-viewer to expect; without it remote-viewer checks the host name against it
    #[arg(long, requires = "display_ca", value_name = "SUBJECT", value_parser = broker::vv::parse_host_subject)]
    pub display_host_subject: Option<String>,
    /// Serve /bench/noop, a bare handler, as the benchmark's baseline
    #[arg(long, hide = true)]
    pub bench_noop: bool,
    /// How long a client may take for its TLS handshake and for each request head (also the
    /// keep-alive idle time); slower connections are closed
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub header_timeout: Duration,
    /// How long a thin-client or public request may take in all (503 after it; 408 when
    /// its body has not arrived)
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub request_timeout: Duration,
    /// Open client connections at most; at the cap the oldest connection that is not in a
    /// request makes room [default: 4096, or fewer if the open-files limit is lower]
    #[arg(long, value_name = "N")]
    pub max_connections: Option<usize>,
    /// Also serve /metrics without a token on this plain-HTTP address (loopback or an admin
    /// network); on --listen, /metrics needs an admin token
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
    /// POST incidents the fleet watch opens and resolves here (JSON, retried with backoff)
    #[arg(long, value_name = "URL")]
    pub webhook: Option<String>,
}

fn read_display_ca(path: &std::path::Path) -> Result<String> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(broker::vv::MAX_CA_BYTES as u64 + 1).read_to_string(&mut text))
        .map_err(|e| anyhow::anyhow!("cannot read the display CA {}: {e}", path.display()))?;
    Ok(text)
}

pub fn run(g: &Global, a: ServeArgs) -> Result<()> {
    let display_tls = match &a.display_ca {
        None => None,
        Some(path) => {
            let pem = read_display_ca(path)?;
            let ca = broker::vv::parse_display_ca(&pem)
                .map_err(|why| anyhow::anyhow!("display CA {} {why}", path.display()))?;
            Some(broker::vv::DisplayTls { ca, host_subject: a.display_host_subject.clone() })
        }
    };
    let opts = ServeOptions {
        settings: g.settings(),
        listen: a.listen,
        tls: a.tls_cert.zip(a.tls_key),
        public_url: a.public_url,
        novnc: a.novnc,
        session_ttl: a.session_ttl,
        display_host: a.display_host,
        display_tls,
        bench_noop: a.bench_noop,
        header_timeout: a.header_timeout,
        request_timeout: a.request_timeout,
        max_connections: a.max_connections,
        metrics_listen: a.metrics_listen,
        webhook: a.webhook.as_deref().map(crate::watch::webhook::Webhook::parse).transpose()?,
    };
    Ok(broker::serve(opts)?)
}
