//! `ftvm list`: the VMs running on this host, found by their API sockets in ftvm's runtime
//! directory (where `--id NAME` puts them) and in any directory given, each asked for its status.

use std::path::{Path, PathBuf};

/// One VM found, or a socket nobody answers on.
struct Entry {
    name: String,
    socket: PathBuf,
    status: Result<ftvm_api::Status, String>,
}

/// The serde name of a status enum (`backup-live`), as the JSON status spells it.
fn word<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_value(v).ok().and_then(|j| j.as_str().map(str::to_string)).unwrap_or_else(|| "?".into())
}

fn sockets(dirs: &[PathBuf]) -> Vec<PathBuf> {
    use std::os::unix::fs::FileTypeExt;
    let mut found = Vec::new();
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(dir) else { continue };
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_socket()) {
                found.push(e.path());
            }
        }
    }
    found.sort();
    found
}

fn name_of(socket: &Path) -> String {
    let file = socket.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    file.strip_suffix(".sock").unwrap_or(&file).to_string()
}

/// Prints the table (or JSON); false when a directory given cannot be read.
pub fn run(extra: &[PathBuf], json: bool) -> Result<(), String> {
    let mut dirs = Vec::new();
    match ftvm_replication::arbiter::runtime_dir() {
        Ok(dir) => dirs.push(dir),
        Err(e) if extra.is_empty() => return Err(e.to_string()),
        Err(_) => {}
    }
    for d in extra {
        if !d.is_dir() {
            return Err(format!("{} is not a directory", d.display()));
        }
        dirs.push(d.clone());
    }
    let entries: Vec<Entry> = sockets(&dirs)
        .into_iter()
        .map(|socket| Entry {
            name: name_of(&socket),
            status: ftvm_api::client::status(&socket).map_err(|e| e.to_string()),
            socket,
        })
        .collect();
    if json {
        let list: Vec<_> = entries
            .iter()
            .map(|e| match &e.status {
                Ok(s) => serde_json::json!({"name": e.name, "socket": e.socket, "status": s}),
                Err(why) => serde_json::json!({"name": e.name, "socket": e.socket, "error": why}),
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&list).unwrap_or_default());
        return Ok(());
    }
    if entries.is_empty() {
        let places: Vec<_> = dirs.iter().map(|d| d.display().to_string()).collect();
        println!("no VM found (API sockets in {}; start VMs with --id NAME or --api-socket there)", places.join(", "));
        return Ok(());
    }
    println!("{:<24} {:<12} {:<9} {:>8} {:>10}  {:<14} SOCKET", "NAME", "ROLE", "STATE", "PID", "UPTIME", "PROTECTED");
    for e in &entries {
        match &e.status {
            Ok(s) => {
                let protection = match &s.pair {
                    Some(p) if p.halted => "halted".to_string(),
                    Some(p) if p.protected => match p.lag_records {
                        Some(lag) => format!("yes (lag {lag})"),
                        None => "yes".into(),
                    },
                    Some(_) => "no".into(),
                    None => "-".into(),
                };
                println!(
                    "{:<24} {:<12} {:<9} {:>8} {:>9.0}s  {:<14} {}",
                    e.name,
                    word(&s.role),
                    word(&s.state),
                    s.pid,
                    s.uptime_s,
                    protection,
                    e.socket.display()
                );
            }
            Err(_) => println!(
                "{:<24} {:<12} {:<9} {:>8} {:>10}  {:<14} {} (stale: no VM answers)",
                e.name,
                "-",
                "gone",
                "-",
                "-",
                "-",
                e.socket.display()
            ),
        }
    }
    Ok(())
}
