//! What ferry tells the person (a progress bar and plain lines on stderr) or the script
//! (`--json`: one event object per line on stdout).

use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ferry_migrate::{Phase, ProgressView};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::Value;

/// Event sink shared by the commands.
pub struct Reporter {
    json: bool,
    quiet: bool,
    bar: Mutex<Option<ProgressBar>>,
    last_progress: Mutex<Option<Instant>>,
    /// The bar's phase, and the bytes done when the link went down (the bar says so until
    /// more are done).
    bar_state: Mutex<(Option<Phase>, Option<u64>)>,
    prefix: String,
}

impl Reporter {
    pub fn new(json: bool) -> Self {
        Reporter {
            json,
            quiet: false,
            bar: Mutex::new(None),
            last_progress: Mutex::new(None),
            bar_state: Mutex::new((None, None)),
            prefix: String::new(),
        }
    }

    /// A reporter for one side of `ferry demo`: plain lines with a prefix, no JSON.
    pub fn demo_side(prefix: &str, quiet: bool) -> Self {
        Reporter {
            prefix: format!("[{prefix}] "),
            quiet,
            ..Reporter::new(false)
        }
    }

    pub fn is_json(&self) -> bool {
        self.json
    }

    /// Emits a JSON event (with --json) — `event` names it.
    pub fn event(&self, event: &str, mut fields: Value) {
        if !self.json {
            return;
        }
        if let Value::Object(m) = &mut fields {
            m.insert("event".into(), Value::String(event.into()));
        }
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{}", json_terminal_safe(&fields.to_string()));
        let _ = out.flush();
    }

    /// A line for the person (stderr), kept clear of the progress bar.
    pub fn say(&self, line: &str) {
        if self.json || self.quiet {
            return;
        }
        let line = format!("{}{}", self.prefix, escape_lines(line));
        match self.bar.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            // A hidden bar (stderr is not a terminal) would swallow the line.
            Some(b) if !b.is_hidden() => b.println(line),
            _ => eprintln!("{line}"),
        }
    }

    /// An event of a migration as one JSON line (with --json).
    pub fn json(&self, ev: &impl serde::Serialize) {
        if !self.json {
            return;
        }
        match json_line(ev) {
            Ok(line) => {
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "{line}");
                let _ = out.flush();
            }
            Err(e) => tracing::warn!("cannot serialise an event: {e}"),
        }
    }

    /// A progress event as JSON, at most every half second (and always the last one).
    pub fn progress_json(&self, ev: &ferry_migrate::Event) {
        if let Some(p) = ev.progress() {
            let mut last = self.last_progress.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            if last.is_some_and(|t| now - t < Duration::from_millis(500))
                && p.bytes_done < p.bytes_total
            {
                return;
            }
            *last = Some(now);
        }
        self.json(ev);
    }

    /// Progress drawn as a bar on a terminal: bytes, files done, the recent rate and the time
    /// left at that rate. A new phase (scanning, sending) starts a new bar.
    pub fn progress(&self, p: &ProgressView) {
        if self.json || self.quiet {
            return;
        }
        let mut bar = self.bar.lock().unwrap_or_else(|p| p.into_inner());
        let mut state = self.bar_state.lock().unwrap_or_else(|p| p.into_inner());
        if state.0 != Some(p.phase) {
            if let Some(b) = bar.take() {
                b.finish_and_clear();
            }
            *state = (Some(p.phase), None);
        }
        let b = bar.get_or_insert_with(|| {
            let b = ProgressBar::new(p.bytes_total);
            if !std::io::stderr().is_terminal() {
                b.set_draw_target(ProgressDrawTarget::hidden());
            }
            b.set_style(
                ProgressStyle::with_template("{prefix}{bar:30.cyan/blue} {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            b.set_prefix(self.prefix.clone());
            b
        });
        b.set_length(p.bytes_total);
        b.set_position(p.bytes_done);
        if state.1.is_some_and(|d| p.bytes_done <= d) {
            return; // The link is down: the bar says so until bytes move again.
        }
        state.1 = None;
        b.set_message(progress_line(p));
    }

    /// The link is silent or lost: the bar says so until bytes move again.
    pub fn link_down(&self, what: &str) {
        if let Some(b) = self.bar.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            self.bar_state.lock().unwrap_or_else(|p| p.into_inner()).1 = Some(b.position());
            b.set_message(what.to_string());
        }
    }

    /// Removes the progress bar.
    pub fn finish_progress(&self) {
        if let Some(b) = self.bar.lock().unwrap_or_else(|p| p.into_inner()).take() {
            b.finish_and_clear();
        }
        *self.bar_state.lock().unwrap_or_else(|p| p.into_inner()) = (None, None);
    }
}

pub use ferry_migrate::text::{
    escape, escape_lines, human_bytes, json_line, json_terminal_safe, utc_time,
};

/// A writer for log lines (tracing writes each event with one `write_all`): escapes what
/// [`escape_lines`] does, so that peer text logged by any crate cannot drive the terminal.
pub struct EscapingWriter<W>(pub W);

impl<W: Write> Write for EscapingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        self.0.write_all(escape_lines(&text).as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// Parses "64MiB", "2GiB", "500MB", "1000".
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let num: f64 = num.parse().map_err(|_| format!("not a size: {s:?}"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "kib" => 1024.0,
        "m" | "mb" => 1e6,
        "mib" => 1024.0 * 1024.0,
        "g" | "gb" => 1e9,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        other => return Err(format!("unknown size unit {other:?} (use KiB, MiB, GiB)")),
    };
    Ok((num * mult) as u64)
}

/// The words beside the bar: `1.2 GiB/3.4 GiB  1200/5000 files  12.0 MiB/s  ETA 3m`.
fn progress_line(p: &ProgressView) -> String {
    let what = match p.phase {
        Phase::Scanning => "hashed ",
        _ => "",
    };
    let mut line = format!(
        "{what}{}/{}",
        human_bytes(p.bytes_done),
        human_bytes(p.bytes_total)
    );
    match p.files_done {
        Some(d) => line += &format!("  {d}/{} files", p.files_total),
        None => line += &format!("  {} files", p.files_total),
    }
    if let Some(r) = p.rate_bps {
        line += &format!("  {}/s", human_bytes(r));
    }
    if let Some(s) = p.eta_s.filter(|_| p.bytes_done < p.bytes_total) {
        line += &format!("  ETA {}", eta(s as f64));
    }
    line
}

/// A time left for people: `45s`, `12m`, `3h 05m`.
fn eta(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    match s {
        0..=99 => format!("{s}s"),
        100..=5999 => format!("{}m", s.div_ceil(60)),
        _ => format!("{}h {:02}m", s / 3600, s % 3600 / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_lines_are_escaped() {
        let mut w = EscapingWriter(Vec::new());
        w.write_all(b"INFO peer \x1b]0;t\x07 said \xc2\x9b2J\n")
            .unwrap();
        let out = String::from_utf8(w.0).unwrap();
        assert!(!out.chars().any(|c| c.is_control() && c != '\n'), "{out:?}");
        assert!(out.ends_with('\n'));
    }
}
