//! A throwaway single-member etcd for tests (this crate's and others'): fresh ports and data
//! directory; killed and removed on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::arbiter::ArbiterSpec;
use crate::etcd::{Client, EtcdSpec};

/// A running test etcd.
pub struct TestEtcd {
    child: Option<Child>,
    dir: PathBuf,
    port: u16,
    /// The address it serves on (127.0.0.1, or one in a network namespace).
    host: String,
}

impl TestEtcd {
    /// `HOST:PORT`, its client address.
    pub fn endpoint(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// An etcd arbiter on this etcd (default TTL).
    pub fn spec(&self, key: &str) -> ArbiterSpec {
        ArbiterSpec::Etcd(self.etcd_spec(key))
    }

    pub fn etcd_spec(&self, key: &str) -> EtcdSpec {
        EtcdSpec::plain(&self.host, self.port, key)
    }

    /// `etcd://HOST:PORT/KEY`, for a command line.
    pub fn url(&self, key: &str) -> String {
        self.etcd_spec(key).to_string()
    }

    /// Deletes a key behind its holder's back.
    pub fn delete_key(&self, key: &str) -> std::io::Result<()> {
        Client::new(&self.etcd_spec(key), Duration::from_secs(2))
            .map_err(std::io::Error::other)?
            .delete(key.as_bytes())
            .map_err(|e| std::io::Error::other(e.to_string()))
    }

    /// Kills etcd now (the data directory goes on drop): it becomes unreachable.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The directory holding the data and `etcd.log`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for TestEtcd {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The etcd binary: /usr/bin/etcd, or `etcd` on the PATH.
pub fn etcd_binary() -> Option<PathBuf> {
    let usr = PathBuf::from("/usr/bin/etcd");
    if usr.is_file() {
        return Some(usr);
    }
    std::env::split_paths(&std::env::var_os("PATH")?).map(|d| d.join("etcd")).find(|p| p.is_file())
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// `etcd` (the command so far) as a one-member cluster with its data in `dir`, serving
/// clients on `client` and peers on `peer` (URLs).
fn single_member(mut etcd: Command, dir: &Path, client: &str, peer: &str) -> Command {
    etcd.arg("--name=default")
        .arg(format!("--data-dir={}", dir.join("data").display()))
        .arg(format!("--listen-client-urls={client}"))
        .arg(format!("--advertise-client-urls={client}"))
        .arg(format!("--listen-peer-urls={peer}"))
        .arg(format!("--initial-advertise-peer-urls={peer}"))
        .arg(format!("--initial-cluster=default={peer}"))
        .stdin(Stdio::null());
    etcd
}

/// Starts an etcd and waits until it serves requests. `NotFound` if etcd is not installed.
pub fn start_test_etcd() -> std::io::Result<TestEtcd> {
    let Some(bin) = etcd_binary() else {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "etcd is not installed (no /usr/bin/etcd, none on the PATH): run scripts/deps.sh",
        ));
    };
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let mut last_err = None;
    // Ports are picked free, then given to etcd: another process may take one in between.
    for _ in 0..3 {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("ftvm-test-etcd-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let (client, peer) = (free_port()?, free_port()?);
        let log = std::fs::File::create(dir.join("etcd.log"))?;
        let c = format!("http://127.0.0.1:{client}");
        let p = format!("http://127.0.0.1:{peer}");
        let child = single_member(Command::new(&bin), &dir, &c, &p)
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| std::io::Error::new(e.kind(), format!("cannot start {}: {e}", bin.display())))?;
        let mut etcd = TestEtcd { child: Some(child), dir, port: client, host: "127.0.0.1".into() };
        match wait_ready(&mut etcd) {
            Ok(()) => return Ok(etcd),
            Err(e) => last_err = Some(e),
        }
    }
    Err(last_err.unwrap_or_else(|| std::io::Error::other("etcd did not start")))
}

/// Starts an etcd inside network namespace `netns`, serving on `ip` (an address of that
/// namespace), for tests whose sides run in other namespaces that reach it. This process
/// cannot reach it: it waits for etcd's log to say it serves.
pub fn start_test_etcd_in_netns(netns: &str, ip: &str) -> std::io::Result<TestEtcd> {
    let Some(bin) = etcd_binary() else {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "etcd is not installed (no /usr/bin/etcd, none on the PATH): run scripts/deps.sh",
        ));
    };
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!("ftvm-test-etcd-ns-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    // A fresh namespace has every port free.
    let (client, peer) = (2379, 2380);
    let log = std::fs::File::create(dir.join("etcd.log"))?;
    let c = format!("http://{ip}:{client}");
    let p = format!("http://{ip}:{peer}");
    let mut in_netns = Command::new("ip");
    in_netns.args(["netns", "exec", netns]).arg(&bin);
    let child = single_member(in_netns, &dir, &c, &p)
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot start {} in {netns}: {e}", bin.display())))?;
    let mut etcd = TestEtcd { child: Some(child), dir, port: client, host: ip.into() };
    let start = Instant::now();
    loop {
        let log = std::fs::read_to_string(etcd.dir.join("etcd.log")).unwrap_or_default();
        if log.contains("ready to serve client requests") {
            return Ok(etcd);
        }
        let exited = etcd.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
        if exited.is_some() || start.elapsed() > Duration::from_secs(30) {
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            return Err(std::io::Error::other(format!(
                "test etcd in {netns} did not start; its log ends:\n{}",
                tail.join("\n")
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Certificates made for a test with openssl: a CA (`ca.pem`), a server certificate for
/// 127.0.0.1 (`server.pem`, `server.key`), a client certificate (`client.pem`,
/// `client.key`); another CA (`other-ca.pem`) with its own client certificate
/// (`other-client.pem`, `other-client.key`); and a server certificate of the first CA
/// for another name only (`wrong-name.pem`, `wrong-name.key`: DNS other.invalid, IP 127.0.0.2).
pub struct TestPki {
    dir: PathBuf,
}

impl TestPki {
    pub fn new() -> std::io::Result<TestPki> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("ftvm-test-pki-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let pki = TestPki { dir };
        pki.ca("ca")?;
        pki.ca("other-ca")?;
        pki.leaf("ca", "server", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth")?;
        pki.leaf("ca", "client", "extendedKeyUsage=clientAuth")?;
        pki.leaf("other-ca", "other-client", "extendedKeyUsage=clientAuth")?;
        pki.leaf("ca", "wrong-name", "subjectAltName=IP:127.0.0.2,DNS:other.invalid\nextendedKeyUsage=serverAuth")?;
        Ok(pki)
    }

    /// A file of the PKI, e.g. `ca.pem`.
    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    fn openssl(&self, args: &[&str]) -> std::io::Result<()> {
        let out =
            Command::new("openssl").args(args).current_dir(&self.dir).stdin(Stdio::null()).output().map_err(|e| {
                std::io::Error::new(e.kind(), format!("cannot run openssl (apt-get install openssl): {e}"))
            })?;
        if !out.status.success() {
            return Err(std::io::Error::other(format!(
                "openssl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        Ok(())
    }

    fn ca(&self, name: &str) -> std::io::Result<()> {
        let (key, pem, subject) = (format!("{name}.key"), format!("{name}.pem"), format!("/CN=ftvm test {name}"));
        self.openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &pem,
            "-days",
            "2",
            "-subj",
            &subject,
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ])
    }

    fn leaf(&self, ca: &str, name: &str, extensions: &str) -> std::io::Result<()> {
        let (key, csr, pem, ext) =
            (format!("{name}.key"), format!("{name}.csr"), format!("{name}.pem"), format!("{name}.ext"));
        std::fs::write(
            self.dir.join(&ext),
            format!("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n{extensions}\n"),
        )?;
        let subject = format!("/CN=ftvm test {name}");
        self.openssl(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            &subject,
        ])?;
        let (ca_pem, ca_key) = (format!("{ca}.pem"), format!("{ca}.key"));
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca_pem,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-out",
            &pem,
            "-days",
            "2",
            "-extfile",
            &ext,
        ])
    }
}

impl Drop for TestPki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// How to start the etcd of a test: its members, and TLS for the clients.
#[derive(Default)]
pub struct TestEtcdOptions<'a> {
    /// 0 or 1: one member.
    pub members: usize,
    /// Serve clients on https with this PKI's CA, requiring client certificates.
    pub tls: Option<&'a TestPki>,
    /// The PKI's certificate to serve with (`server` unless given, e.g. `wrong-name`).
    pub server_cert: Option<&'a str>,
}

/// Starts an etcd cluster of `options.members` on loopback ports (client URLs https with
/// `options.tls`: `--client-cert-auth`) and waits until each member says it serves.
pub fn start_test_etcd_with(options: &TestEtcdOptions<'_>) -> std::io::Result<Vec<TestEtcd>> {
    let Some(bin) = etcd_binary() else {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "etcd is not installed (no /usr/bin/etcd, none on the PATH): run scripts/deps.sh",
        ));
    };
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let members = options.members.max(1);
    let scheme = if options.tls.is_some() { "https" } else { "http" };
    let mut ports = Vec::new();
    for _ in 0..members {
        ports.push((free_port()?, free_port()?));
    }
    let cluster: Vec<String> =
        ports.iter().enumerate().map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}")).collect();
    let mut started = Vec::new();
    for (i, (client, peer)) in ports.iter().enumerate() {
        let dir = std::env::temp_dir().join(format!("ftvm-test-etcd-{}-c{n}-m{i}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let log = std::fs::File::create(dir.join("etcd.log"))?;
        let c = format!("{scheme}://127.0.0.1:{client}");
        let p = format!("http://127.0.0.1:{peer}");
        let mut command = Command::new(&bin);
        command
            .arg(format!("--name=m{i}"))
            .arg(format!("--data-dir={}", dir.join("data").display()))
            .arg(format!("--listen-client-urls={c}"))
            .arg(format!("--advertise-client-urls={c}"))
            .arg(format!("--listen-peer-urls={p}"))
            .arg(format!("--initial-advertise-peer-urls={p}"))
            .arg(format!("--initial-cluster={}", cluster.join(",")))
            .arg(format!("--initial-cluster-token=ftvm-test-{}-{n}", std::process::id()))
            .arg("--initial-cluster-state=new")
            .arg("--heartbeat-interval=50")
            .arg("--election-timeout=500");
        if let Some(pki) = options.tls {
            let cert = options.server_cert.unwrap_or("server");
            command
                .arg(format!("--cert-file={}", pki.path(&format!("{cert}.pem")).display()))
                .arg(format!("--key-file={}", pki.path(&format!("{cert}.key")).display()))
                .arg(format!("--trusted-ca-file={}", pki.path("ca.pem").display()))
                .arg("--client-cert-auth");
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| std::io::Error::new(e.kind(), format!("cannot start {}: {e}", bin.display())))?;
        started.push(TestEtcd { child: Some(child), dir, port: *client, host: "127.0.0.1".into() });
    }
    for etcd in &mut started {
        wait_log_ready(etcd)?;
    }
    Ok(started)
}

/// Waits for an etcd's log to say it serves clients.
fn wait_log_ready(etcd: &mut TestEtcd) -> std::io::Result<()> {
    let start = Instant::now();
    loop {
        let log = std::fs::read_to_string(etcd.dir.join("etcd.log")).unwrap_or_default();
        if log.contains("ready to serve client requests") {
            return Ok(());
        }
        let exited = etcd.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
        if exited.is_some() || start.elapsed() > Duration::from_secs(30) {
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            return Err(std::io::Error::other(format!(
                "test etcd on port {} did not start; its log ends:\n{}",
                etcd.port,
                tail.join("\n")
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// [`start_test_etcd_with`], or `None` (after printing "SKIPPED") when etcd (or openssl,
/// for TLS) is not installed and FTVM_ALLOW_NO_KVM=1. Panics otherwise.
pub fn test_etcd_with_or_skip(options: &TestEtcdOptions<'_>) -> Option<Vec<TestEtcd>> {
    match start_test_etcd_with(options) {
        Ok(etcd) => Some(etcd),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && etcd_binary().is_none() => {
            if std::env::var("FTVM_ALLOW_NO_KVM").as_deref() == Ok("1") {
                eprintln!("SKIPPED: etcd is not installed and FTVM_ALLOW_NO_KVM=1");
                return None;
            }
            panic!("{e} (set FTVM_ALLOW_NO_KVM=1 to skip the etcd tests)");
        }
        Err(e) => panic!("cannot start a test etcd: {e}"),
    }
}

/// Turns on etcd's authentication with a `root` user whose password is `password`,
/// through the gateway of a plain (http) test etcd.
pub fn enable_test_auth(etcd: &TestEtcd, password: &str) -> std::io::Result<()> {
    let client = Client::new(&etcd.etcd_spec("unused"), Duration::from_secs(2)).map_err(std::io::Error::other)?;
    let steps = [
        ("/v3/auth/role/add", serde_json::json!({ "name": "root" })),
        ("/v3/auth/user/add", serde_json::json!({ "name": "root", "password": password })),
        ("/v3/auth/user/grant", serde_json::json!({ "user": "root", "role": "root" })),
        ("/v3/auth/enable", serde_json::json!({})),
    ];
    for (path, body) in steps {
        client.call(path, &body).map_err(|e| std::io::Error::other(e.to_string()))?;
    }
    Ok(())
}

fn wait_ready(etcd: &mut TestEtcd) -> std::io::Result<()> {
    let client = Client::new(&etcd.etcd_spec("ftvm-test-etcd-ready"), Duration::from_millis(500))
        .map_err(std::io::Error::other)?;
    let start = Instant::now();
    loop {
        if client.range(b"ftvm-test-etcd-ready").is_ok() {
            return Ok(());
        }
        let exited = etcd.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
        if exited.is_some() || start.elapsed() > Duration::from_secs(30) {
            let log = std::fs::read_to_string(etcd.dir.join("etcd.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            let what = match exited {
                Some(status) => format!("exited ({status})"),
                None => "did not answer within 30 s".into(),
            };
            return Err(std::io::Error::other(format!("test etcd {what}; its log ends:\n{}", tail.join("\n"))));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// For tests: a started etcd, or `None` (after printing "SKIPPED") when etcd is not
/// installed and FTVM_ALLOW_NO_KVM=1. Panics otherwise, saying to run scripts/deps.sh.
pub fn test_etcd_or_skip() -> Option<TestEtcd> {
    match start_test_etcd() {
        Ok(etcd) => Some(etcd),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && etcd_binary().is_none() => {
            if std::env::var("FTVM_ALLOW_NO_KVM").as_deref() == Ok("1") {
                eprintln!("SKIPPED: etcd is not installed and FTVM_ALLOW_NO_KVM=1");
                return None;
            }
            panic!("{e} (set FTVM_ALLOW_NO_KVM=1 to skip the etcd tests)");
        }
        Err(e) => panic!("cannot start a test etcd: {e}"),
    }
}
