//! The etcd arbiter against a real etcd (a fresh single-member one per test, on free ports).
//! etcd must be installed (scripts/deps.sh); FTVM_ALLOW_NO_KVM=1 skips these tests without it.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ftvm_replication::arbiter::{Arbiter, ArbiterSpec};
use ftvm_replication::test_etcd::test_etcd_or_skip;

/// Longer than the 2 s TTL plus etcd's expiry sweep (every 500 ms).
const EXPIRY_WAIT: Duration = Duration::from_secs(6);

fn lost_channel(a: &Arbiter) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    a.on_lost(Box::new(move |why| {
        let _ = tx.send(why);
    }));
    rx
}

#[test]
fn one_holder_at_a_time_kept_past_the_ttl_and_released_on_drop() {
    let Some(etcd) = test_etcd_or_skip() else { return };
    let spec = etcd.spec("ftvm/one-holder");
    let a = Arbiter::acquire(&spec, Duration::ZERO).unwrap().expect("the first side wins");
    assert!(a.valid());
    assert_eq!(a.lost(), None);
    assert_eq!(a.spec(), &spec);
    let lost = lost_channel(&a);

    let start = Instant::now();
    assert!(Arbiter::acquire(&spec, Duration::from_millis(300)).unwrap().is_none(), "a second side loses");
    assert!(start.elapsed() >= Duration::from_millis(300), "it tried for the whole wait");

    // The keepalives hold the lease well past its TTL.
    std::thread::sleep(Duration::from_secs(4));
    assert!(a.valid(), "still valid after 2 TTLs: {:?}", a.lost());
    assert!(Arbiter::acquire(&spec, Duration::ZERO).unwrap().is_none(), "still held");

    drop(a);
    let start = Instant::now();
    let b = Arbiter::acquire(&spec, Duration::from_secs(1)).unwrap().expect("released on drop");
    assert!(start.elapsed() < Duration::from_millis(500), "the drop revoked the lease (no TTL wait)");
    assert!(b.valid());
    assert!(lost.try_recv().is_err(), "a dropped arbiter reports no loss");
}

#[test]
fn a_holder_whose_keepalives_stop_loses_it() {
    let Some(etcd) = test_etcd_or_skip() else { return };
    let spec = etcd.spec("ftvm/paused");
    let a = Arbiter::acquire(&spec, Duration::ZERO).unwrap().expect("the first side wins");
    let lost = lost_channel(&a);
    a.pause_keepalive_for_test();

    let start = Instant::now();
    let b = Arbiter::acquire(&spec, EXPIRY_WAIT).unwrap().expect("the other side wins once the lease expired");
    let waited = start.elapsed();
    assert!(waited >= Duration::from_millis(1500), "won after only {waited:?}: the lease cannot have expired");
    // The first side's deadline passed before etcd could give the key away.
    assert!(!a.valid(), "the paused side must not be live once the other side won");
    assert!(b.valid());

    // Resumed (as after SIGCONT): its first keepalive finds the lease gone.
    a.resume_keepalive_for_test();
    let why = lost.recv_timeout(Duration::from_secs(3)).expect("on_lost ran");
    eprintln!("the paused holder: {why}");
    assert!(why.contains("expired or was revoked"), "{why}");
    assert_eq!(a.lost().as_deref(), Some(why.as_str()));
    assert!(!a.valid(), "lost is forever");
    let (tx, late) = mpsc::channel();
    a.on_lost(Box::new(move |why| tx.send(why).unwrap()));
    assert_eq!(
        late.try_recv().ok().as_deref(),
        Some(why.as_str()),
        "a callback registered after the loss runs at once"
    );
    assert!(b.valid() && b.lost().is_none(), "the winner is unaffected");
    drop(a);
    assert!(b.valid(), "dropping the loser does not free the winner's key");
    assert!(Arbiter::acquire(&spec, Duration::ZERO).unwrap().is_none());
}

#[test]
fn etcd_dying_under_a_holder_loses_it() {
    let Some(mut etcd) = test_etcd_or_skip() else { return };
    let spec = etcd.spec("ftvm/etcd-dies");
    let a = Arbiter::acquire(&spec, Duration::ZERO).unwrap().expect("wins");
    let lost = lost_channel(&a);
    etcd.kill();
    let start = Instant::now();
    while a.valid() {
        assert!(start.elapsed() < Duration::from_secs(3), "still valid {:?} after etcd died", start.elapsed());
        std::thread::sleep(Duration::from_millis(5));
    }
    // At most TTL * 0.9 - 100 ms (1.7 s) after the last keepalive, sent before the kill.
    assert!(start.elapsed() <= Duration::from_secs(2), "valid for {:?} without etcd", start.elapsed());
    let why = lost.recv_timeout(Duration::from_secs(4)).expect("on_lost ran");
    eprintln!("the holder without etcd: {why}");
    assert!(why.contains("unreachable") && why.contains(&etcd.endpoint()), "{why}");
    assert_eq!(a.lost().as_deref(), Some(why.as_str()));
    let start = Instant::now();
    drop(a);
    assert!(start.elapsed() < Duration::from_secs(1), "the drop's revoke is short");
}

#[test]
fn a_key_taken_behind_the_holders_back_loses_it() {
    let Some(etcd) = test_etcd_or_skip() else { return };
    let spec = etcd.spec("ftvm/taken");
    let a = Arbiter::acquire(&spec, Duration::ZERO).unwrap().expect("wins");
    let lost = lost_channel(&a);
    etcd.delete_key("ftvm/taken").unwrap();
    let b = Arbiter::acquire(&spec, Duration::from_secs(2)).unwrap().expect("the key is free");
    let why = lost.recv_timeout(Duration::from_secs(3)).expect("on_lost ran");
    eprintln!("the holder whose key was taken: {why}");
    assert!(why.contains("held by someone else") || why.contains("was deleted"), "{why}");
    assert!(!a.valid());
    assert!(b.valid());
}

#[test]
fn unreachable_etcd_is_a_quick_clear_error() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let spec: ArbiterSpec = format!("etcd://127.0.0.1:{port}/ftvm/nobody").parse().unwrap();
    let start = Instant::now();
    let e = Arbiter::acquire(&spec, Duration::from_secs(10)).expect_err("nothing listens there").to_string();
    eprintln!("unreachable: {e}");
    assert!(start.elapsed() < Duration::from_secs(3), "took {:?}", start.elapsed());
    assert!(e.contains(&format!("http://127.0.0.1:{port}")) && e.contains("unreachable"), "{e}");
}

#[test]
fn not_etcd_is_a_clear_error() {
    // Something that answers, but not etcd's gateway.
    let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = server.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut conn in server.incoming().flatten() {
            use std::io::{Read, Write};
            let mut buf = [0; 4096];
            let _ = conn.read(&mut buf);
            let _ = conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nnot json!");
        }
    });
    let spec: ArbiterSpec = format!("etcd://127.0.0.1:{port}/k").parse().unwrap();
    let e = Arbiter::acquire(&spec, Duration::ZERO).expect_err("not etcd").to_string();
    eprintln!("not etcd: {e}");
    assert!(e.contains("malformed reply") && e.contains("bad JSON"), "{e}");
}

/// The real thing: a holder process SIGSTOPped past its lease never performs an output
/// after the other side went live, and finds the arbiter lost after SIGCONT.
#[test]
fn a_sigstopped_holder_never_outputs_after_the_other_side_went_live() {
    let Some(etcd) = test_etcd_or_skip() else { return };
    let key = "ftvm/sigstop";
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", "sigstop_child", "--nocapture", "--test-threads=1"])
        .env("FTVM_TEST_ETCD_ARBITER", etcd.url(key))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id() as libc::pid_t;
    let (tx, rx) = mpsc::channel::<String>();
    let stdout = child.stdout.take().unwrap();
    let (armed_tx, armed) = mpsc::channel::<()>();
    std::thread::spawn(move || {
        let mut stopped = false;
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            // Stop the child right after it printed an output: it is then in its sleep,
            // not between a valid() check and the output it allows.
            if !stopped && line.starts_with("OUT ") && armed.try_recv().is_ok() {
                // SAFETY: kill(2) on our own child's pid; no memory is involved.
                assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
                stopped = true;
                let _ = tx.send("STOPPED".into());
            }
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let next = |what: &str| loop {
        let line = rx.recv_timeout(Duration::from_secs(20)).unwrap_or_else(|_| panic!("waiting for {what}"));
        if line.starts_with(what) {
            return line;
        }
    };
    next("ACQUIRED");
    next("OUT ");
    armed_tx.send(()).unwrap();
    next("STOPPED");

    let spec = etcd.spec(key);
    let start = Instant::now();
    let live = Arbiter::acquire(&spec, Duration::from_secs(10)).unwrap().expect("the stopped holder's lease expires");
    assert!(start.elapsed() >= Duration::from_millis(1000), "won after {:?}", start.elapsed());
    // Drain what the child wrote before it was stopped, then let it run again.
    std::thread::sleep(Duration::from_millis(200));
    while rx.try_recv().is_ok() {}
    // SAFETY: kill(2) on our own child's pid; no memory is involved.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGCONT) }, 0);

    let lost = loop {
        let line = rx.recv_timeout(Duration::from_secs(10)).expect("the child reports the loss");
        assert!(!line.starts_with("OUT "), "the resumed holder performed an output after the other side went live");
        if let Some(why) = line.strip_prefix("LOST ") {
            break why.to_string();
        }
    };
    eprintln!("the resumed holder: {lost}");
    assert!(lost.contains("expired or was revoked") || lost.contains("held by someone else"), "{lost}");
    let status = child.wait().unwrap();
    assert!(status.success(), "child: {status}");
    assert!(live.valid() && live.lost().is_none());
}

/// The holder process of the SIGSTOP test (run by it; does nothing otherwise).
#[test]
#[ignore = "a helper process of a_sigstopped_holder_never_outputs_after_the_other_side_went_live"]
#[allow(clippy::exit)] // a child process of the test: it ends itself, as the holder it plays would
fn sigstop_child() {
    let Ok(url) = std::env::var("FTVM_TEST_ETCD_ARBITER") else { return };
    let spec: ArbiterSpec = url.parse().unwrap();
    let a = Arbiter::acquire(&spec, Duration::ZERO).unwrap().expect("the child wins first");
    a.on_lost(Box::new(|why| {
        println!("LOST {why}");
        std::process::exit(0);
    }));
    // On its own line: libtest has just written "test sigstop_child ... ".
    println!("\nACQUIRED");
    let start = Instant::now();
    for n in 0.. {
        if a.valid() {
            println!("OUT {n}");
        }
        std::thread::sleep(Duration::from_millis(20));
        if start.elapsed() > Duration::from_secs(30) {
            println!("TIMEOUT");
            std::process::exit(1);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// TLS, authentication, several members.

use ftvm_replication::test_etcd::{enable_test_auth, test_etcd_with_or_skip, TestEtcd, TestEtcdOptions, TestPki};

fn pki() -> TestPki {
    TestPki::new().expect("openssl makes the test certificates")
}

/// `etcds://HOST:PORT/KEY?ca=...&cert=...&key=...` for a member, with the PKI's files.
fn tls_url(etcd: &TestEtcd, pki: &TestPki, key: &str, client: &str, ca: &str) -> String {
    format!(
        "etcds://{}/{key}?ca={}&cert={}&key={}",
        etcd.endpoint(),
        pki.path(&format!("{ca}.pem")).display(),
        pki.path(&format!("{client}.pem")).display(),
        pki.path(&format!("{client}.key")).display()
    )
}

#[test]
fn over_tls_the_lease_is_taken_kept_and_lost() {
    let pki = pki();
    let Some(mut etcd) = test_etcd_with_or_skip(&TestEtcdOptions { tls: Some(&pki), ..Default::default() }) else {
        return;
    };
    let url = tls_url(&etcd[0], &pki, "ftvm/tls", "client", "ca");
    let spec: ArbiterSpec = url.parse().unwrap();
    assert_eq!(spec.to_string().parse::<ArbiterSpec>().unwrap(), spec, "Display round-trips");
    let a = Arbiter::acquire(&spec, Duration::ZERO).unwrap().expect("wins over TLS");
    let lost = lost_channel(&a);
    assert!(Arbiter::acquire(&spec, Duration::from_millis(200)).unwrap().is_none(), "a second side loses");
    std::thread::sleep(Duration::from_secs(4));
    assert!(a.valid(), "kept past 2 TTLs over TLS: {:?}", a.lost());
    etcd[0].kill();
    let why = lost.recv_timeout(Duration::from_secs(5)).expect("lost once etcd is gone");
    eprintln!("over TLS, etcd gone: {why}");
    assert!(!a.valid());
    assert!(why.contains("https://"), "{why}");
}

#[test]
fn a_client_certificate_of_another_ca_is_refused() {
    let pki = pki();
    let Some(etcd) = test_etcd_with_or_skip(&TestEtcdOptions { tls: Some(&pki), ..Default::default() }) else {
        return;
    };
    let spec: ArbiterSpec = tls_url(&etcd[0], &pki, "ftvm/tls", "other-client", "ca").parse().unwrap();
    let e = Arbiter::acquire(&spec, Duration::ZERO).expect_err("etcd refuses the certificate").to_string();
    eprintln!("client certificate of another CA: {e}");
    // The alert (BadCertificate), or a close before it could be read.
    assert!(e.contains("https://") && (e.contains("TLS failed") || e.contains("client certificate")), "{e}");
    // Without a client certificate at all.
    let url = format!("etcds://{}/ftvm/tls?ca={}", etcd[0].endpoint(), pki.path("ca.pem").display());
    let e = Arbiter::acquire(&url.parse().unwrap(), Duration::ZERO).expect_err("no client certificate").to_string();
    eprintln!("no client certificate: {e}");
    assert!(e.contains("TLS failed") || e.contains("client certificate"), "{e}");
}

#[test]
fn a_server_certificate_that_does_not_match_is_refused() {
    let pki = pki();
    let options = TestEtcdOptions { tls: Some(&pki), server_cert: Some("wrong-name"), ..Default::default() };
    let Some(etcd) = test_etcd_with_or_skip(&options) else { return };
    let spec: ArbiterSpec = tls_url(&etcd[0], &pki, "ftvm/tls", "client", "ca").parse().unwrap();
    let e = Arbiter::acquire(&spec, Duration::ZERO).expect_err("the name does not match").to_string();
    eprintln!("server certificate for another name: {e}");
    assert!(e.contains("TLS failed") && e.contains("certificate"), "{e}");
    // A server certificate of a CA we do not trust.
    drop(etcd);
    let Some(etcd) = test_etcd_with_or_skip(&TestEtcdOptions { tls: Some(&pki), ..Default::default() }) else {
        return;
    };
    let spec: ArbiterSpec = tls_url(&etcd[0], &pki, "ftvm/tls", "client", "other-ca").parse().unwrap();
    let e = Arbiter::acquire(&spec, Duration::ZERO).expect_err("an unknown CA").to_string();
    eprintln!("server certificate of an untrusted CA: {e}");
    assert!(e.contains("TLS failed") && e.contains("certificate"), "{e}");
}

#[test]
fn bad_tls_and_auth_parameters_are_clear_errors() {
    let pki = pki();
    let dir = pki.path("");
    std::fs::write(pki.path("garbage.pem"), "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n").unwrap();
    std::fs::write(pki.path("empty-password"), "").unwrap();
    let (ca, cert, key) = (pki.path("ca.pem"), pki.path("client.pem"), pki.path("client.key"));
    let (ca, cert, key) = (ca.display(), cert.display(), key.display());
    let other_key = pki.path("other-client.key");
    let d = dir.display();
    for (url, why) in [
        (format!("etcds://127.0.0.1:2379/k?ca={d}/missing.pem"), "cannot read the CA certificate"),
        (format!("etcds://127.0.0.1:2379/k?ca={d}/client.key"), "no CERTIFICATE"),
        (format!("etcds://127.0.0.1:2379/k?ca={d}/garbage.pem"), "does not parse"),
        (format!("etcds://127.0.0.1:2379/k?ca={ca}&cert={cert}"), "cert= and key= go together"),
        (format!("etcds://127.0.0.1:2379/k?cert={cert}&key={ca}"), "no private key"),
        (format!("etcds://127.0.0.1:2379/k?cert={cert}&key={}", other_key.display()), "do not go together"),
        (format!("etcd://127.0.0.1:2379/k?ca={ca}"), "use etcds://"),
        (format!("etcds://127.0.0.1:2379/k?ca={ca}&cert={cert}&key={key}&colour=blue"), "unknown parameter"),
        ("etcd://127.0.0.1:2379/k?user=root".to_string(), "needs password-file"),
        ("etcd://127.0.0.1:2379/k?user=root&password=x".to_string(), "give password-file"),
        (format!("etcd://127.0.0.1:2379/k?user=root&password-file={d}/nope"), "cannot read the password file"),
        (format!("etcd://127.0.0.1:2379/k?user=root&password-file={d}/empty-password"), "empty"),
        ("etcd://127.0.0.1:2379,/k".to_string(), "missing port"),
        ("etcd://127.0.0.1:2379,h:0/k".to_string(), "bad port"),
    ] {
        let e = url.parse::<ArbiterSpec>().expect_err(&url).to_string();
        assert!(e.contains(why), "{url}: {e:?} does not say {why:?}");
    }
    // A good one, with every parameter and two members.
    std::fs::write(pki.path("password"), "s3cret\n").unwrap();
    let url = format!(
        "etcds://127.0.0.1:2379,[::1]:2380/ftvm/vm1?ttl=3&ca={ca}&cert={cert}&key={key}&user=root&password-file={d}/password"
    );
    let ArbiterSpec::Etcd(spec) = url.parse().unwrap() else { panic!("not etcd") };
    assert_eq!(spec.endpoints.len(), 2);
    assert_eq!(spec.endpoint(), "https://127.0.0.1:2379,https://[::1]:2380");
    assert_eq!(spec.auth.as_ref().map(|a| a.user.as_str()), Some("root"));
    assert!(!format!("{spec:?} {spec}").contains("s3cret"), "the password never shows");
}

#[test]
fn a_wrong_password_is_refused_and_the_right_one_wins() {
    let Some(etcd) = test_etcd_or_skip() else { return };
    enable_test_auth(&etcd, "right-password").unwrap();
    let pki = pki(); // a private directory for the password files
    std::fs::write(pki.path("wrong"), "wrong-password\n").unwrap();
    std::fs::write(pki.path("right"), "right-password\n").unwrap();
    let url = |file: &str| {
        format!("etcd://{}/ftvm/auth?user=root&password-file={}", etcd.endpoint(), pki.path(file).display())
    };
    let e = Arbiter::acquire(&url("wrong").parse().unwrap(), Duration::ZERO).expect_err("wrong password").to_string();
    eprintln!("wrong password: {e}");
    assert!(e.contains("authentication failed"), "{e}");
    let anonymous = etcd.url("ftvm/auth");
    let e = Arbiter::acquire(&anonymous.parse().unwrap(), Duration::ZERO).expect_err("no user").to_string();
    eprintln!("no user: {e}");
    assert!(e.contains("request refused"), "{e}");
    let a = Arbiter::acquire(&url("right").parse().unwrap(), Duration::ZERO).unwrap().expect("wins with the password");
    std::thread::sleep(Duration::from_secs(3));
    assert!(a.valid(), "kept with a token: {:?}", a.lost());
}

/// Three members (a quorum survives one), authentication on: the member in use is killed,
/// the keepalives go to the next one (which wants a token of its own), and the lease holds.
#[test]
fn the_lease_survives_the_member_in_use_dying() {
    let Some(mut etcd) = test_etcd_with_or_skip(&TestEtcdOptions { members: 3, ..Default::default() }) else {
        return;
    };
    enable_test_auth(&etcd[0], "pw").unwrap();
    let pki = pki();
    std::fs::write(pki.path("password"), "pw\n").unwrap();
    let members: Vec<String> = etcd.iter().map(TestEtcd::endpoint).collect();
    let url = format!(
        "etcd://{}/ftvm/members?ttl=3&user=root&password-file={}",
        members.join(","),
        pki.path("password").display()
    );
    let spec: ArbiterSpec = url.parse().unwrap();
    let a = Arbiter::acquire(&spec, Duration::ZERO).unwrap().expect("wins");
    let lost = lost_channel(&a);
    std::thread::sleep(Duration::from_secs(1));
    etcd[0].kill(); // the first endpoint: the one in use
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(8) {
        assert!(a.valid(), "lost after the member in use died: {:?}", a.lost());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(lost.try_recv().is_err());
    assert!(Arbiter::acquire(&spec, Duration::ZERO).unwrap().is_none(), "still held, seen through the others");
    drop(a);
    assert!(Arbiter::acquire(&spec, Duration::from_secs(2)).unwrap().is_some(), "released through the others");
}
