//! `ferry verify`, `ferry peers`, `ferry doctor`, `ferry pair`.

use std::time::Duration;

use ferry_sync::store::verify_dest;
use ferry_transport::{doctor, AcceptError, DoctorConfig, MdnsConfig, MdnsSelfTest};
use serde_json::json;

use crate::args;
use crate::cli::{DoctorFlags, PairFlags, PeersFlags, VerifyFlags};
use crate::output::{self, escape, escape_lines, human_bytes, Reporter};
use ferry_migrate::{Error, ErrorKind};

pub async fn verify(f: VerifyFlags) -> Result<(), Error> {
    let rep = Reporter::new(f.json);
    let dir = f.dir.clone();
    let r = tokio::task::spawn_blocking(move || verify_dest(&dir))
        .await
        .map_err(|e| Error::new(ErrorKind::Internal, e.to_string()))??;
    rep.event(
        "verify",
        json!({"root": r.root.to_hex(), "files": r.files, "bytes": r.bytes, "ok": r.mismatched.is_empty(), "mismatched": r.mismatched, "omitted": r.omitted}),
    );
    if r.mismatched.is_empty() {
        rep.say(&format!(
            "ok: {} files, {} match the receipt (root {})",
            r.files,
            human_bytes(r.bytes),
            r.root.to_hex()
        ));
        if !r.omitted.is_empty() {
            let shown = ferry_migrate::text::escape_list(&r.omitted, 50);
            rep.say(&format!("absent by design (this file system cannot hold symlinks; named when received): {shown}"));
        }
        Ok(())
    } else {
        for p in r.mismatched.iter().take(50) {
            rep.say(&format!("MISMATCH {}", escape(p)));
        }
        Err(Error::new(
            ErrorKind::Integrity,
            format!(
                "{} of {} entries in {} do not match the receipt; receive again into the same folder to repair them",
                r.mismatched.len(),
                r.files,
                f.dir.display()
            ),
        ))
    }
}

pub async fn peers(f: PeersFlags) -> Result<(), Error> {
    let rep = Reporter::new(f.json);
    let dirs = ferry_migrate::dirs_from_env()?;
    let store = ferry_migrate::peer_store(&dirs)?;
    if let Some(which) = f.forget {
        let p = ferry_migrate::find_peer(&store, &which)?;
        // Takes effect at once in running senders and receivers: they read the list again
        // before admitting or connecting to anyone.
        store
            .forget(&p.device_id)
            .map_err(|e| Error::new(ErrorKind::Internal, e.to_string()))?;
        rep.event(
            "forgot",
            json!({"device_id": p.device_id.to_string(), "name": p.name}),
        );
        rep.say(&format!("forgot {} ({})", escape(&p.name), p.device_id));
        return Ok(());
    }
    let list = store.load().map_err(|e| {
        Error::new(
            ErrorKind::Internal,
            format!("cannot read the paired-devices list: {e}"),
        )
    })?;
    for p in &list {
        let addrs: Vec<String> = p.last_addrs.iter().map(|a| a.to_string()).collect();
        let role = p.role.map(|r| r.as_str());
        rep.event("peer", json!({"device_id": p.device_id.to_string(), "name": p.name, "addrs": addrs, "paired_at": p.paired_at,
            "role": role, "last_used": p.last_used_at()}));
        if !rep.is_json() {
            println!(
                "{}\t{}\t{}\t{}\tlast used {}",
                escape(&p.name),
                p.device_id,
                addrs.join(","),
                role.unwrap_or("unknown role (pair again)"),
                output::utc_time(p.last_used_at())
            );
        }
    }
    if list.is_empty() {
        rep.say("no paired devices");
    }
    Ok(())
}

pub async fn doctor_cmd(f: DoctorFlags) -> Result<(), Error> {
    let rep = Reporter::new(f.json);
    let cfg = DoctorConfig {
        mdns: (!f.no_multicast_test).then(MdnsConfig::default),
        ..DoctorConfig::default()
    };
    let report = tokio::task::spawn_blocking(move || doctor(&cfg))
        .await
        .map_err(|e| Error::new(ErrorKind::Internal, e.to_string()))?;
    for i in &report.interfaces {
        let addrs: Vec<String> = i.addrs.iter().map(|a| a.to_string()).collect();
        rep.event("interface", json!({"name": i.name, "addrs": addrs, "up": i.up, "loopback": i.loopback, "multicast": i.multicast}));
        if !rep.is_json() {
            println!(
                "{:<12} {:<5} {:<9} multicast:{:<5} {}",
                i.name,
                if i.up { "up" } else { "down" },
                if i.loopback { "loopback" } else { "" },
                i.multicast.map_or("?".to_string(), |m| m.to_string()),
                addrs.join(" ")
            );
        }
    }
    rep.event("mdns", json!({"self_test": format!("{:?}", report.mdns)}));
    if !rep.is_json() {
        let said = match &report.mdns {
            MdnsSelfTest::Skipped => "not run".to_string(),
            MdnsSelfTest::SawItself => {
                "works (this device's own announcement came back)".to_string()
            }
            MdnsSelfTest::NotSeen => {
                "blocked (this device's own announcement did not come back)".to_string()
            }
            MdnsSelfTest::Failed(e) => format!("could not run ({})", escape(e)),
            _ => "gave no answer this version of ferry can name".to_string(),
        };
        println!("mDNS self-test: {said}");
    }
    for a in &report.advice {
        rep.event("advice", json!({"text": a}));
        if !rep.is_json() {
            println!("- {}", escape_lines(a));
        }
    }
    Ok(())
}

pub async fn pair(f: PairFlags) -> Result<(), Error> {
    let rep = Reporter::new(f.json);
    let dirs = ferry_migrate::dirs_from_env()?;
    let listen = f
        .listen
        .as_deref()
        .map(args::parse_addr)
        .transpose()?
        .and_then(|v| v.first().copied());
    let mut stdin_taken = false;
    // FERRY_TICKET only when no address is given either.
    let ticket_env = f.connect.is_none().then_some("FERRY_TICKET");
    let ticket = args::ticket_arg(f.ticket.as_deref(), ticket_env, &mut stdin_taken)?;
    let ep = ferry_migrate::open_endpoint(&dirs, f.name.as_deref(), listen)?;
    let conn = if let Some(t) = &ticket {
        ep.connect_ticket(t)
            .await
            .map_err(|e| Error::new(ErrorKind::Pairing, format!("pairing failed: {e}")))?
    } else if let Some(addr) = &f.connect {
        let addrs = args::parse_addr(addr)?;
        let code = match args::code_arg(f.code.as_deref(), Some("FERRY_CODE"), &mut stdin_taken)? {
            Some(c) => c,
            None => args::prompt_code(addr)?,
        };
        ep.connect_with_code(&addrs, code)
            .await
            .map_err(|e| Error::new(ErrorKind::Pairing, format!("pairing failed: {e}")))?
    } else {
        // Waiting: a code of our own choosing is never taken from FERRY_CODE.
        let code = match args::code_arg(f.code.as_deref(), None, &mut stdin_taken)? {
            Some(c) => {
                rep.say("warning: a chosen pairing code is weaker than a random one; prefer the default");
                ep.set_pairing_code(c)
                    .map_err(|e| Error::new(ErrorKind::Internal, e.to_string()))?;
                c
            }
            None => ep
                .issue_pairing_code()
                .map_err(|e| Error::new(ErrorKind::Internal, e.to_string()))?,
        };
        let ticket = ep
            .ticket(code)
            .map_err(|e| Error::new(ErrorKind::Internal, e.to_string()))?;
        let addrs: Vec<String> = ticket.addrs.iter().map(|a| a.to_string()).collect();
        rep.event(
            "listening",
            json!({"addrs": addrs, "code": code.to_string(), "ticket": ticket.to_string()}),
        );
        rep.say(&format!(
            "pairing code: {code}\nticket: {ticket}\nlistening on {}\nthe ticket carries the code: show it only to the other device until it has paired",
            addrs.join(", ")
        ));
        loop {
            match ep.accept().await {
                Ok(c) => break c,
                Err(AcceptError::Pairing { addr, source }) => {
                    return Err(Error::new(ErrorKind::Pairing, format!("pairing with {addr} failed: {source}; run `ferry pair` again for a new code")));
                }
                Err(AcceptError::EndpointClosed) => {
                    return Err(Error::new(ErrorKind::Internal, "endpoint closed"))
                }
                Err(e) => tracing::info!("refused: {e}"),
            }
        }
    };
    let p = conn.peer().clone();
    rep.event(
        "paired",
        json!({"peer": p.name, "device_id": p.device_id.to_string(), "addr": p.addr.to_string(),
            "paired_at": p.paired_at, "role": p.role.as_str()}),
    );
    // The device that showed the code is the one that will send (as with `ferry send`).
    rep.say(&format!(
        "paired with {} ({}); later migrations {} that device need no code (until {} days unused)",
        escape(&p.name),
        p.device_id,
        match p.role {
            ferry_transport::PeerRole::Receiver => "from this device to",
            ferry_transport::PeerRole::Sender => "to this device from",
        },
        ferry_transport::DEFAULT_PAIRING_TTL.as_secs() / 86_400
    ));
    // Both sides stored the other's key before either got here (the confirmed ending of
    // pairing: `connect_*` returns once the waiting side's QUIC stack has acknowledged the last
    // message, which it reads even after this close), so either may close at once.
    conn.close(ferry_transport::close::COMPLETE, b"paired");
    let _ = tokio::time::timeout(Duration::from_millis(500), conn.closed()).await;
    ep.close(ferry_transport::close::DONE, b"done").await;
    Ok(())
}
