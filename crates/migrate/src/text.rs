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

/// The first `most` of `paths`, each escaped, joined by ", ", with "and N more" after them.
pub fn escape_list(paths: &[String], most: usize) -> String {
    let shown: Vec<_> = paths.iter().take(most).map(|p| escape(p)).collect();
    match paths.len() {
        n if n > most => format!("{} and {} more", shown.join(", "), n - most),
        _ => shown.join(", "),
    }
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

/// `value` (an [`crate::Event`], a summary) as one line of JSON that is safe on a terminal
/// (see [`json_terminal_safe`]): what the CLI's `--json` prints.
pub fn json_line(value: &impl serde::Serialize) -> serde_json::Result<String> {
    let line = serde_json::to_string(value)?;
    Ok(json_terminal_safe(&line).into_owned())
}

/// A JSON line with the characters JSON leaves raw but a terminal acts on (C1 controls, DEL,
/// bidirectional overrides) written as `\uXXXX` escapes: still the same JSON, and a peer's
/// file name cannot drive a terminal that shows `--json` output. They can only occur inside
/// strings, where the escape means the same character.
pub fn json_terminal_safe(line: &str) -> std::borrow::Cow<'_, str> {
    let unsafe_char = |c: char| matches!(c, '\u{7f}'..='\u{9f}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
    if !line.chars().any(unsafe_char) {
        return std::borrow::Cow::Borrowed(line);
    }
    let mut out = String::with_capacity(line.len() + 16);
    for c in line.chars() {
        if unsafe_char(c) {
            out.push_str(&format!("\\u{:04x}", c as u32));
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// Unix seconds as `YYYY-MM-DD HH:MM UTC` (proleptic Gregorian calendar).
pub fn utc_time(unix: u64) -> String {
    let (days, secs) = (unix / 86_400, unix % 86_400);
    // Howard Hinnant's civil_from_days, for days since 1970-01-01 (never negative here).
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02} UTC",
        secs / 3600,
        secs % 3600 / 60
    )
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
    #[test]
    fn json_lines_carry_no_raw_c1_or_bidi_characters_and_stay_the_same_json() {
        let v = serde_json::json!({"path": "evil\u{202e}gpj.exe\u{9b}2J\u{7f}"});
        let line = serde_json::to_string(&v).unwrap();
        assert!(
            line.contains('\u{202e}'),
            "serde_json leaves it raw: {line}"
        );
        let safe = json_terminal_safe(&line);
        assert!(
            !safe.chars().any(|c| c.is_control() || c == '\u{202e}'),
            "{safe}"
        );
        let back: serde_json::Value = serde_json::from_str(&safe).unwrap();
        assert_eq!(back, v);
    }

    #[test]
    fn utc_time_formats_known_instants() {
        assert_eq!(utc_time(0), "1970-01-01 00:00 UTC");
        assert_eq!(utc_time(951_782_400), "2000-02-29 00:00 UTC");
        assert_eq!(utc_time(1_796_312_460), "2026-12-03 15:41 UTC");
    }
}
