//! `--config FILE`: a command's options from a TOML file that both hosts of a pair can share.
//!
//! The file's keys are the long options' names (`mem`, `key-file` or `key_file`, `net`, ...)
//! with their values; its top level applies to every command that has the option, and a table
//! named after a command (`[primary]`, `[backup]`, `[run]`, `[record]`) adds or overrides keys
//! for that command alone. So one file holds both the primary's peer (`[primary]` with
//! `backup = "10.0.0.2:7000"`) and the backup's address (`[backup]` with `listen = ...`), and
//! each side takes what is its own. A top-level key that only another command has is skipped.
//!
//! The file is turned into options placed before the command line's own, and an option the
//! command line gives is dropped from the file's, so that a flag always overrides the file and
//! clap checks every value (and every conflict) exactly as it checks the command line.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};

use clap::ArgAction;

/// The commands that take `--config`, so the tables a file may have.
const COMMANDS: [&str; 4] = ["run", "record", "primary", "backup"];

/// Commands whose first positional names the command whose options follow (`ftvm doctor primary`).
const WRAPPERS: [&str; 1] = ["doctor"];

/// The largest configuration file read (a configuration is a few hundred bytes).
const MAX_SIZE: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the configuration file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the configuration file {path} is not a regular file of at most 1 MiB")]
    NotAFile { path: PathBuf },
    #[error("the configuration file {path} is not valid TOML: {source}")]
    Syntax {
        path: PathBuf,
        #[source]
        source: Box<toml::de::Error>,
    },
    #[error("{path}: unknown key {key:?}{place}: no command has an option --{flag} (see `ftvm {command} --help`)")]
    UnknownKey { path: PathBuf, key: String, flag: String, place: String, command: String },
    #[error("{path}: key {key:?}{place}: {why}")]
    BadValue { path: PathBuf, key: String, place: String, why: String },
}

/// `--config FILE`'s place in `args`, and its value.
fn config_path(args: &[OsString]) -> Option<PathBuf> {
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        if arg == "--" {
            return None;
        }
        if arg == "--config" {
            return it.next().map(PathBuf::from);
        }
        if let Some(value) = arg.to_str().and_then(|a| a.strip_prefix("--config=")) {
            return Some(PathBuf::from(value));
        }
    }
    None
}

/// Whether the command line gives `--flag` itself (as `--flag`, `--flag VALUE` or `--flag=VALUE`).
fn given(args: &[OsString], flag: &str) -> bool {
    let long = format!("--{flag}");
    let with_value = format!("--{flag}=");
    args.iter()
        .take_while(|a| *a != "--")
        .any(|a| a == OsStr::new(&long) || a.to_string_lossy().starts_with(&with_value))
}

/// The index of the command (`run`, `primary`, ...) in `args`, the path to it in the
/// command tree (`["doctor", "primary"]`), or None when there is none.
fn find_command(args: &[OsString], root: &clap::Command) -> Option<(usize, Vec<String>)> {
    let mut i = 1;
    // Global options before the command: skip them and their values.
    while i < args.len() {
        let arg = args[i].to_string_lossy();
        if let Some(name) = arg.strip_prefix("--") {
            let takes_value = root
                .get_arguments()
                .find(|a| a.get_long() == Some(name))
                .is_some_and(|a| a.get_action().takes_values());
            i += if takes_value { 2 } else { 1 };
            continue;
        }
        break;
    }
    let first = args.get(i)?.to_str()?.to_string();
    if WRAPPERS.contains(&first.as_str()) {
        let second = args.get(i + 1)?.to_str()?.to_string();
        return COMMANDS.contains(&second.as_str()).then(|| (i + 1, vec![first, second]));
    }
    COMMANDS.contains(&first.as_str()).then(|| (i, vec![first]))
}

fn subcommand<'a>(root: &'a clap::Command, path: &[String]) -> Option<&'a clap::Command> {
    path.iter().try_fold(root, |cmd, name| cmd.find_subcommand(name))
}

/// `args` with the options of the `--config` file it names inserted after the command's
/// name; `args` unchanged when it names none.
pub fn expand(args: Vec<OsString>, root: &clap::Command) -> Result<Vec<OsString>, ConfigError> {
    let Some((at, path)) = find_command(&args, root) else { return Ok(args) };
    let Some(file) = config_path(&args[at + 1..]) else { return Ok(args) };
    let command = subcommand(root, &path).expect("find_command returns commands of the tree");
    let name = path.last().expect("a command path is never empty").clone();
    let table = read(&file)?;
    let mut inserted = Vec::new();
    let mut global = Vec::new();
    // The top level first, then the command's own table, whose keys override it.
    let own = match table.get(&name) {
        Some(toml::Value::Table(t)) => Some(t),
        _ => None,
    };
    for (key, value) in &table {
        if let (true, toml::Value::Table(t)) = (COMMANDS.contains(&key.as_str()), value) {
            // A command's table: check its keys; the command's own is taken below.
            let other = root.find_subcommand(key).expect("COMMANDS are ftvm's commands");
            for k in t.keys() {
                if flag_of(other, k).is_none() {
                    return Err(unknown(&file, k, &format!(" in [{key}]"), key));
                }
            }
            continue;
        }
        if own.is_some_and(|t| t.contains_key(key)) {
            continue;
        }
        match place(root, command, &file, key, value, "", &name)? {
            Placed::Command(opts) => filter_given(&args[at + 1..], key, opts, &mut inserted),
            Placed::Global(opts) => filter_given(&args[1..at], key, opts, &mut global),
            Placed::OtherCommand => {}
        }
    }
    for (key, value) in own.into_iter().flatten() {
        let place_name = format!(" in [{name}]");
        match place(root, command, &file, key, value, &place_name, &name)? {
            Placed::Command(opts) => filter_given(&args[at + 1..], key, opts, &mut inserted),
            Placed::Global(opts) => filter_given(&args[1..at], key, opts, &mut global),
            Placed::OtherCommand => return Err(unknown(&file, key, &place_name, &name)),
        }
    }
    let mut out = Vec::with_capacity(args.len() + inserted.len() + global.len());
    out.push(args[0].clone());
    out.extend(global);
    out.extend_from_slice(&args[1..=at]);
    out.extend(inserted);
    out.extend_from_slice(&args[at + 1..]);
    Ok(out)
}

/// Adds a key's options unless the command line gives the option itself.
fn filter_given(args: &[OsString], key: &str, opts: Vec<OsString>, into: &mut Vec<OsString>) {
    if !given(args, &normalize(key)) {
        into.extend(opts);
    }
}

enum Placed {
    /// Options of the command itself.
    Command(Vec<OsString>),
    /// Options of ftvm itself (`log-level`), which go before the command.
    Global(Vec<OsString>),
    /// A key for another command (the backup's `listen` in the primary's run).
    OtherCommand,
}

fn normalize(key: &str) -> String {
    key.replace('_', "-")
}

fn flag_of<'a>(command: &'a clap::Command, key: &str) -> Option<&'a clap::Arg> {
    let flag = normalize(key);
    command.get_arguments().find(|a| a.get_long() == Some(flag.as_str()) && flag != "config" && flag != "help")
}

fn unknown(file: &Path, key: &str, place: &str, command: &str) -> ConfigError {
    ConfigError::UnknownKey {
        path: file.to_path_buf(),
        key: key.to_string(),
        flag: normalize(key),
        place: place.to_string(),
        command: command.to_string(),
    }
}

fn place(
    root: &clap::Command,
    command: &clap::Command,
    file: &Path,
    key: &str,
    value: &toml::Value,
    place: &str,
    name: &str,
) -> Result<Placed, ConfigError> {
    if normalize(key) == "config" {
        return Err(ConfigError::BadValue {
            path: file.to_path_buf(),
            key: key.to_string(),
            place: place.to_string(),
            why: "a configuration file cannot name another".into(),
        });
    }
    if let Some(arg) = flag_of(command, key) {
        return options(arg, file, key, value, place).map(Placed::Command);
    }
    if let Some(arg) = flag_of(root, key) {
        return options(arg, file, key, value, place).map(Placed::Global);
    }
    let elsewhere = COMMANDS.iter().filter_map(|c| root.find_subcommand(c)).any(|c| flag_of(c, key).is_some());
    if elsewhere {
        Ok(Placed::OtherCommand)
    } else {
        Err(unknown(file, key, place, name))
    }
}

/// The command-line options that say what `value` says for `arg`.
fn options(
    arg: &clap::Arg,
    file: &Path,
    key: &str,
    value: &toml::Value,
    place: &str,
) -> Result<Vec<OsString>, ConfigError> {
    let flag = OsString::from(format!("--{}", arg.get_long().expect("found by its long name")));
    let bad =
        |why: String| ConfigError::BadValue { path: file.to_path_buf(), key: key.into(), place: place.into(), why };
    let scalar = |v: &toml::Value| -> Result<String, ConfigError> {
        match v {
            toml::Value::String(s) => Ok(s.clone()),
            toml::Value::Integer(i) => Ok(i.to_string()),
            toml::Value::Float(f) => Ok(f.to_string()),
            toml::Value::Boolean(b) => Ok(b.to_string()),
            other => Err(bad(format!("expected a string or a number, found {}", other.type_str()))),
        }
    };
    match (arg.get_action(), value) {
        (ArgAction::SetTrue, toml::Value::Boolean(true)) => Ok(vec![flag]),
        (ArgAction::SetTrue, toml::Value::Boolean(false)) => Ok(vec![]),
        (ArgAction::SetTrue, other) => Err(bad(format!("expected true or false, found {}", other.type_str()))),
        (ArgAction::Append, toml::Value::Array(items)) => {
            let mut out = Vec::new();
            for item in items {
                out.push(flag.clone());
                out.push(OsString::from(scalar(item)?));
            }
            Ok(out)
        }
        (_, toml::Value::Array(_)) => Err(bad(format!("--{} takes one value, not a list", normalize(key)))),
        (_, v) => Ok(vec![flag, OsString::from(scalar(v)?)]),
    }
}

fn read(path: &Path) -> Result<toml::Table, ConfigError> {
    let read_error = |source| ConfigError::Read { path: path.to_path_buf(), source };
    let meta = std::fs::metadata(path).map_err(read_error)?;
    if !meta.is_file() || meta.len() > MAX_SIZE {
        return Err(ConfigError::NotAFile { path: path.to_path_buf() });
    }
    let text = std::fs::read_to_string(path).map_err(read_error)?;
    text.parse::<toml::Table>().map_err(|e| ConfigError::Syntax { path: path.to_path_buf(), source: Box::new(e) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Arg, Command};

    fn cli() -> Command {
        let vm = |c: Command| {
            c.arg(Arg::new("mem").long("mem"))
                .arg(Arg::new("rng").long("rng").action(ArgAction::SetTrue))
                .arg(Arg::new("disk").long("disk").action(ArgAction::Append))
                .arg(Arg::new("config").long("config"))
        };
        Command::new("ftvm")
            .arg(Arg::new("log-level").long("log-level").global(true))
            .subcommand(vm(Command::new("run")))
            .subcommand(vm(Command::new("record")).arg(Arg::new("log").long("log")))
            .subcommand(
                vm(Command::new("primary"))
                    .arg(Arg::new("backup").long("backup"))
                    .arg(Arg::new("key-file").long("key-file")),
            )
            .subcommand(
                vm(Command::new("backup"))
                    .arg(Arg::new("listen").long("listen"))
                    .arg(Arg::new("key-file").long("key-file")),
            )
            .subcommand(
                Command::new("doctor").subcommand(vm(Command::new("primary")).arg(Arg::new("backup").long("backup"))),
            )
    }

    fn file(text: &str) -> (PathBuf, tempdir::Dir) {
        let dir = tempdir::Dir::new();
        let path = dir.0.join("pair.toml");
        std::fs::write(&path, text).unwrap();
        (path, dir)
    }

    /// A scratch directory removed at the end of the test.
    mod tempdir {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Dir {
                static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
                let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let dir = std::env::temp_dir().join(format!("ftvm-config-test-{}-{n}", std::process::id()));
                std::fs::create_dir_all(&dir).unwrap();
                Dir(dir)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    fn expanded(args: &[&str]) -> Result<Vec<String>, ConfigError> {
        let args = args.iter().map(OsString::from).collect();
        expand(args, &cli()).map(|v| v.into_iter().map(|a| a.into_string().unwrap()).collect())
    }

    #[test]
    fn each_side_takes_its_own_keys_and_flags_override_the_file() {
        let (path, _dir) = file(
            "mem = \"512M\"\nkey_file = \"/etc/ftvm/key\"\nlisten = \"0.0.0.0:7000\"\n\
             disk = [\"a.img\", \"b.img\"]\nrng = true\nlog-level = \"info\"\n[backup]\nmem = \"1G\"\n\
             [primary]\nbackup = \"10.0.0.2:7000\"\n",
        );
        let p = path.to_str().unwrap();
        let primary = expanded(&["ftvm", "primary", "--config", p, "--mem", "128M"]).unwrap();
        assert_eq!(primary[..3], ["ftvm", "--log-level", "info"]);
        assert_eq!(primary[3], "primary");
        assert!(primary.windows(2).any(|w| w == ["--backup", "10.0.0.2:7000"]));
        assert!(!primary.iter().any(|a| a == "--listen"));
        assert!(primary.windows(2).any(|w| w == ["--disk", "b.img"]));
        assert!(primary.iter().any(|a| a == "--rng"));
        // The command line's --mem only: the file's is dropped.
        assert_eq!(primary.iter().filter(|a| *a == "--mem").count(), 1);
        assert!(primary.windows(2).any(|w| w == ["--mem", "128M"]));
        let backup = expanded(&["ftvm", "backup", &format!("--config={p}")]).unwrap();
        assert!(backup.windows(2).any(|w| w == ["--mem", "1G"]), "{backup:?}");
        assert!(!backup.windows(2).any(|w| w == ["--mem", "512M"]));
        assert!(backup.windows(2).any(|w| w == ["--listen", "0.0.0.0:7000"]));
        assert!(!backup.iter().any(|a| a == "--backup"));
        // doctor primary takes the primary's keys.
        let doctor = expanded(&["ftvm", "doctor", "primary", "--config", p]).unwrap();
        assert!(doctor.windows(2).any(|w| w == ["--backup", "10.0.0.2:7000"]), "{doctor:?}");
    }

    #[test]
    fn bad_files_are_refused_with_the_key_and_the_reason() {
        let (path, _dir) = file("memory = \"1G\"\n");
        let p = path.to_str().unwrap();
        let e = expanded(&["ftvm", "run", "--config", p]).unwrap_err().to_string();
        assert!(e.contains("unknown key \"memory\"") && e.contains("--memory"), "{e}");
        let (path, _dir) = file("[run]\nlisten = \"0.0.0.0:1\"\n");
        let e = expanded(&["ftvm", "run", "--config", path.to_str().unwrap()]).unwrap_err().to_string();
        assert!(e.contains("\"listen\" in [run]"), "{e}");
        let (path, _dir) = file("[backup]\nwat = 1\n");
        let e = expanded(&["ftvm", "run", "--config", path.to_str().unwrap()]).unwrap_err().to_string();
        assert!(e.contains("\"wat\" in [backup]"), "{e}");
        let (path, _dir) = file("mem = [\"1G\"]\n");
        let e = expanded(&["ftvm", "run", "--config", path.to_str().unwrap()]).unwrap_err().to_string();
        assert!(e.contains("takes one value"), "{e}");
        let (path, _dir) = file("rng = \"yes\"\n");
        let e = expanded(&["ftvm", "run", "--config", path.to_str().unwrap()]).unwrap_err().to_string();
        assert!(e.contains("expected true or false"), "{e}");
        let (path, _dir) = file("mem = \n");
        let e = expanded(&["ftvm", "run", "--config", path.to_str().unwrap()]).unwrap_err().to_string();
        assert!(e.contains("not valid TOML") && e.contains("line 1"), "{e}");
        let e = expanded(&["ftvm", "run", "--config", "/nonexistent/pair.toml"]).unwrap_err().to_string();
        assert!(e.contains("cannot read") && e.contains("/nonexistent/pair.toml"), "{e}");
        let e = expanded(&["ftvm", "run", "--config", "/dev/zero"]).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
        let (path, _dir) = file("config = \"other.toml\"\n");
        let e = expanded(&["ftvm", "run", "--config", path.to_str().unwrap()]).unwrap_err().to_string();
        assert!(e.contains("cannot name another"), "{e}");
    }

    #[test]
    fn without_config_the_arguments_are_untouched() {
        let args = ["ftvm", "run", "--mem", "1G", "--", "--config", "x"];
        assert_eq!(expanded(&args).unwrap(), args);
        assert_eq!(expanded(&["ftvm", "ctl", "s", "status"]).unwrap(), ["ftvm", "ctl", "s", "status"]);
    }
}
