//! A hostile sender over real QUIC (ferry-transport endpoints on loopback, paired with a code)
//! against the real receiver session (`ferry::session::receive`, driver, FsStore): frame lengths
//! past the maximum on the control stream and on a data stream, and a data stream cut inside a
//! frame. Each fails with its specific error and the receiver tells the sender why; then an honest
//! sender on a new connection completes the same DEST byte-identically.

use std::fs;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use ferry_migrate::session;
use ferry_sync::compress::CompressPolicy;
use ferry_sync::driver::DriveError;
use ferry_sync::proto::frame::{
    decode_frame, encode_hello, encode_message, Frame, FrameError, Hello, Message, Role,
    PROTOCOL_VERSION,
};
use ferry_sync::proto::{CloseCode, SessionError};
use ferry_sync::scan::{scan, ScanConfig};
use ferry_sync::source::Source;
use ferry_sync::store::{verify_dest, FsStore};
use ferry_testkit::assert_trees_equal;
use ferry_transport::{
    Endpoint, EndpointConfig, Identity, PeerConnection, PeerStore, RecvStream, SendStream,
};

const T: Duration = Duration::from_secs(20);

fn endpoint(name: &str) -> Endpoint {
    let cfg = EndpointConfig {
        bind: "127.0.0.1:0".parse().unwrap(),
        handshake_timeout: Duration::from_secs(5),
        ..EndpointConfig::default()
    };
    Endpoint::bind(
        Identity::generate(name).unwrap(),
        PeerStore::in_memory(),
        cfg,
    )
    .unwrap()
}

fn addr(ep: &Endpoint) -> SocketAddr {
    ep.local_addr().unwrap()
}

fn history(root: &Path) {
    fs::create_dir_all(root.join("media")).unwrap();
    fs::write(root.join("msg.db"), "hello again\n".repeat(40_000)).unwrap();
    let mut x = 7u64;
    let photo: Vec<u8> = (0..600_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    fs::write(root.join("media/photo.jpg"), photo).unwrap();
}

/// Reads the control stream until the receiver's Close frame; returns its code.
async fn close_code_from(recv: &mut RecvStream) -> Option<CloseCode> {
    let mut buf = BytesMut::new();
    loop {
        while let Ok(Some(f)) = decode_frame(&mut buf) {
            if let Frame::Message(Message::Close { code, .. }) = f {
                return CloseCode::from_u16(code);
            }
        }
        let mut chunk = [0u8; 4096];
        match recv.read(&mut chunk).await {
            Ok(Some(n)) => buf.extend_from_slice(&chunk[..n]),
            _ => return None,
        }
    }
}

async fn hello(send: &mut SendStream) {
    let h = encode_hello(&Hello {
        version: PROTOCOL_VERSION,
        role: Role::Sender,
    });
    send.write_all(&h).await.unwrap();
}

/// One hostile session: `attack` plays the sender on the connection; the real receiver runs
/// against `dest`. Returns the receiver's error and the close code the sender was sent.
async fn hostile_session<F, Fut>(
    sconn: PeerConnection,
    cconn: &PeerConnection,
    dest: &Path,
    attack: F,
) -> (DriveError, Option<CloseCode>)
where
    F: FnOnce(PeerConnection, SendStream, RecvStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Option<CloseCode>> + Send,
{
    let attacker = tokio::spawn(async move {
        let (send, recv) = sconn.accept_bi().await.unwrap();
        attack(sconn, send, recv).await
    });
    let store = Arc::new(FsStore::open(dest).unwrap());
    let r = tokio::time::timeout(T, session::receive(cconn, Arc::clone(&store), |_| {}))
        .await
        .expect("the receiver hung on a hostile sender");
    let code = tokio::time::timeout(T, attacker).await.unwrap().unwrap();
    (r.expect_err("the hostile session succeeded"), code)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_sender_over_quic_then_honest_sender_completes() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, dest) = (tmp.path().join("src"), tmp.path().join("dest"));
    history(&src);
    let manifest = Arc::new(scan(&src, None, &ScanConfig::default()).unwrap().manifest);
    let entries: Vec<_> = (0..manifest.entries().len())
        .map(|i| manifest.wire_entry(i).unwrap())
        .collect();
    let summary = *manifest.summary();

    let old = endpoint("old phone");
    let new = endpoint("new phone");
    let code = old.issue_pairing_code().unwrap();
    let to = [addr(&old)];
    let (s, c) = tokio::join!(old.accept(), new.connect_with_code(&to, code));
    let (sconn, cconn) = (s.unwrap(), c.unwrap());

    // 1. A 4 GiB frame length on the control stream, right after the hello.
    let (e, code) = hostile_session(sconn, &cconn, &dest, |_c, mut send, mut recv| async move {
        hello(&mut send).await;
        send.write_all(&u32::MAX.to_le_bytes()).await.unwrap();
        close_code_from(&mut recv).await
    })
    .await;
    assert!(
        matches!(
            e,
            DriveError::Session(SessionError::Frame(FrameError::TooLarge(_)))
        ),
        "{e:?}"
    );
    assert_eq!(code, Some(CloseCode::ProtocolViolation));

    // 2. The honest manifest, then a data stream announcing a 4 GiB frame.
    let reconnect = || async {
        let (s, c) = tokio::join!(
            old.accept(),
            new.connect_peer(old.identity().device_id(), &to)
        );
        (s.unwrap(), c.unwrap())
    };
    let (sconn, cconn) = reconnect().await;
    let (e2, m2) = (entries.clone(), summary);
    let (e, code) = hostile_session(
        sconn,
        &cconn,
        &dest,
        move |c, mut send, mut recv| async move {
            hello(&mut send).await;
            send.write_all(&encode_message(&Message::Manifest(e2)).unwrap())
                .await
                .unwrap();
            send.write_all(&encode_message(&Message::ManifestEnd(m2)).unwrap())
                .await
                .unwrap();
            let mut data = c.open_uni().await.unwrap();
            data.write_all(&(u32::MAX - 1).to_le_bytes()).await.unwrap();
            data.write_all(&[2u8; 64]).await.unwrap();
            close_code_from(&mut recv).await
        },
    )
    .await;
    assert!(
        matches!(
            e,
            DriveError::Session(SessionError::Frame(FrameError::TooLarge(_)))
        ),
        "{e:?}"
    );
    assert_eq!(code, Some(CloseCode::ProtocolViolation));

    // 3. A data stream that ends inside a chunk frame: the link is treated as lost (retryable).
    let (sconn, cconn) = reconnect().await;
    let (e2, m2) = (entries.clone(), summary);
    let (e, _) = hostile_session(
        sconn,
        &cconn,
        &dest,
        move |c, mut send, mut recv| async move {
            hello(&mut send).await;
            send.write_all(&encode_message(&Message::Manifest(e2)).unwrap())
                .await
                .unwrap();
            send.write_all(&encode_message(&Message::ManifestEnd(m2)).unwrap())
                .await
                .unwrap();
            let mut data = c.open_uni().await.unwrap();
            data.write_all(&1000u32.to_le_bytes()).await.unwrap();
            data.write_all(&[2u8, 0, 0, 0, 0, 0]).await.unwrap();
            data.finish().unwrap();
            // Hold the control stream open until the receiver gives up on the connection.
            let _ = recv.read_to_end(1 << 20).await;
            None
        },
    )
    .await;
    assert!(
        matches!(&e, DriveError::LinkLost(m) if m.contains("inside a frame")),
        "{e:?}"
    );
    assert!(e.is_retryable());

    // The honest sender then completes the same DEST.
    let (sconn, cconn) = reconnect().await;
    let source = Arc::new(Source::new(
        &src,
        Arc::clone(&manifest),
        CompressPolicy::default(),
    ));
    let m = Arc::clone(&manifest);
    let server = tokio::spawn(async move { session::serve(&sconn, m, source, |_| {}).await.0 });
    let store = Arc::new(FsStore::open(&dest).unwrap());
    let done = tokio::time::timeout(T, session::receive(&cconn, store, |_| {}))
        .await
        .unwrap()
        .unwrap();
    let done = done.summary().copied().expect("a completed round");
    assert_eq!(done.root, manifest.root());
    tokio::time::timeout(T, server)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_trees_equal(&src, &dest).unwrap();
    let report = verify_dest(&dest).unwrap();
    assert!(report.mismatched.is_empty());
    // Nothing beside src and dest appeared in the parent directory.
    let mut names: Vec<_> = fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    assert_eq!(names, ["dest", "src"]);
}

/// Issue 14, finding 2, through the binaries: while two floods of QUIC Initials carrying a
/// truncated ClientHello run against `ferry send` (100/s from 127.0.0.2 that never answers,
/// 100/s from 127.0.0.3 that echoes Retry tokens: 5× the rate that locked receivers out), a
/// receiver with the code pairs, and later the same receiver reconnects by pinned key, each
/// within 3 s of starting, and both migrations complete.
#[test]
fn receivers_pair_and_reconnect_through_a_flood_of_truncated_initials() {
    use crate::util::{shared_history, start_sender, tempdir, Device, LONG};
    use ferry_testkit::quic_flood::InitialFlood;
    use std::time::Instant;

    let flood = |addr: &str| {
        let target: SocketAddr = addr.parse().unwrap();
        (
            InitialFlood::start(target, "127.0.0.2".parse().unwrap(), 100, false).unwrap(),
            InitialFlood::start(target, "127.0.0.3".parse().unwrap(), 100, true).unwrap(),
        )
    };
    let src = shared_history(8, 3);
    let (old, new) = (Device::new("old"), Device::new("new"));
    let work = tempdir("dest");

    for (round, code) in [("code", true), ("pinned", false)] {
        let (mut s, addr, c) = start_sender(&old, src, "127.0.0.1:0");
        let (blind, echo) = flood(&addr);
        // Without the defences, 3 s of this holds every pending-handshake slot.
        std::thread::sleep(Duration::from_secs(3));
        let t0 = Instant::now();
        let dest = work.path().join(round);
        let mut r = new.receive(&dest, &addr, code.then_some(c.as_str()), &[]);
        let paired = r.wait_event("paired", LONG);
        let took = t0.elapsed();
        let (blind, echo) = (blind.stop().unwrap(), echo.stop().unwrap());
        eprintln!("{round}: connected {took:?} after start; blind {blind:?}; echo {echo:?}");
        assert_eq!(paired["newly_paired"], code, "{paired}");
        assert!(took < Duration::from_secs(3), "{round}: took {took:?}");
        assert!(blind.retries > 0 && echo.retried_initials > 0);
        let recv_done = r.wait_event("done", LONG);
        r.expect_exit(0, LONG);
        let send_done = s.wait_event("done", LONG);
        s.expect_exit(0, LONG);
        assert_eq!(recv_done["root"], send_done["root"]);
        ferry_testkit::assert_histories_equal(src, &dest).unwrap();
    }
}
