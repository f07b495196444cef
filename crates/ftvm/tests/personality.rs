//! System calls of the Linux personality (guests/linux) checked against Linux itself: the
//! same static C program runs natively on this host and in the guest under `ftvm run`, and
//! the lines it prints must be the same. What it exercises: epoll's order (descriptors come
//! back in the order they became ready; a level-triggered one goes behind the others),
//! EPOLLET, EPOLLONESHOT and epoll_ctl's errors; eventfd; sendfile; socketpair; chmod and chown.
//! And more unmodified servers after Redis: nginx (scripts/fetch-nginx.sh), serving curl
//! over the namespaced network, recorded and replayed exactly; a Go HTTP server (Go's own
//! runtime and net/http); and a VM with more memory than the kit once mapped (1 GiB), which
//! found no initramfs then.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const PROGRAM: &str = r#"
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/sendfile.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

static int ep;

/* One epoll_wait: the data (a letter) of each descriptor it lists, in its order. */
/* One epoll_wait: the events of the one descriptor it lists (masked to what we look at). */
static void events_of(const char *what) {
    struct epoll_event out[4];
    int n = epoll_wait(ep, out, 4, 0);
    unsigned mask = n == 1 ? out[0].events & (EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLHUP | EPOLLERR) : 0;
    printf("T %s: %d ready, events %#x\n", what, n, mask);
}

static void wait_for(const char *what, int max) {
    struct epoll_event out[16];
    int n = epoll_wait(ep, out, max, 0);
    printf("T %s:", what);
    for (int i = 0; i < n; i++) printf(" %c", (char)out[i].data.u32);
    printf("\n");
}

static void add(int fd, char name, uint32_t events) {
    struct epoll_event ev = {.events = events, .data.u32 = (uint32_t)name};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) != 0) printf("T add %c: errno %d\n", name, errno);
}

static const char *err(long r) {
    static char buf[32];
    if (r >= 0) snprintf(buf, sizeof buf, "%ld", r);
    else snprintf(buf, sizeof buf, "errno %d", errno);
    return buf;
}

int main(int argc, char **argv) {
    const char *dir = argc > 1 ? argv[1] : "/data";
    int a[2], b[2], c[2], d[2], e[2];
    char byte;
    pipe(a); pipe(b); pipe(c); pipe(d); pipe(e);
    ep = epoll_create1(0);
    add(a[0], 'a', EPOLLIN);
    add(b[0], 'b', EPOLLIN);
    add(c[0], 'c', EPOLLIN);
    wait_for("none ready", 16);
    /* Ready in the order c, a, b: not descriptor order. */
    write(c[1], "x", 1); write(a[1], "x", 1); write(b[1], "x", 1);
    wait_for("in arrival order", 16);
    wait_for("two of them", 2);
    wait_for("the rest first", 16);
    read(a[0], &byte, 1);
    wait_for("a read dry", 16);
    write(a[1], "x", 1);
    wait_for("a again, at the back", 16);
    /* Edge-triggered: once per write. */
    write(d[1], "x", 1);
    add(d[0], 'd', EPOLLIN | EPOLLET);
    read(a[0], &byte, 1); read(b[0], &byte, 1); read(c[0], &byte, 1);
    wait_for("edge, added ready", 16);
    wait_for("edge, nothing new", 16);
    write(d[1], "x", 1);
    wait_for("edge, written again", 16);
    /* One-shot: disabled until EPOLL_CTL_MOD. */
    write(e[1], "x", 1);
    add(e[0], 'e', EPOLLIN | EPOLLONESHOT);
    wait_for("one-shot", 16);
    write(e[1], "x", 1);
    wait_for("one-shot, fired", 16);
    struct epoll_event ev = {.events = EPOLLIN | EPOLLONESHOT, .data.u32 = 'e'};
    printf("T mod: %s\n", err(epoll_ctl(ep, EPOLL_CTL_MOD, e[0], &ev)));
    wait_for("one-shot, armed again", 16);
    /* epoll_ctl's errors. */
    printf("T add twice: %s\n", err(epoll_ctl(ep, EPOLL_CTL_ADD, a[0], &ev)));
    printf("T mod unknown: %s\n", err(epoll_ctl(ep, EPOLL_CTL_MOD, 100, &ev)));
    int spare[2];
    pipe(spare);
    printf("T mod not added: %s\n", err(epoll_ctl(ep, EPOLL_CTL_MOD, spare[0], &ev)));
    printf("T del not added: %s\n", err(epoll_ctl(ep, EPOLL_CTL_DEL, spare[0], &ev)));
    printf("T add itself: %s\n", err(epoll_ctl(ep, EPOLL_CTL_ADD, ep, &ev)));
    char path[256];
    snprintf(path, sizeof path, "%s/file", dir);
    int f = open(path, O_CREAT | O_RDWR | O_TRUNC, 0644);
    printf("T add a file: %s\n", err(epoll_ctl(ep, EPOLL_CTL_ADD, f, &ev)));
    /* eventfd. */
    uint64_t v;
    int efd = eventfd(3, EFD_NONBLOCK);
    printf("T eventfd read: %s", err(read(efd, &v, 8)));
    printf(" value %llu\n", (unsigned long long)v);
    printf("T eventfd empty: %s\n", err(read(efd, &v, 8)));
    v = 2; write(efd, &v, 8);
    v = 5; write(efd, &v, 8);
    v = 0;
    read(efd, &v, 8);
    printf("T eventfd sum: %llu\n", (unsigned long long)v);
    printf("T eventfd short read: %s\n", err(read(efd, &v, 4)));
    v = UINT64_MAX;
    printf("T eventfd max write: %s\n", err(write(efd, &v, 8)));
    add(efd, 'f', EPOLLIN | EPOLLOUT);
    wait_for("eventfd writable", 16);
    int sem = eventfd(2, EFD_SEMAPHORE | EFD_NONBLOCK);
    for (int i = 0; i < 3; i++) {
        v = 0;
        long r = read(sem, &v, 8);
        printf("T semaphore read: %s value %llu\n", err(r), (unsigned long long)v);
    }
    /* sendfile: from a file, at an offset or its position. */
    const char *text = "hello sendfile world";
    write(f, text, strlen(text));
    lseek(f, 0, SEEK_SET);
    int p[2];
    pipe(p);
    off_t off = 6;
    printf("T sendfile at 6: %s", err(sendfile(p[1], f, &off, 8)));
    char got[64] = {0};
    read(p[0], got, sizeof got - 1);
    printf(" '%s' offset %ld position %ld\n", got, (long)off, (long)lseek(f, 0, SEEK_CUR));
    printf("T sendfile at the position: %s", err(sendfile(p[1], f, 0, 5)));
    memset(got, 0, sizeof got);
    read(p[0], got, sizeof got - 1);
    printf(" '%s' position %ld\n", got, (long)lseek(f, 0, SEEK_CUR));
    off = 100;
    printf("T sendfile past the end: %s\n", err(sendfile(p[1], f, &off, 5)));
    printf("T sendfile from a pipe: %s\n", err(sendfile(p[1], a[0], 0, 5)));
    /* socketpair: both ways, shutdown, close. */
    signal(SIGPIPE, SIG_IGN);
    int sv[2];
    printf("T socketpair: %s\n", err(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, sv)));
    int spare_pair[2];
    printf("T socketpair inet: %s\n", err(socketpair(AF_INET, SOCK_STREAM, 0, spare_pair)));
    write(sv[0], "ping", 4);
    memset(got, 0, sizeof got);
    printf("T pair read: %s", err(read(sv[1], got, sizeof got - 1)));
    printf(" '%s'\n", got);
    write(sv[1], "pong", 4);
    memset(got, 0, sizeof got);
    printf("T pair read back: %s", err(read(sv[0], got, sizeof got - 1)));
    printf(" '%s'\n", got);
    printf("T pair empty: %s\n", err(read(sv[0], got, 1)));
    for (int fd = 0; fd < 40; fd++) epoll_ctl(ep, EPOLL_CTL_DEL, fd, &ev);
    add(sv[1], 's', EPOLLIN | EPOLLOUT | EPOLLRDHUP);
    events_of("pair idle");
    shutdown(sv[0], SHUT_WR);
    events_of("pair, peer shut writing");
    printf("T pair read at the end: %s\n", err(read(sv[1], got, 1)));
    printf("T pair write to a reader: %s\n", err(write(sv[1], "x", 1)));
    shutdown(sv[1], SHUT_WR);
    printf("T pair write after shutdown: %s\n", err(write(sv[1], "x", 1)));
    close(sv[0]);
    events_of("pair, peer closed");
    /* chmod and chown. */
    struct stat st;
    chmod(path, 0640);
    stat(path, &st);
    printf("T chmod: %o\n", st.st_mode & 07777);
    fchmod(f, 0600);
    fstat(f, &st);
    printf("T fchmod: %o regular %d\n", st.st_mode & 07777, S_ISREG(st.st_mode));
    chown(path, 1000, 1001);
    stat(path, &st);
    printf("T chown: %u %u\n", st.st_uid, st.st_gid);
    fchown(f, -1, 50);
    fstat(f, &st);
    printf("T fchown group only: %u %u\n", st.st_uid, st.st_gid);
    snprintf(path, sizeof path, "%s/missing", dir);
    printf("T chmod missing: %s\n", err(chmod(path, 0600)));
    printf("T chown missing: %s\n", err(chown(path, 0, 0)));
    /* A fork handshake (Redis's diskless replication): the child writes into one pipe, then
     * waits on another until the parent, having read the first, closes it. Until then the
     * parent cannot see the child end. */
    int data[2], gate[2];
    pipe(data); pipe(gate);
    fflush(stdout); /* the personality says a line of its own when the child ends */
    pid_t child = fork();
    if (child == 0) {
        close(data[0]); close(gate[1]);
        write(data[1], "rdb", 3);
        close(data[1]);
        char c;
        long n = read(gate[0], &c, 1);
        _exit(n == 0 ? 7 : 8);
    }
    close(data[1]); close(gate[0]);
    int status = -1;
    printf("T child not yet ended: %s\n", err(waitpid(child, &status, WNOHANG)));
    char rdb[8] = {0};
    long n = read(data[0], rdb, sizeof rdb - 1);
    long end = read(data[0], rdb + 4, 1);
    printf("T parent read %ld %s, then %ld\n", n, rdb, end);
    printf("T still not ended: %s\n", err(waitpid(-1, &status, WNOHANG)));
    close(gate[1]);
    /* Linux leaves the status word alone when WNOHANG finds no child ended. */
    printf("T status untouched: %d\n", status);
    int ended = waitpid(child, &status, 0) == child;
    printf("T ended: %d, status %d\n", ended, WEXITSTATUS(status));
    printf("T no more children: %s\n", err(waitpid(-1, &status, WNOHANG)));
    /* mmap's address: a free hint is taken; MAP_FIXED_NOREPLACE refuses a mapped range. */
    size_t mib = 1 << 20;
    char *spot = mmap(0, mib, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    munmap(spot, mib);
    char *hinted = mmap(spot, mib, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    printf("T hint taken: %d\n", hinted == spot);
    void *again = mmap(spot + 4096, 4096, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
    printf("T noreplace over a mapping: %s\n", again == MAP_FAILED ? err(-1) : "mapped");
    munmap(hinted, mib);
    again = mmap(spot, 4096, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
    printf("T noreplace where free: %d\n", again == spot);
    /* A PROT_NONE reservation made accessible reads as zero, after its memory held data. */
    munmap(spot, 4096);
    char *used = mmap(spot, mib, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
    memset(used, 0x5a, mib);
    munmap(used, mib);
    char *reserved = mmap(spot, mib, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
    mprotect(reserved + 8192, 8192, PROT_READ | PROT_WRITE);
    printf("T reservation made accessible: %d %d\n", reserved[8192], reserved[16383]);
    char *committed = mmap(reserved + 65536, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
    printf("T reservation mapped over: %d\n", committed[100]);
    return 0;
}
"#;

/// The program's own lines (`T ...`) in `text`.
fn program_lines(text: &str) -> Vec<String> {
    text.lines().filter_map(|l| l.strip_prefix("T ")).map(str::to_string).collect()
}

fn native_lines(binary: &Path, dir: &Path) -> Vec<String> {
    let data = dir.join("native-data");
    std::fs::create_dir_all(&data).unwrap();
    let out = Command::new(binary).arg(&data).output().unwrap();
    assert!(out.status.success(), "natively: {out:?}");
    program_lines(&String::from_utf8_lossy(&out.stdout))
}

#[test]
fn epoll_eventfd_sendfile_and_chmod_answer_as_linux_does() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("personality-syscalls");
    let archive = c_program(&dir, "calls", PROGRAM);
    let native = native_lines(&dir.join("calls"), &dir);
    assert!(native.len() > 30, "the program ran natively: {native:?}");
    let kernel = repo_root().join("target").join("guests").join("redis.elf");
    assert!(kernel.exists(), "{} is missing: `cargo xtask guests`", kernel.display());
    let (out, console) = run_guest(
        &kernel,
        &["--mem", "1G", "--rng", "--initrd", &archive.display().to_string(), "--cmdline=init=/calls -- /data"],
        &dir,
    );
    assert_eq!(out.status.code(), Some(0), "{console}");
    assert!(!console.contains("unsupported system call"), "{console}");
    let guest = program_lines(&console);
    for (n, (g, l)) in guest.iter().zip(&native).enumerate() {
        assert_eq!(g, l, "line {n}: the guest printed {g:?}, Linux {l:?}\nguest:\n{console}");
    }
    assert_eq!(guest.len(), native.len(), "{console}");
    // Spot checks that the comparison compares what it should.
    assert!(guest.contains(&"in arrival order: c a b".to_string()), "{guest:?}");
    assert!(guest.contains(&"a again, at the back: b c a".to_string()), "{guest:?}");
}

fn personality() -> PathBuf {
    let kernel = repo_root().join("target").join("guests").join("redis.elf");
    assert!(kernel.exists(), "{} is missing: scripts/fetch-redis.sh, then `cargo xtask guests`", kernel.display());
    kernel
}

fn nginx_image() -> (PathBuf, PathBuf) {
    let guests = repo_root().join("target").join("guests");
    let cpio = guests.join("nginx.cpio");
    assert!(
        cpio.exists(),
        "{} is missing: build nginx with scripts/fetch-nginx.sh, then `cargo xtask guests`",
        cpio.display()
    );
    (cpio, guests.join("nginx-html"))
}

/// curl from the client namespace: (HTTP status, body) of each URL, over one connection
/// (keep-alive) when several are given.
fn curl(net: &Topology, urls: &[&str], dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut cmd = net.cmd("c", "curl");
    cmd.args(["-s", "--max-time", "30"]);
    let mut bodies = Vec::new();
    for (i, url) in urls.iter().enumerate() {
        let body = dir.join(format!("body{i}"));
        cmd.arg("-o").arg(&body).args(["-w", "%{http_code} %{num_connects}\\n"]).arg(url);
        bodies.push(body);
    }
    let out = cmd.output().expect("curl is missing (scripts/deps.sh installs it)");
    assert!(out.status.success(), "curl {urls:?}: {out:?}");
    let lines = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut connects = 0;
    let mut got = Vec::new();
    for (line, body) in lines.lines().zip(&bodies) {
        let mut words = line.split_whitespace();
        let code = words.next().unwrap_or_default().to_string();
        connects += words.next().and_then(|w| w.parse::<u32>().ok()).unwrap_or(0);
        got.push((code, std::fs::read(body).unwrap_or_default()));
    }
    assert_eq!(got.len(), urls.len(), "{lines}");
    assert_eq!(connects, 1, "one connection for all of {urls:?}: {lines}");
    got
}

fn wait_http(net: &Topology, console: &Path) {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(60) {
        let out = net
            .cmd("c", "curl")
            .args(["-s", "-o", "/dev/null", "--max-time", "1", "http://10.0.0.2/"])
            .output()
            .unwrap();
        if out.status.success() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("nginx never answered:\n{}", std::fs::read_to_string(console).unwrap_or_default());
}

#[test]
fn nginx_serves_curl_and_its_recording_replays_exactly() {
    if !kvm_available() {
        return;
    }
    let (cpio, html) = nginx_image();
    let dir = scratch("nginx");
    let net = Topology::up("ngx", 1);
    let console = dir.join("console.txt");
    let log = dir.join("nginx.log");
    let disk = dir.join("data.img");
    std::fs::File::create(&disk).unwrap().set_len(64 << 20).unwrap();
    let vm = net
        .cmd("h1", env!("CARGO_BIN_EXE_ftvm"))
        .args(["record", "--log"])
        .arg(&log)
        .arg("--kernel")
        .arg(personality())
        .arg("--initrd")
        .arg(&cpio)
        .arg("--disk")
        .arg(&disk)
        .args(["--mem", "1G", "--cmdline", "ip=10.0.0.2/24", "--net", "tap=tap0", "--rng"])
        .arg("--console")
        .arg(format!("file:{}", console.display()))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_http(&net, &console);
    let index = std::fs::read(html.join("index.html")).unwrap();
    let big = std::fs::read(html.join("big.bin")).unwrap();
    // Three requests on one keep-alive connection: a page, 1 MiB (sendfile), a 404.
    let got = curl(&net, &["http://10.0.0.2/", "http://10.0.0.2/big.bin", "http://10.0.0.2/missing"], &dir);
    assert_eq!(got[0], ("200".to_string(), index.clone()));
    assert_eq!(got[1].0, "200");
    assert!(got[1].1 == big, "big.bin: {} bytes back of {}, not the same", got[1].1.len(), big.len());
    assert_eq!(got[2].0, "404");
    // Twenty clients at once, each on its own connection, the large file each time.
    let clients: Vec<_> = (0..20)
        .map(|i| {
            let out = dir.join(format!("parallel{i}"));
            let child = net
                .cmd("c", "curl")
                .args(["-s", "--max-time", "60", "-o"])
                .arg(&out)
                .args(["-w", "%{http_code}", "http://10.0.0.2/big.bin"])
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            (child, out)
        })
        .collect();
    for (child, out) in clients {
        let status = child.wait_with_output().unwrap();
        assert_eq!(String::from_utf8_lossy(&status.stdout), "200");
        assert!(std::fs::read(&out).unwrap() == big, "a parallel download differs");
    }
    let text = std::fs::read_to_string(&console).unwrap();
    assert!(!text.contains("unsupported system call"), "{text}");
    assert!(text.contains("cpuid/rdtsc/rdtscp/rdrand/rdseed sites into emulations"), "{text}");
    // SIGTERM: nginx exits on it (its fast shutdown), the guest powers off, the log ends.
    let recorded = stop_with_sigterm(vm, &console);
    drop(net);
    assert!(recorded.contains("exiting"), "{recorded}");
    replays_exactly(&log, &dir.join("replay"), &recorded);
}

#[test]
fn the_personality_uses_memory_above_one_gib_and_finds_its_initramfs_there() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("personality-mem");
    let archive = c_program(&dir, "calls", PROGRAM);
    // The loader puts the initramfs at the top of the RAM below the 3 GiB hole: above 1 GiB
    // here, where the kit once mapped nothing (it said "no initramfs").
    let (out, console) = run_guest(
        &personality(),
        &["--mem", "2G", "--rng", "--initrd", &archive.display().to_string(), "--cmdline=init=/calls -- /data"],
        &dir,
    );
    assert_eq!(out.status.code(), Some(0), "{console}");
    assert!(console.contains("in arrival order: c a b"), "{console}");
    // "... N MiB for the program's mmap above its window, M MiB heap for the personality":
    // with only 1 GiB mapped, N + M was at most ~760.
    let line = console.lines().find(|l| l.contains("heap for the personality")).unwrap_or_default();
    let mib = |suffix: &str| -> u64 {
        line.split(", ").find_map(|part| part.strip_suffix(suffix)).and_then(|n| n.trim().parse().ok()).unwrap_or(0)
    };
    let total = mib(" MiB for the program's mmap above its window") + mib(" MiB heap for the personality");
    assert!(total > 1500, "the memory past the program's window reaches past 1 GiB: {line}");
}

/// A Go HTTP server (the standard library's net/http): Go's runtime runs CPUID and RDTSC
/// (rewritten into emulations), threads of its own, edge-triggered epoll, a signal thread,
/// and reserves 512 MiB of address space at start (a VM of 2 GiB).
const GO_SERVER: &str = r#"package main

import (
	"fmt"
	"net/http"
	"os"
	"os/signal"
	"sync/atomic"
	"syscall"
)

func main() {
	var hits int64
	http.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "hit %d\n", atomic.AddInt64(&hits, 1))
	})
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM)
	go func() {
		<-stop
		fmt.Printf("go: SIGTERM after %d hits\n", atomic.LoadInt64(&hits))
		os.Exit(0)
	}()
	fmt.Println("go: listening on :8080")
	if err := http.ListenAndServe(":8080", nil); err != nil {
		fmt.Println("go:", err)
		os.Exit(1)
	}
}
"#;

/// Builds `GO_SERVER` with Debian's Go (golang-go), static (no cgo), in `dir`.
fn go_server(dir: &Path) -> PathBuf {
    std::fs::write(dir.join("main.go"), GO_SERVER).unwrap();
    std::fs::write(dir.join("go.mod"), "module gohttp\n\ngo 1.19\n").unwrap();
    let binary = dir.join("gohttp");
    let cache = repo_root().join("target").join("go-cache");
    let out = Command::new("go")
        .current_dir(dir)
        .args(["build", "-tags", "netgo", "-o"])
        .arg(&binary)
        .env("CGO_ENABLED", "0")
        .env("GOCACHE", &cache)
        .env("GOPATH", cache.join("gopath"))
        .env("GOFLAGS", "-mod=mod")
        .output()
        .expect("go is missing: install Debian's golang-go (scripts/deps.sh does)");
    assert!(out.status.success(), "go build: {}", String::from_utf8_lossy(&out.stderr));
    binary
}

#[test]
fn a_go_http_server_serves_curl_and_stops_on_sigterm() {
    if !kvm_available() {
        return;
    }
    go_http_server("run");
}

/// The same under `ftvm record`, then replayed. (Go's runtime reserves hundreds of MiB
/// `PROT_NONE` at start: zeroed eagerly, each page of it was a write fault of the recording
/// and a page of its sync points, and a hello world made no progress in 45 s.)
#[test]
fn a_go_http_server_under_record_serves_curl_and_replays_exactly() {
    if !kvm_available() {
        return;
    }
    go_http_server("record");
}

/// `mode`: `run`, or `record` (then the recording must replay exactly).
fn go_http_server(mode: &str) {
    let dir = scratch(&format!("go-http-{mode}"));
    let log = dir.join("go.log");
    let binary = go_server(&dir);
    let archive = dir.join("go.cpio");
    program_cpio(&binary, "gohttp", &archive);
    let net = Topology::up(if mode == "record" { "gor" } else { "goh" }, 1);
    let console = dir.join("console.txt");
    let vm = net
        .cmd("h1", env!("CARGO_BIN_EXE_ftvm"))
        .arg(mode)
        .args(if mode == "record" { vec!["--log".into(), log.clone().into_os_string()] } else { vec![] })
        .arg("--kernel")
        .arg(personality())
        .arg("--initrd")
        .arg(&archive)
        .args(["--mem", "2G", "--cmdline", "ip=10.0.0.2/24 init=/gohttp", "--net", "tap=tap0", "--rng"])
        .arg("--console")
        .arg(format!("file:{}", console.display()))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let get = || net.cmd("c", "curl").args(["-s", "--max-time", "20", "http://10.0.0.2:8080/"]).output().unwrap();
    let start = Instant::now();
    while !get().status.success() {
        assert!(start.elapsed() < Duration::from_secs(60), "{}", std::fs::read_to_string(&console).unwrap_or_default());
        std::thread::sleep(Duration::from_millis(100));
    }
    // One request answered above; then 20 in turn, each counted once and in order.
    for i in 2..=21 {
        let out = get();
        assert_eq!(String::from_utf8_lossy(&out.stdout), format!("hit {i}\n"));
    }
    // Ten at once, each on its own connection.
    let clients: Vec<_> = (0..10)
        .map(|_| {
            net.cmd("c", "curl")
                .args(["-s", "--max-time", "20", "http://10.0.0.2:8080/"])
                .stdout(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut hits: Vec<u32> = clients
        .into_iter()
        .map(|c| {
            let out = c.wait_with_output().unwrap();
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            text.trim().strip_prefix("hit ").and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("{text:?}"))
        })
        .collect();
    hits.sort_unstable();
    assert_eq!(hits, (22..=31).collect::<Vec<_>>());
    let text = std::fs::read_to_string(&console).unwrap();
    assert!(text.contains("none forbidden"), "the runtime's CPUID and RDTSC are emulated: {text}");
    assert!(!text.contains("unsupported system call"), "{text}");
    // SIGTERM reaches Go's signal handling (signal.Notify); it exits 0.
    let text = stop_with_sigterm(vm, &console);
    assert!(text.contains("go: SIGTERM after 31 hits"), "{text}");
    if mode == "record" {
        replays_exactly(&log, &dir.join("replay"), &text);
    }
}
