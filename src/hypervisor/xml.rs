//! The XML vdim writes for libvirt and the little it reads back from it, with the one escaper
//! both use. Values that would need more than escaping (names, paths) are refused instead:
//! see [`name_problem`] and [`path_problem`].

use std::path::{Component, Path};

// ---- writing ------------------------------------------------------------------------------

/// Escapes `& < > " '` (and tab, newline, carriage return as character references) so the
/// result is safe in XML text and in single- or double-quoted attributes. Other control
/// characters cannot appear in XML 1.0 at all and become U+FFFD.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' => out.push_str("&#9;"),
            '\n' => out.push_str("&#10;"),
            '\r' => out.push_str("&#13;"),
            c if (c as u32) < 0x20 || c == '\u{fffe}' || c == '\u{ffff}' => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
    out
}

/// Why a name (of a desktop, pool or network) cannot go into the XML, if it cannot: 1 to 80
/// characters of `A-Z a-z 0-9 . _ -`, not starting with `.` or `-`. Such names are refused,
/// not escaped.
pub(crate) fn name_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        Some("it is empty")
    } else if name.len() > 80 {
        Some("it is longer than 80 characters")
    } else if !name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')) {
        Some("use only A-Z, a-z, 0-9, '.', '_' and '-'")
    } else if name.starts_with(['.', '-']) {
        Some("it must not start with '.' or '-'")
    } else {
        None
    }
}

/// Why a path cannot go into the XML, if it cannot.
pub(crate) fn path_problem(path: &Path) -> Option<&'static str> {
    let Some(s) = path.to_str() else {
        return Some("it is not valid UTF-8");
    };
    if !path.is_absolute() {
        return Some("it must be absolute");
    }
    if s.chars().any(|c| c.is_control() || matches!(c, '\'' | '"' | '<' | '>' | '&')) {
        return Some("it must not contain control characters or any of ' \" < > &");
    }
    if path.components().any(|c| c == Component::ParentDir) {
        return Some("it must not contain '..'");
    }
    None
}

/// A tiny XML writer: element and attribute names are `'static` literals of the builder,
/// every value passes through [`escape`].
#[derive(Default)]
pub(crate) struct Writer {
    pub out: String,
    depth: usize,
}

impl Writer {
    fn tag(&mut self, name: &'static str, attrs: &[(&'static str, &str)]) {
        for _ in 0..self.depth {
            self.out.push_str("  ");
        }
        self.out.push('<');
        self.out.push_str(name);
        for (key, value) in attrs {
            self.out.push(' ');
            self.out.push_str(key);
            self.out.push_str("='");
            self.out.push_str(&escape(value));
            self.out.push('\'');
        }
    }

    pub(crate) fn open(&mut self, name: &'static str, attrs: &[(&'static str, &str)]) {
        self.tag(name, attrs);
        self.out.push_str(">\n");
        self.depth += 1;
    }

    pub(crate) fn empty(&mut self, name: &'static str, attrs: &[(&'static str, &str)]) {
        self.tag(name, attrs);
        self.out.push_str("/>\n");
    }

    pub(crate) fn leaf(&mut self, name: &'static str, attrs: &[(&'static str, &str)], text: &str) {
        self.tag(name, attrs);
        self.out.push('>');
        self.out.push_str(&escape(text));
        self.out.push_str("</");
        self.out.push_str(name);
        self.out.push_str(">\n");
    }

    pub(crate) fn close(&mut self, name: &'static str) {
        self.depth = self.depth.saturating_sub(1);
        for _ in 0..self.depth {
            self.out.push_str("  ");
        }
        self.out.push_str("</");
        self.out.push_str(name);
        self.out.push_str(">\n");
    }
}

// ---- reading: just enough for libvirt's own well-formed domain XML: find an element, read and
// rewrite the attributes of its start tag, keep its children verbatim.

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Element {
    pub name: String,
    pub attrs: Vec<(String, String)>,
    /// Everything between the start and end tags, verbatim; empty when self-closing.
    pub inner: String,
    pub self_closing: bool,
}

impl Element {
    pub(crate) fn attr(&self, name: &str) -> Option<&str> {
        self.attrs.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    pub(crate) fn set_attr(&mut self, name: &str, value: &str) {
        match self.attrs.iter_mut().find(|(k, _)| k == name) {
            Some((_, v)) => *v = value.to_string(),
            None => self.attrs.push((name.to_string(), value.to_string())),
        }
    }

    pub(crate) fn remove_attr(&mut self, name: &str) {
        self.attrs.retain(|(k, _)| k != name);
    }

    pub(crate) fn to_xml(&self) -> String {
        let mut out = format!("<{}", self.name);
        for (k, v) in &self.attrs {
            out.push_str(&format!(" {k}='{}'", escape(v)));
        }
        if self.self_closing {
            out.push_str("/>");
        } else {
            out.push_str(&format!(">{}</{}>", self.inner, self.name));
        }
        out
    }
}

/// All `<name ...>` elements, in document order (elements of that name must not nest).
pub(crate) fn find_elements(xml: &str, name: &str) -> Vec<Element> {
    let open = format!("<{name}");
    let close = format!("</{name}>");
    let mut found = Vec::new();
    let mut rest = xml;
    while let Some(at) = rest.find(&open) {
        let after = &rest[at + open.len()..];
        let boundary = after.chars().next();
        if !matches!(boundary, Some(c) if c.is_whitespace() || c == '>' || c == '/') {
            rest = after;
            continue;
        }
        let Some(StartTag { attrs, self_closing, len: tag_len }) = parse_start_tag(after) else {
            break;
        };
        let body = &after[tag_len..];
        if self_closing {
            found.push(Element { name: name.to_string(), attrs, inner: String::new(), self_closing });
            rest = body;
        } else {
            let Some(end) = body.find(&close) else { break };
            found.push(Element { name: name.to_string(), attrs, inner: body[..end].to_string(), self_closing });
            rest = &body[end + close.len()..];
        }
    }
    found
}

/// What follows an element's name up to and including `>` or `/>`.
struct StartTag {
    attrs: Vec<(String, String)>,
    self_closing: bool,
    len: usize,
}

/// Parses ` a='1' b="2">`, the rest of a start tag after the element name.
fn parse_start_tag(s: &str) -> Option<StartTag> {
    let bytes = s.as_bytes();
    let mut attrs = Vec::new();
    let mut i = 0;
    loop {
        while i < bytes.len() && bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        match bytes.get(i)? {
            b'>' => return Some(StartTag { attrs, self_closing: false, len: i + 1 }),
            b'/' if bytes.get(i + 1) == Some(&b'>') => return Some(StartTag { attrs, self_closing: true, len: i + 2 }),
            _ => {}
        }
        let eq = i + s[i..].find('=')?;
        let key = s[i..eq].trim().to_string();
        let quote = *bytes.get(eq + 1)?;
        if quote != b'\'' && quote != b'"' {
            return None;
        }
        let start = eq + 2;
        let len = s[start..].find(quote as char)?;
        attrs.push((key, unescape(&s[start..start + len])));
        i = start + len + 1;
    }
}

/// The `<disk device='cdrom'>` whose target is `dev`.
pub(crate) fn cdrom(xml: &str, dev: &str) -> Option<Element> {
    find_elements(xml, "disk").into_iter().find(|d| {
        d.attr("device") == Some("cdrom")
            && find_elements(&d.inner, "target").iter().any(|t| t.attr("dev") == Some(dev))
    })
}

/// That CD-ROM without media: what `update-device` takes to eject it.
pub(crate) fn empty_cdrom(cdrom: &Element, dev: &str) -> String {
    let target = find_elements(&cdrom.inner, "target");
    let bus = target.first().and_then(|t| t.attr("bus")).unwrap_or("sata");
    let mut x = Writer::default();
    x.open("disk", &[("type", cdrom.attr("type").unwrap_or("file")), ("device", "cdrom")]);
    x.empty("target", &[("dev", dev), ("bus", bus)]);
    x.empty("readonly", &[]);
    x.close("disk");
    x.out
}

/// The text of the first `<name>` element, unescaped.
pub(crate) fn element_text(xml: &str, name: &str) -> Option<String> {
    let el = find_elements(xml, name).into_iter().next()?;
    Some(unescape(el.inner.trim()))
}

/// The five predefined entities back to characters (libvirt writes no other references in
/// the attributes and names vdim reads).
pub(crate) fn unescape(s: &str) -> String {
    s.replace("&lt;", "<").replace("&gt;", ">").replace("&apos;", "'").replace("&quot;", "\"").replace("&amp;", "&")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_escapes_every_special_character() {
        assert_eq!(escape("a&b<c>d\"e'f\ng\th\ri"), "a&amp;b&lt;c&gt;d&quot;e&apos;f&#10;g&#9;h&#13;i");
        assert_eq!(escape("x\u{0}y\u{1b}"), "x\u{fffd}y\u{fffd}");
        assert_eq!(escape("plain-ascii_1.2"), "plain-ascii_1.2");
    }

    #[test]
    fn what_escape_writes_unescape_reads_back() {
        for s in ["n<e>w'\"&", "plain", "&amp;", "a'b\"c"] {
            assert_eq!(unescape(&escape(s)), s);
        }
    }
}
