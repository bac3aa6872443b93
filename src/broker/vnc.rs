//! Just enough RFB (VNC) for the console proxy: log in to a desktop's display with its
//! one-time password (VNC authentication, DES challenge/response), and offer the browser a
//! display that needs no password, because the broker already checked the session's console
//! token. The VNC password thus never reaches the browser.
//!
//! ```text
//!  browser (noVNC) ◄─ RFB 3.8, security "None" ─► proxy ◄─ RFB 3.8, "VNC auth" ─► QEMU
//!                     (after the handshakes both sides' bytes are copied unchanged)
//! ```

use crate::hypervisor::VNC_PASSWORD_MAX;
use des::cipher::{BlockEncrypt, KeyInit};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const VERSION_3_8: &[u8; 12] = b"RFB 003.008\n";
const SECURITY_NONE: u8 = 1;
const SECURITY_VNC_AUTH: u8 = 2;

#[derive(Debug, Error)]
pub enum VncError {
    #[error("the display of desktop '{desktop}' {what}")]
    Protocol { desktop: String, what: String },
    #[error("the display of desktop '{desktop}' refused the console ticket: {reason}")]
    Refused { desktop: String, reason: String },
    #[error("the connection to the display of desktop '{desktop}' failed")]
    Io { desktop: String, source: std::io::Error },
    #[error("the browser's RFB handshake is not understood: {0}")]
    Client(String),
}

impl crate::error::Kind for VncError {
    fn kind(&self) -> crate::error::ErrorKind {
        use crate::error::ErrorKind as K;
        match self {
            VncError::Client(_) => K::Invalid,
            VncError::Protocol { .. } | VncError::Refused { .. } | VncError::Io { .. } => K::Internal,
        }
    }
}

/// The 16-byte response to a VNC authentication challenge: DES-ECB of the challenge with
/// the password's first [`VNC_PASSWORD_MAX`] bytes, each bit-reversed (the RFB spec's
/// historical quirk).
pub fn des_response(challenge: &[u8; 16], password: &str) -> [u8; 16] {
    let mut key = [0u8; VNC_PASSWORD_MAX];
    for (k, p) in key.iter_mut().zip(password.bytes()) {
        *k = p.reverse_bits();
    }
    let cipher = des::Des::new(&key.into());
    let mut out = *challenge;
    for block in out.chunks_exact_mut(8) {
        cipher.encrypt_block(block.into());
    }
    out
}

/// Logs in to a QEMU VNC display as a client. On `Ok` the next bytes on `io` are the
/// server's reply to ClientInit, which the browser sends.
pub async fn client_login<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    desktop: &str,
    password: &str,
) -> Result<(), VncError> {
    let proto = |what: String| VncError::Protocol { desktop: desktop.to_string(), what };
    let ioe = |source| VncError::Io { desktop: desktop.to_string(), source };
    let mut version = [0u8; 12];
    io.read_exact(&mut version).await.map_err(ioe)?;
    if !version.starts_with(b"RFB 003.") {
        return Err(proto(format!("does not speak RFB (sent {:?})", String::from_utf8_lossy(&version))));
    }
    io.write_all(VERSION_3_8).await.map_err(ioe)?;
    let n = io.read_u8().await.map_err(ioe)?;
    if n == 0 {
        let reason = read_reason(io).await.map_err(ioe)?;
        return Err(proto(format!("offers no security type: {reason}")));
    }
    let mut types = vec![0u8; usize::from(n)];
    io.read_exact(&mut types).await.map_err(ioe)?;
    if !types.contains(&SECURITY_VNC_AUTH) {
        // Displays are always password-protected: anything else is not a vdim desktop.
        return Err(proto(format!("does not offer VNC authentication (offers {types:?})")));
    }
    io.write_u8(SECURITY_VNC_AUTH).await.map_err(ioe)?;
    let mut challenge = [0u8; 16];
    io.read_exact(&mut challenge).await.map_err(ioe)?;
    io.write_all(&des_response(&challenge, password)).await.map_err(ioe)?;
    match io.read_u32().await.map_err(ioe)? {
        0 => Ok(()),
        _ => {
            let reason = read_reason(io).await.unwrap_or_else(|_| "authentication failed".into());
            Err(VncError::Refused { desktop: desktop.to_string(), reason })
        }
    }
}

async fn read_reason<S: AsyncRead + Unpin>(io: &mut S) -> std::io::Result<String> {
    let len = io.read_u32().await?.min(1024) as usize;
    let mut reason = vec![0u8; len];
    io.read_exact(&mut reason).await?;
    Ok(String::from_utf8_lossy(&reason).into_owned())
}

/// The server side of the handshake offered to the browser, as a small state machine over
/// the bytes the browser sent so far (WebSocket messages split them arbitrarily).
#[derive(Debug, Default)]
pub struct NoAuthServer {
    buf: Vec<u8>,
    version: Option<u8>,
}

/// What to do after feeding the browser's bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Send these bytes to the browser and wait for more input.
    Send(Vec<u8>),
    /// Send these bytes; the handshake is over and `rest` (already received) goes to the display.
    Done { send: Vec<u8>, rest: Vec<u8> },
    /// Need more bytes.
    More,
}

impl NoAuthServer {
    /// The server's first message.
    pub fn greeting() -> &'static [u8] {
        VERSION_3_8
    }

    pub fn feed(&mut self, data: &[u8]) -> Result<Step, VncError> {
        self.buf.extend_from_slice(data);
        if self.version.is_none() {
            if self.buf.len() < 12 {
                return Ok(Step::More);
            }
            let v: Vec<u8> = self.buf.drain(..12).collect();
            let minor = match &v[..] {
                b"RFB 003.003\n" => 3,
                b"RFB 003.007\n" => 7,
                b"RFB 003.008\n" => 8,
                other => return Err(VncError::Client(format!("version {:?}", String::from_utf8_lossy(other)))),
            };
            self.version = Some(minor);
            if minor == 3 {
                // 3.3: the server picks the type (u32), and "None" has no result message.
                return Ok(Step::Done { send: u32::from(SECURITY_NONE).to_be_bytes().to_vec(), rest: self.take() });
            }
            let offer = vec![1, SECURITY_NONE];
            if self.buf.is_empty() {
                return Ok(Step::Send(offer));
            }
            return match self.choose()? {
                Step::Done { send, rest } => Ok(Step::Done { send: [offer, send].concat(), rest }),
                _ => Ok(Step::Send(offer)),
            };
        }
        self.choose()
    }

    fn choose(&mut self) -> Result<Step, VncError> {
        let Some(&choice) = self.buf.first() else { return Ok(Step::More) };
        if choice != SECURITY_NONE {
            return Err(VncError::Client(format!("security type {choice} was not offered")));
        }
        self.buf.remove(0);
        // 3.8 sends a SecurityResult even for "None"; 3.7 does not.
        let send = if self.version == Some(8) { 0u32.to_be_bytes().to_vec() } else { vec![] };
        Ok(Step::Done { send, rest: self.take() })
    }

    fn take(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn des_response_matches_a_known_vector() {
        // Password "password", challenge 0x00..0x0f.
        let challenge: [u8; 16] = core::array::from_fn(|i| i as u8);
        let r = des_response(&challenge, "password");
        // Computed independently with OpenSSL: DES-ECB, key = bit-reversed "password".
        assert_eq!(hex::encode(r), "b866924125c8eebb9debc1db61c538e2");
        assert_ne!(des_response(&challenge, "passwore"), r);
        assert_eq!(des_response(&challenge, "password-and-more"), r, "only 8 characters count");
    }

    #[test]
    fn browser_handshake_3_8_in_pieces() {
        let mut s = NoAuthServer::default();
        assert_eq!(s.feed(b"RFB 003.0").unwrap(), Step::More);
        assert_eq!(s.feed(b"08\n").unwrap(), Step::Send(vec![1, 1]));
        assert_eq!(
            s.feed(&[1, 1, 0xAA]).unwrap(),
            Step::Done { send: vec![0, 0, 0, 0], rest: vec![1, 0xAA] },
            "ClientInit bytes already sent go on to the display"
        );
    }

    #[test]
    fn browser_handshake_3_3_and_3_7() {
        let mut s = NoAuthServer::default();
        assert_eq!(s.feed(b"RFB 003.003\n").unwrap(), Step::Done { send: vec![0, 0, 0, 1], rest: vec![] });
        let mut s = NoAuthServer::default();
        assert_eq!(s.feed(b"RFB 003.007\n\x01").unwrap(), Step::Done { send: vec![1, 1], rest: vec![] });
    }

    #[test]
    fn browser_handshake_refuses_other_types_and_versions() {
        let mut s = NoAuthServer::default();
        s.feed(b"RFB 003.008\n").unwrap();
        assert!(s.feed(&[2]).is_err(), "VNC auth was not offered to the browser");
        assert!(NoAuthServer::default().feed(b"GET / HTTP/1.1\r\n").is_err());
    }
}
