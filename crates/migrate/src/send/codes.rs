//! The sender's pairing code: on offer while no receiver has connected, issued again after a
//! failed attempt once the endpoint's back-off allows, paused after too many failures.

use ferry_transport::{Endpoint, PairingCode, PairingError, Ticket};

use crate::error::{Cause, Error, ErrorKind};
use crate::event::{Event, WaitingFor};
use crate::handle::Emitter;

/// Keeps a pairing code on offer while no receiver has connected: after a failed attempt it
/// issues a new code once the endpoint's back-off allows, and when pairing is paused (too
/// many failed attempts in a row) it says so and waits for [`crate::Handle::resume_pairing`]
/// (when the caller offers it) or the end of the pause.
pub(crate) struct CodeKeeper {
    /// When to issue the next code.
    pub(crate) reissue: Option<tokio::time::Instant>,
    /// The pause was announced (once per pause): a resume request counts only then.
    pub(crate) pause_said: bool,
    /// The caller can resume a pause (`resume: "enter"` in the event).
    resumable: bool,
    /// The sender announces itself on the local network.
    mdns: bool,
    /// The paired receiver of an unfinished migration this sender waits for.
    pub(crate) waiting_for: Option<WaitingFor>,
}

/// Announces a (new) code: builds its ticket and emits `listening`.
pub(crate) async fn announce(
    ep: &Endpoint,
    code: PairingCode,
    reissued: bool,
    mdns: bool,
    waiting_for: Option<WaitingFor>,
    em: &Emitter,
) -> Result<Ticket, Error> {
    let ticket = ep.ticket(code).map_err(|e| {
        Error::with_cause(
            ErrorKind::Unreachable,
            format!("cannot list this device's addresses: {e}"),
            Some(Cause::Io(e)),
        )
    })?;
    em.emit(Event::Listening {
        addrs: ticket.addrs.clone(),
        code,
        ticket: ticket.clone(),
        device_id: ep.identity().device_id(),
        reissued,
        mdns,
        waiting_for,
    })
    .await;
    Ok(ticket)
}

impl CodeKeeper {
    pub(crate) fn new(resumable: bool, mdns: bool, waiting_for: Option<WaitingFor>) -> Self {
        CodeKeeper {
            reissue: None,
            pause_said: false,
            resumable,
            mdns,
            waiting_for,
        }
    }

    /// After a failed or refused attempt: if the code is gone, schedule the next one (and
    /// announce a back-off or a pause).
    pub(crate) async fn after_failure(&mut self, ep: &Endpoint, em: &Emitter) -> Result<(), Error> {
        if ep.pairing_open() || self.reissue.is_some() {
            return Ok(());
        }
        let gate = ep.pairing_gate();
        if gate.retry_in.is_zero() {
            return self.reissue(ep, em).await;
        }
        self.reissue = Some(tokio::time::Instant::now() + gate.retry_in);
        let secs = gate.retry_in.as_secs_f64().ceil() as u64;
        if gate.paused {
            self.pause(gate.failures, secs, em).await;
        } else {
            em.emit(Event::PairingBackoff {
                failures: gate.failures,
                retry_in_s: secs,
            })
            .await;
        }
        Ok(())
    }

    async fn pause(&mut self, failures: u32, secs: u64, em: &Emitter) {
        if self.pause_said {
            return;
        }
        self.pause_said = true;
        em.emit(Event::PairingPaused {
            failures,
            retry_in_s: secs,
            resume: if self.resumable { "enter" } else { "wait" },
        })
        .await;
    }

    /// Issues and announces a new code, or reschedules when the endpoint still backs off.
    pub(crate) async fn reissue(&mut self, ep: &Endpoint, em: &Emitter) -> Result<(), Error> {
        self.reissue = None;
        match ep.issue_pairing_code() {
            Ok(c) => {
                self.pause_said = false;
                announce(ep, c, true, self.mdns, self.waiting_for.clone(), em).await?;
                Ok(())
            }
            Err(PairingError::Throttled {
                failures,
                paused,
                retry_in,
            }) => {
                self.reissue = Some(tokio::time::Instant::now() + retry_in);
                if paused {
                    self.pause(failures, retry_in.as_secs_f64().ceil() as u64, em)
                        .await;
                }
                Ok(())
            }
            Err(e) => Err(Error::with_cause(
                ErrorKind::Internal,
                e.to_string(),
                Some(Cause::Pairing(e)),
            )),
        }
    }
}
