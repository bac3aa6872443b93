//! The `.vv` file remote-viewer opens: an INI `[virt-viewer]` section with the display's
//! address and a one-time ticket. One value with a newline in it could add any key (a
//! different host, a `proxy=`), so every value is checked, not escaped: INI has no escaping.

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum VvError {
    #[error(
        "refusing to write {key} into a .vv file for desktop '{desktop}': it contains a control character or is empty"
    )]
    BadValue { desktop: String, key: &'static str },
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
    fn refuses_newline_injection() {
        for (host, pw) in [("127.0.0.1\nproxy=http://evil", "x"), ("h", "x\r\nhost=evil"), ("h", ""), ("h", "a\0b")] {
            assert!(vv(host, pw).render().is_err(), "{host:?} {pw:?}");
        }
    }
}
