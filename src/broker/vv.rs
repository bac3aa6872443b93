//! The `.vv` file remote-viewer opens: an INI `[virt-viewer]` section with the display's
//! address and a one-time ticket. One value with a newline in it could add any key (a
//! different host, a `proxy=`), so every value is checked, not escaped: INI has no escaping.
//!
//! The host is the address the desktop's display listens on. A display listening on every
//! address (`0.0.0.0`, `::`) names none a thin client could use, so the administrator says
//! which one reaches this hypervisor (`vdim serve --display-host`); the broker never guesses.

use std::net::IpAddr;
use thiserror::Error;

/// Longest DNS name.
const MAX_HOST_LEN: usize = 253;

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
    pub port: u16,
    pub tls_port: Option<u16>,
    pub password: &'a str,
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
        lines.push(("port", self.port.to_string()));
        if let Some(t) = self.tls_port {
            lines.push(("tls-port", t.to_string()));
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
        VvFile { pool: "finance", desktop: "vdim-finance-001", host, port: 5901, tls_port: None, password }
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
