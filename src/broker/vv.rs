//! The `.vv` file remote-viewer opens: an INI `[virt-viewer]` section with the display's
//! address and a one-time ticket. One value with a newline in it could add any key (a
//! different host, a `proxy=`), so every value is checked, not escaped: INI has no escaping.
//!
//! The host is the address the desktop's display listens on. A display listening on every
//! address (`0.0.0.0`, `::`) names none a thin client could use, so the administrator says
//! which one reaches this hypervisor (`vdim serve --display-host`); the broker never guesses.
//!
//! A display off loopback speaks SPICE over TLS only (no plaintext port): its `.vv` names the
//! `tls-port`, every channel in `secure-channels`, the CA that signed the host's SPICE
//! certificate (`vdim serve --display-ca`, PEM with literal `\n` between lines as
//! remote-viewer expects) and, when given, the certificate subject to expect
//! (`--display-host-subject`); without a subject remote-viewer checks the host name.

use std::net::IpAddr;
use thiserror::Error;

/// Longest DNS name.
const MAX_HOST_LEN: usize = 253;
/// A CA bundle larger than this is not a CA certificate.
pub const MAX_CA_BYTES: usize = 64 * 1024;
/// Every SPICE channel remote-viewer knows (its CONNECTION FILE docs): all of them over TLS.
const SECURE_CHANNELS: &str = "main;display;inputs;cursor;playback;record;smartcard;usbredir";

#[derive(Debug, Error, PartialEq, Eq)]
pub enum VvError {
    #[error(
        "refusing to write {key} into a .vv file for desktop '{desktop}': it contains a control character or is empty"
    )]
    BadValue { desktop: String, key: &'static str },
    #[error(
        "desktop '{desktop}' has its display on every address ({listen}), and the broker was not told which one \
         thin clients reach this host at: an administrator must start 'vdim serve' with --display-host HOST \
         (or VDIM_DISPLAY_HOST); the HTML5 console works meanwhile"
    )]
    NoDisplayHost { desktop: String, listen: String },
    #[error(
        "desktop '{desktop}' has a TLS-only SPICE display, and the broker was not given the CA that signed the \
         host's SPICE certificate: an administrator must start 'vdim serve' with --display-ca FILE (the \
         ca-cert.pem of libvirt's spice_tls_x509_cert_dir); the HTML5 console works meanwhile"
    )]
    NoDisplayCa { desktop: String },
}

impl crate::error::Kind for VvError {
    fn kind(&self) -> crate::error::ErrorKind {
        use crate::error::ErrorKind as K;
        match self {
            // The display is there but not reachable through this broker until an admin acts.
            VvError::NoDisplayHost { .. } | VvError::NoDisplayCa { .. } => K::Exhausted,
            VvError::BadValue { .. } => K::Internal,
        }
    }
}

/// What a `.vv` file needs so remote-viewer can check a TLS display's certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DisplayTls {
    /// The CA certificate(s), PEM lines joined by a literal `\n`.
    pub ca: String,
    /// The certificate subject to expect, e.g. `O=Example,CN=hv1.example`.
    pub host_subject: Option<String>,
}

/// `--display-ca`: PEM CA certificates only (no private key), ASCII, at most 64 KiB; returns
/// them as one `.vv` value (lines joined by `\n`).
pub fn parse_display_ca(pem: &str) -> Result<String, String> {
    if pem.len() > MAX_CA_BYTES {
        return Err(format!("is larger than {MAX_CA_BYTES} bytes"));
    }
    let lines: Vec<&str> = pem.lines().map(|l| l.trim_end_matches('\r')).filter(|l| !l.is_empty()).collect();
    if let Some(l) = lines.iter().find(|l| !l.bytes().all(|b| (0x20..0x7f).contains(&b))) {
        return Err(format!("has a line that is not plain ASCII: {:?}", l.escape_default().to_string()));
    }
    if lines.iter().any(|l| l.contains("PRIVATE KEY")) {
        return Err("contains a private key: give only the CA certificate".into());
    }
    let mut inside = false;
    let mut certs = 0;
    for l in &lines {
        match (*l, inside) {
            ("-----BEGIN CERTIFICATE-----", false) => inside = true,
            ("-----END CERTIFICATE-----", true) => {
                inside = false;
                certs += 1;
            }
            (l, true) if l.trim_end_matches('=').bytes().all(|b| b.is_ascii_alphanumeric() || b"+/".contains(&b)) => {}
            _ => return Err("is not a PEM certificate (BEGIN/END CERTIFICATE lines around base64)".into()),
        }
    }
    if inside || certs == 0 {
        return Err("holds no complete PEM certificate".into());
    }
    Ok(lines.join("\\n"))
}

/// `--display-host-subject`: printable ASCII, at most 1024 characters.
pub fn parse_host_subject(s: &str) -> Result<String, String> {
    if s.is_empty() || s.len() > 1024 || !s.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return Err(format!(
            "display host subject {:?} must be 1 to 1024 printable ASCII characters, e.g. O=Example,CN=hv1.example",
            s.escape_default().to_string()
        ));
    }
    Ok(s.to_string())
}

/// `--display-host`: a host name or IP address, letters, digits, `.`, `-` and `:` only (so
/// nothing else can reach a `.vv` file), not a wildcard address, at most 253 characters.
pub fn parse_display_host(s: &str) -> Result<String, String> {
    let problem = if s.is_empty() || s.len() > MAX_HOST_LEN {
        Some(format!("must be 1 to {MAX_HOST_LEN} characters"))
    } else if !s.bytes().all(|b| b.is_ascii_alphanumeric() || b".-:".contains(&b)) {
        Some("may contain only letters, digits, '.', '-' and ':'".to_string())
    } else if s.starts_with(['-', '.']) {
        Some("must not start with '-' or '.'".to_string())
    } else if s.parse::<IpAddr>().is_ok_and(|ip| ip.is_unspecified()) {
        Some("is a wildcard address; give the address or name thin clients reach this host at".to_string())
    } else {
        None
    };
    match problem {
        None => Ok(s.to_string()),
        Some(p) => Err(format!("display host {:?} {p}", s.escape_default().to_string())),
    }
}

/// The host a `.vv` file names for a display listening on `listen`: that address, or for a
/// wildcard listen the administrator's `display_host`, and never a guess.
pub fn client_host<'a>(desktop: &str, listen: &'a str, display_host: Option<&'a str>) -> Result<&'a str, VvError> {
    match listen.parse::<IpAddr>() {
        Ok(ip) if ip.is_unspecified() => display_host
            .ok_or_else(|| VvError::NoDisplayHost { desktop: desktop.to_string(), listen: listen.to_string() }),
        _ => Ok(listen),
    }
}

#[derive(Debug)]
pub struct VvFile<'a> {
    pub pool: &'a str,
    pub desktop: &'a str,
    pub host: &'a str,
    /// The plaintext port; none for a TLS-only display.
    pub port: Option<u16>,
    pub tls_port: Option<u16>,
    pub password: &'a str,
    /// The CA (and subject) remote-viewer checks a TLS port's certificate against.
    pub tls: Option<&'a DisplayTls>,
}

pub const CONTENT_TYPE: &str = "application/x-virt-viewer";

impl VvFile<'_> {
    pub fn title(&self) -> String {
        format!("{} - {} (vdim)", self.pool, self.desktop)
    }

    pub fn render(&self) -> Result<String, VvError> {
        let title = self.title();
        let mut lines = vec![("type", "spice".to_string())];
        for (key, value) in [("host", self.host), ("password", self.password), ("title", title.as_str())] {
            if value.is_empty() || value.chars().any(char::is_control) {
                return Err(VvError::BadValue { desktop: self.desktop.to_string(), key });
            }
            lines.push((key, value.to_string()));
        }
        if let Some(p) = self.port {
            lines.push(("port", p.to_string()));
        }
        if let Some(t) = self.tls_port {
            lines.push(("tls-port", t.to_string()));
            match (self.tls, self.port) {
                (Some(tls), _) => {
                    for (key, value) in [("ca", Some(&tls.ca)), ("host-subject", tls.host_subject.as_ref())] {
                        let Some(value) = value else { continue };
                        if value.is_empty() || value.chars().any(char::is_control) {
                            return Err(VvError::BadValue { desktop: self.desktop.to_string(), key });
                        }
                        lines.push((key, value.clone()));
                    }
                }
                // Without the CA remote-viewer would trust nothing or, worse, be talked into
                // accepting any certificate: refuse rather than hand out a file that fails.
                (None, None) => return Err(VvError::NoDisplayCa { desktop: self.desktop.to_string() }),
                (None, Some(_)) => {}
            }
            if self.port.is_none() {
                lines.push(("secure-channels", SECURE_CHANNELS.to_string()));
            }
        }
        lines.extend([
            ("delete-this-file", "1".to_string()),
            ("secure-attention", "ctrl+alt+end".to_string()),
            ("release-cursor", "shift+f12".to_string()),
        ]);
        let mut out = String::from("[virt-viewer]\n");
        for (k, v) in lines {
            out.push_str(&format!("{k}={v}\n"));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vv<'a>(host: &'a str, password: &'a str) -> VvFile<'a> {
        VvFile {
            pool: "finance",
            desktop: "vdim-finance-001",
            host,
            port: Some(5901),
            tls_port: None,
            password,
            tls: None,
        }
    }

    const CA: &str = "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIU\r\nAbC+/9=\n-----END CERTIFICATE-----\n";

    #[test]
    fn a_tls_display_gets_tls_port_ca_subject_and_every_channel_secure_and_no_plain_port() {
        let tls = DisplayTls { ca: parse_display_ca(CA).unwrap(), host_subject: Some("O=vdim,CN=hv1".into()) };
        let f = VvFile { port: None, tls_port: Some(5902), tls: Some(&tls), ..vv("192.0.2.10", "abc123") };
        let text = f.render().unwrap();
        assert_eq!(
            text,
            "[virt-viewer]\ntype=spice\nhost=192.0.2.10\npassword=abc123\ntitle=finance - vdim-finance-001 (vdim)\n\
             tls-port=5902\nca=-----BEGIN CERTIFICATE-----\\nMIIBszCCAVmgAwIBAgIU\\nAbC+/9=\\n-----END CERTIFICATE-----\n\
             host-subject=O=vdim,CN=hv1\nsecure-channels=main;display;inputs;cursor;playback;record;smartcard;usbredir\n\
             delete-this-file=1\nsecure-attention=ctrl+alt+end\nrelease-cursor=shift+f12\n"
        );
        // Without a CA the broker refuses, naming the option.
        let e = VvFile { port: None, tls_port: Some(5902), tls: None, ..vv("192.0.2.10", "abc") }.render().unwrap_err();
        assert!(e.to_string().contains("--display-ca"), "{e}");
    }

    #[test]
    fn display_ca_is_pem_certificates_only() {
        assert!(parse_display_ca(CA).unwrap().contains("\\n"));
        assert!(!parse_display_ca(CA).unwrap().contains('\n'));
        for bad in [
            "",
            "hello",
            "-----BEGIN CERTIFICATE-----\nAAAA\n",
            "-----BEGIN CERTIFICATE-----\nAA\nhost=evil\n-----END CERTIFICATE-----\n",
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
            "-----BEGIN CERTIFICATE-----\nA\u{e9}\n-----END CERTIFICATE-----\n",
        ] {
            assert!(parse_display_ca(bad).is_err(), "{bad:?}");
        }
        assert!(parse_host_subject("O=a,CN=b").is_ok());
        assert!(parse_host_subject("CN=b\nproxy=x").is_err());
    }

    #[test]
    fn carries_ticket_title_and_deletes_itself() {
        let text = vv("127.0.0.1", "abc123").render().unwrap();
        assert_eq!(
            text,
            "[virt-viewer]\ntype=spice\nhost=127.0.0.1\npassword=abc123\ntitle=finance - vdim-finance-001 (vdim)\n\
             port=5901\ndelete-this-file=1\nsecure-attention=ctrl+alt+end\nrelease-cursor=shift+f12\n"
        );
    }

    #[test]
    fn a_specific_address_is_the_host_and_a_wildcard_needs_the_display_host() {
        for listen in ["127.0.0.1", "192.0.2.10", "fd00::5"] {
            assert_eq!(client_host("d", listen, None), Ok(listen));
            assert_eq!(client_host("d", listen, Some("vdi.example")), Ok(listen), "a specific address wins");
        }
        for listen in ["0.0.0.0", "::"] {
            assert_eq!(client_host("d", listen, Some("vdi.example")), Ok("vdi.example"));
            let e = client_host("d", listen, None).unwrap_err();
            assert!(e.to_string().contains("--display-host"), "{e}");
        }
    }

    #[test]
    fn display_host_is_a_plain_name_or_address() {
        for ok in ["vdi.example.com", "192.0.2.10", "fd00::5", "hv-01", "HV1.Example"] {
            assert_eq!(parse_display_host(ok).as_deref(), Ok(ok));
        }
        let long = "a".repeat(254);
        for bad in [
            "",
            "h\nproxy=http://evil",
            "h\r",
            "h st",
            "[::1]",
            "h/x",
            "h_x",
            "-h",
            ".h",
            "0.0.0.0",
            "::",
            "h\u{e9}",
            long.as_str(),
        ] {
            assert!(parse_display_host(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn refuses_newline_injection() {
        for (host, pw) in [("127.0.0.1\nproxy=http://evil", "x"), ("h", "x\r\nhost=evil"), ("h", ""), ("h", "a\0b")] {
            assert!(vv(host, pw).render().is_err(), "{host:?} {pw:?}");
        }
    }
}
