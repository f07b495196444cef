//! Paths: joining a relative path to the working directory and normalizing `.`, `..` and
//! repeated slashes, as the personality's file system looks names up (absolute, no trailing
//! slash; the root is `/`). Symbolic links are not followed here.

use alloc::string::String;
use alloc::vec::Vec;

/// `path` made absolute against `cwd` (itself absolute) and normalized.
pub fn resolve(cwd: &str, path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    let joined = if path.starts_with('/') { [path, ""] } else { [cwd, path] };
    for piece in joined {
        for part in piece.split('/') {
            match part {
                "" | "." => {}
                ".." => {
                    parts.pop();
                }
                name => parts.push(name),
            }
        }
    }
    let mut out = String::new();
    for part in &parts {
        out.push('/');
        out.push_str(part);
    }
    if out.is_empty() {
        out.push('/');
    }
    out
}

/// The parent directory of a normalized absolute path (`/` for `/` itself) and its last name.
pub fn split(path: &str) -> (&str, &str) {
    match path.rfind('/') {
        Some(0) => ("/", &path[1..]),
        Some(i) => (&path[..i], &path[i + 1..]),
        None => ("/", path),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_and_normalizes() {
        assert_eq!(resolve("/", "redis.conf"), "/redis.conf");
        assert_eq!(resolve("/data", "dump.rdb"), "/data/dump.rdb");
        assert_eq!(resolve("/data", "../etc//x/./y"), "/etc/x/y");
        assert_eq!(resolve("/data", "/abs/"), "/abs");
        assert_eq!(resolve("/", ".."), "/");
        assert_eq!(resolve("/a/b", "."), "/a/b");
        assert_eq!(resolve("/", ""), "/");
    }

    #[test]
    fn splits_parent_and_name() {
        assert_eq!(split("/data/dump.rdb"), ("/data", "dump.rdb"));
        assert_eq!(split("/x"), ("/", "x"));
        assert_eq!(split("/"), ("/", ""));
    }
}
