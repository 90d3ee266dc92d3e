//! What ferry tells the person (a progress bar and plain lines on stderr) or the script
//! (`--json`: one event object per line on stdout).

use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{json, Value};

/// Event sink shared by the commands.
pub struct Reporter {
    json: bool,
    quiet: bool,
    bar: Mutex<Option<ProgressBar>>,
    last_progress: Mutex<Option<Instant>>,
    prefix: String,
}

impl Reporter {
    pub fn new(json: bool) -> Self {
        Reporter {
            json,
            quiet: false,
            bar: Mutex::new(None),
            last_progress: Mutex::new(None),
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
        let _ = writeln!(out, "{fields}");
        let _ = out.flush();
    }

    /// A line for the person (stderr), kept clear of the progress bar.
    pub fn say(&self, line: &str) {
        if self.json || self.quiet {
            return;
        }
        let line = format!("{}{line}", self.prefix);
        match self.bar.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            Some(b) => b.println(line),
            None => eprintln!("{line}"),
        }
    }

    /// Progress in bytes; throttled for JSON, drawn as a bar on a terminal.
    /// `wire` is the chunk payload received so far by this process (for `--json`).
    pub fn progress(&self, done: u64, total: u64, files_total: u64, wire: u64) {
        if self.json {
            let mut last = self.last_progress.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            if last.is_some_and(|t| now - t < Duration::from_millis(500)) && done < total {
                return;
            }
            *last = Some(now);
            drop(last);
            self.event(
                "progress",
                json!({"bytes_done": done, "bytes_total": total, "wire_bytes": wire}),
            );
            return;
        }
        if self.quiet {
            return;
        }
        let mut bar = self.bar.lock().unwrap_or_else(|p| p.into_inner());
        let b = bar.get_or_insert_with(|| {
            let b = ProgressBar::new(total);
            if !std::io::stderr().is_terminal() {
                b.set_draw_target(ProgressDrawTarget::hidden());
            }
            b.set_style(
                ProgressStyle::with_template(
                    "{prefix}{bar:30.cyan/blue} {bytes}/{total_bytes} {msg} {bytes_per_sec} ETA {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            b.set_prefix(self.prefix.clone());
            b.set_message(format!("{files_total} files"));
            b
        });
        b.set_length(total);
        b.set_position(done);
    }

    /// Removes the progress bar.
    pub fn finish_progress(&self) {
        if let Some(b) = self.bar.lock().unwrap_or_else(|p| p.into_inner()).take() {
            b.finish_and_clear();
        }
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
mod time_tests {
    use super::utc_time;

    #[test]
    fn utc_time_formats_known_instants() {
        assert_eq!(utc_time(0), "1970-01-01 00:00 UTC");
        assert_eq!(utc_time(951_782_400), "2000-02-29 00:00 UTC");
        assert_eq!(utc_time(1_796_312_460), "2026-12-03 15:41 UTC");
    }
}
