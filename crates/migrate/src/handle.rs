//! A running migration: its [`Handle`] (stop, cancel, wait) and its [`Events`] stream.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;

use crate::error::{Error, ErrorKind};
use crate::event::Event;

/// Events waiting for the caller; a caller that stops reading holds the migration at its next
/// event (progress is dropped rather than waited for).
pub const EVENT_CAPACITY: usize = 256;
/// Events produced inside a session's synchronous callbacks while the stream was full: a few
/// per round by design (manifest, resumed, verified); this bounds them regardless.
const OVERFLOW_CAPACITY: usize = 1024;

/// The events of one migration, in order. Ends when the migration has ended (after its final
/// event) or when the handle is dropped.
#[derive(Debug)]
pub struct Events {
    rx: mpsc::Receiver<Event>,
}

impl Events {
    /// The next event, or `None` once the migration is over.
    pub async fn next(&mut self) -> Option<Event> {
        self.rx.recv().await
    }

    /// The next event if one is ready.
    pub fn try_next(&mut self) -> Option<Event> {
        self.rx.try_recv().ok()
    }
}

/// Controls shared between a [`Handle`] and its migration.
#[derive(Debug)]
pub(crate) struct Control {
    stop: watch::Sender<bool>,
    pub(crate) cut: Notify,
    pub(crate) resume_pairing: Notify,
}

impl Control {
    pub(crate) fn stop_signal(&self) -> watch::Receiver<bool> {
        self.stop.subscribe()
    }
}

/// A running migration. Dropping the handle leaves it running; [`Handle::cancel`] ends it at
/// once (everything verified stays durable; the same migration started again continues).
#[derive(Debug)]
pub struct Handle<T> {
    control: Arc<Control>,
    task: JoinHandle<Result<T, Error>>,
}

impl<T> Handle<T> {
    /// Stops gracefully, like Ctrl-C: a round the receiver already verified ends the migration
    /// cleanly (`end: stopped`); otherwise it ends with [`Error::Interrupted`] and continues
    /// when started again.
    pub fn stop(&self) {
        let _ = self.control.stop.send(true);
    }

    /// Drops the current connection as a lost link would (demos and tests of resume); the
    /// receiver reconnects and continues.
    pub fn cut_link(&self) {
        self.control.cut.notify_one();
    }

    /// A sender whose pairing is paused after failed attempts issues a new code now (the
    /// person confirmed it was them).
    pub fn resume_pairing(&self) {
        self.control.resume_pairing.notify_one();
    }

    /// Ends the migration at once, without closing anything gracefully (everything verified
    /// and committed stays; the same migration started again continues). [`Handle::wait`]
    /// then returns [`Error::Interrupted`] once the migration's task is gone, and with it the
    /// destination's lock and the network endpoint.
    pub fn cancel(&self) {
        self.task.abort();
    }

    /// Waits for the migration to end: its summary, or why it stopped.
    pub async fn wait(self) -> Result<T, Error> {
        match self.task.await {
            Ok(r) => r,
            Err(e) if e.is_cancelled() => Err(Error::new(
                ErrorKind::Interrupted,
                "the migration was cancelled; everything verified so far is kept: start it again to continue",
            )),
            Err(e) => Err(Error::new(
                ErrorKind::Internal,
                format!("the migration task failed: {e}"),
            )),
        }
    }
}

/// Starts `run` on the current tokio runtime with a fresh control and event stream.
pub(crate) fn spawn<T, F, Fut>(run: F) -> (Handle<T>, Events)
where
    T: Send + 'static,
    F: FnOnce(Emitter, Arc<Control>) -> Fut,
    Fut: std::future::Future<Output = Result<T, Error>> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(EVENT_CAPACITY);
    let (stop, _) = watch::channel(false);
    let control = Arc::new(Control {
        stop,
        cut: Notify::new(),
        resume_pairing: Notify::new(),
    });
    let emitter = Emitter {
        tx,
        overflow: Arc::new(Mutex::new(VecDeque::new())),
    };
    let task = tokio::spawn(run(emitter, Arc::clone(&control)));
    (Handle { control, task }, Events { rx })
}

/// Where a migration sends its events.
#[derive(Clone, Debug)]
pub(crate) struct Emitter {
    tx: mpsc::Sender<Event>,
    /// Events from synchronous callbacks that found the stream full; sent, in order, before
    /// the next event.
    overflow: Arc<Mutex<VecDeque<Event>>>,
}

impl Emitter {
    /// Sends an event, waiting while the stream is full (nobody listening: dropped).
    pub(crate) async fn emit(&self, ev: Event) {
        self.flush().await;
        let _ = self.tx.send(ev).await;
    }

    /// Sends an event from synchronous code: progress is dropped when the stream is full,
    /// anything else waits in the overflow queue for the next [`Emitter::emit`].
    pub(crate) fn emit_now(&self, ev: Event) {
        let mut q = self.overflow.lock().unwrap_or_else(|p| p.into_inner());
        if q.is_empty() {
            if let Err(mpsc::error::TrySendError::Full(ev)) = self.tx.try_send(ev) {
                if ev.progress().is_none() {
                    q.push_back(ev);
                }
            }
        } else if ev.progress().is_none() {
            if q.len() >= OVERFLOW_CAPACITY {
                tracing::warn!("event stream full: an event was dropped");
                return;
            }
            q.push_back(ev);
        }
    }

    /// Waits (at most a second) until the caller has taken every event sent so far: before a
    /// question to the person, so that it comes after the lines that led to it.
    pub(crate) async fn drained(&self) {
        self.flush().await;
        let until = tokio::time::Instant::now() + std::time::Duration::from_secs(1);
        while self.tx.capacity() < self.tx.max_capacity() && tokio::time::Instant::now() < until {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        // The last event taken may still be being shown.
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    /// Sends what waits in the overflow queue.
    pub(crate) async fn flush(&self) {
        loop {
            let next = self
                .overflow
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .pop_front();
            match next {
                Some(ev) => {
                    if self.tx.send(ev).await.is_err() {
                        return;
                    }
                }
                None => return,
            }
        }
    }
}
