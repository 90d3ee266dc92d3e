//! Text for people: peer-supplied strings made safe for a terminal, and byte counts.
//!
//! Messages of [`Error`](crate::Error) quote strings that came from the other device (its name,
//! file names from its manifest, its close reasons) through [`escape`]. Event fields carry them
//! as they came: a renderer that prints them must escape them the same way (JSON needs none of
//! this: the serialiser escapes).

use std::borrow::Cow;

/// Whether a character must not reach a terminal raw: C0 and C1 controls and DEL (escape
/// sequences start with ESC or CSI: set the title, clear the screen, move the cursor, or worse),
/// and the invisible bidirectional overrides that reorder what a line appears to say.
fn is_unsafe(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
        )
}

fn escape_where(s: &str, unsafe_char: impl Fn(char) -> bool) -> Cow<'_, str> {
    if !s.chars().any(&unsafe_char) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        if unsafe_char(c) {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// A string from a peer or the network (a file name, a device name, a close reason), made safe
/// for a terminal: every control character (newlines too) and bidirectional override is written
/// as a visible `\u{..}` escape. JSON output needs none of this (serde escapes it).
pub fn escape(s: &str) -> Cow<'_, str> {
    escape_where(s, is_unsafe)
}

/// A whole message for the terminal: like [`escape`], but its own line breaks stay. Every
/// line ferry writes for a person goes through this, whatever it embeds.
pub fn escape_lines(s: &str) -> Cow<'_, str> {
    escape_where(s, |c| c != '\n' && is_unsafe(c))
}

/// "1.5 GiB"-style sizes.
pub fn human_bytes(n: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// No C0/C1 control other than a newline, no DEL, no bidi override.
    pub(crate) fn terminal_safe(s: &str, newlines: bool) -> bool {
        !s.chars().any(|c| is_unsafe(c) && !(newlines && c == '\n'))
    }

    #[test]
    fn escapes_every_control_and_bidi_override() {
        let hostile = "a\x1b]0;owned\x07b\x1b[2Jc\u{9b}31md\re\tf\u{7f}g\u{202e}h\nj";
        let e = escape(hostile);
        assert!(terminal_safe(&e, false), "{e:?}");
        assert_eq!(
            e,
            "a\\u{1b}]0;owned\\u{7}b\\u{1b}[2Jc\\u{9b}31md\\u{d}e\\u{9}f\\u{7f}g\\u{202e}h\\u{a}j"
        );
        let l = escape_lines(hostile);
        assert!(terminal_safe(&l, true), "{l:?}");
        assert_eq!(l.lines().count(), 2);
        // Ordinary text, accents and emoji pass unchanged (and unallocated).
        assert!(matches!(escape("Fotos/été 🌞.jpg"), Cow::Borrowed(_)));
    }

    #[test]
    fn a_peer_close_reason_is_escaped_in_the_error_message() {
        use ferry_sync::proto::{CloseCode, SessionError};
        for code in [
            Some(CloseCode::SourceError),
            Some(CloseCode::ProtocolViolation),
            Some(CloseCode::Cancelled),
            None,
        ] {
            let e = SessionError::PeerClosed {
                code,
                reason: "bye\x1b]0;pwned\x07\x1b[2J\nforged line".into(),
            };
            let f = crate::error::from_session(e);
            assert!(terminal_safe(f.message(), false), "{:?}", f.message());
            assert!(f.message().contains("\\u{1b}]0;pwned"), "{:?}", f.message());
        }
        let d = ferry_sync::driver::DriveError::LinkLost("closed by peer: \x1b[2J".into());
        let f = crate::error::from_drive(d);
        assert!(terminal_safe(f.message(), false), "{:?}", f.message());
    }
}
