//! Rates for `progress` events: bytes over a recent window, so that bytes already present at
//! a resume, or a time without a link, never count as speed.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ferry_sync::proto::SendEvent;
use ferry_sync::scan::ScanProgress;

use crate::event::{Basis, Event, Phase, ScanningInfo, SendingInfo};

/// Least time between two progress events of the sender.
pub(crate) const SENDER_EVERY: Duration = Duration::from_millis(250);

/// A rate over the last [`Rate::WINDOW`] of samples of a growing count.
#[derive(Debug, Default)]
pub(crate) struct Rate {
    samples: VecDeque<(Instant, u64)>,
}

impl Rate {
    const WINDOW: Duration = Duration::from_secs(5);
    /// Least span of samples before a rate is given.
    const MIN_SPAN: Duration = Duration::from_secs(1);
    /// Most samples kept (callers sample a few times a second).
    const MAX_SAMPLES: usize = 256;

    /// Notes the count `v` at `now`. While the count has not moved since the first sample,
    /// the window starts at the latest one: the rate counts from when bytes move again.
    pub(crate) fn add(&mut self, now: Instant, v: u64) {
        if let [(t, first)] = self.samples.make_contiguous() {
            if *first >= v {
                *t = now;
                *first = v;
                return;
            }
        }
        self.samples.push_back((now, v));
        while self.samples.len() > 2
            && (self.samples.len() > Self::MAX_SAMPLES
                || self
                    .samples
                    .front()
                    .is_some_and(|(t, _)| now.duration_since(*t) > Self::WINDOW))
        {
            self.samples.pop_front();
        }
    }

    /// Per second, once the samples span a second.
    pub(crate) fn per_sec(&self) -> Option<u64> {
        let ((t0, v0), (t1, v1)) = (self.samples.front()?, self.samples.back()?);
        let secs = t1.duration_since(*t0);
        (secs >= Self::MIN_SPAN)
            .then(|| (v1.saturating_sub(*v0) as f64 / secs.as_secs_f64()) as u64)
    }

    /// Starts again (a new connection, a silent link).
    pub(crate) fn reset(&mut self) {
        self.samples.clear();
    }
}

/// Seconds to move `left` bytes at `rate` bytes per second (none without a rate).
pub(crate) fn eta(left: u64, rate: Option<u64>) -> Option<u64> {
    rate.filter(|&r| r > 0).map(|r| left.div_ceil(r))
}

/// The scan's counters as an event (`finished`: the scan is over, all is hashed).
pub(crate) fn scanning(p: &ScanProgress, rate: &mut Rate, finished: bool) -> Event {
    let listed = p.listed.load(Ordering::Relaxed);
    let bytes_done = p.bytes_hashed.load(Ordering::Relaxed);
    rate.add(Instant::now(), bytes_done);
    Event::Scanning(ScanningInfo {
        phase: Phase::Scanning,
        files_done: if listed {
            p.files_done.load(Ordering::Relaxed)
        } else {
            0
        },
        files_total: p.files_found.load(Ordering::Relaxed),
        bytes_done,
        // A database is hashed from its snapshot, whose size may differ from the live file's.
        bytes_total: if finished {
            bytes_done
        } else {
            p.bytes_to_hash.load(Ordering::Relaxed).max(bytes_done)
        },
        rate_bps: rate.per_sec(),
    })
}

/// A sender's round as `progress` events (see [`SendingInfo`] for what they count).
#[derive(Debug)]
pub(crate) struct Sending {
    round: u32,
    bytes_total: u64,
    files_total: u64,
    /// Bytes the receiver did not ask for, once its want list is complete.
    base: Option<u64>,
    /// What `bytes_done` counts: the receiver's durable reports when it sends them.
    basis: Basis,
    /// The receiver's latest durable report (clamped and monotonic in the machine).
    durable: u64,
    raw: u64,
    wire: u64,
    done: u64,
    rate: Rate,
    last: Option<Instant>,
}

impl Sending {
    pub(crate) fn new(round: u32, bytes_total: u64, files_total: u64) -> Self {
        Sending {
            round,
            bytes_total,
            files_total,
            base: None,
            basis: Basis::Sent,
            durable: 0,
            raw: 0,
            wire: 0,
            done: 0,
            rate: Rate::default(),
            last: None,
        }
    }

    /// The event to emit after `ev`, if one is due.
    pub(crate) fn on(&mut self, ev: &SendEvent) -> Option<Event> {
        let now = Instant::now();
        match ev {
            SendEvent::Wanted {
                bytes,
                reports_durable,
                ..
            } => {
                self.base = Some(self.bytes_total.saturating_sub(*bytes));
                if *reports_durable {
                    self.basis = Basis::Verified;
                }
            }
            SendEvent::Sent {
                raw_bytes,
                wire_bytes,
            } => {
                (self.raw, self.wire) = (*raw_bytes, *wire_bytes);
                if self.base.is_none() || self.last.is_some_and(|t| now - t < SENDER_EVERY) {
                    return None;
                }
            }
            // A few a second at most (the receiver paces them): each is shown.
            SendEvent::Durable { bytes } => self.durable = *bytes,
            // The receiver verified the whole round.
            SendEvent::Done { .. } => {
                self.base = Some(self.bytes_total);
                self.durable = self.bytes_total;
            }
            _ => return None,
        }
        let base = self.base?;
        self.last = Some(now);
        let done = match self.basis {
            Basis::Verified => self.durable,
            Basis::Sent => base.saturating_add(self.raw),
        }
        .min(self.bytes_total);
        self.done = self.done.max(done);
        self.rate.add(now, self.wire);
        let rate_bps = self.rate.per_sec();
        Some(Event::Sending(SendingInfo {
            phase: Phase::Sending,
            round: self.round,
            bytes_done: self.done,
            bytes_total: self.bytes_total,
            wire_bytes: self.wire,
            files_total: self.files_total,
            rate_bps,
            eta_s: eta(self.bytes_total - self.done, rate_bps),
            basis: self.basis,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn present_bytes_and_silence_are_not_speed() {
        let t = Instant::now();
        let s = |ms| t + Duration::from_millis(ms);
        let mut r = Rate::default();
        // A resume: 1 GiB already here, then 1 MB/s.
        r.add(s(0), 1 << 30);
        r.add(s(500), (1 << 30) + 500_000);
        assert_eq!(r.per_sec(), None);
        r.add(s(2000), (1 << 30) + 2_000_000);
        assert_eq!(r.per_sec(), Some(1_000_000));
        // A stall: reset, then the count stands still for a while before moving again.
        r.reset();
        r.add(s(3000), (1 << 30) + 2_000_000);
        r.add(s(9000), (1 << 30) + 2_000_000);
        r.add(s(10000), (1 << 30) + 4_000_000);
        assert_eq!(r.per_sec(), Some(2_000_000));
        // The window forgets old samples.
        for i in 1..=20u64 {
            r.add(s(10000 + i * 500), (1 << 30) + 4_000_000 + i * 50_000);
        }
        assert_eq!(r.per_sec(), Some(100_000));
        assert_eq!(eta(1_000_000, r.per_sec()), Some(10));
    }

    fn sending(e: Option<Event>) -> Option<(u64, Basis)> {
        match e? {
            Event::Sending(s) => Some((s.bytes_done, s.basis)),
            _ => None,
        }
    }

    #[test]
    fn a_version_3_receiver_is_believed_and_an_older_one_is_estimated() {
        let sent = |raw_bytes| SendEvent::Sent {
            raw_bytes,
            wire_bytes: raw_bytes,
        };
        // Version 3: the receiver's durable reports, not what was handed to the link.
        let mut s = Sending::new(1, 1000, 3);
        assert_eq!(sending(s.on(&sent(10))), None, "before the want list");
        let wanted = |reports_durable| SendEvent::Wanted {
            chunks: 2,
            bytes: 800,
            reports_durable,
        };
        assert_eq!(sending(s.on(&wanted(true))), Some((0, Basis::Verified)));
        let d = |bytes| SendEvent::Durable { bytes };
        assert_eq!(sending(s.on(&d(200))), Some((200, Basis::Verified)));
        assert_eq!(sending(s.on(&d(450))), Some((450, Basis::Verified)));
        let done = SendEvent::Done {
            root: ferry_sync::manifest::ChunkHash([0; 32]),
        };
        assert_eq!(sending(s.on(&done)), Some((1000, Basis::Verified)));
        // An older receiver: what it did not want plus what was handed to the link.
        let mut s = Sending::new(1, 1000, 3);
        assert_eq!(sending(s.on(&sent(500))), None, "before the want list");
        assert_eq!(sending(s.on(&wanted(false))), Some((700, Basis::Sent)));
        assert_eq!(sending(s.on(&done)), Some((1000, Basis::Sent)));
    }
}
