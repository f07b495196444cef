//! The file system: the initramfs (cpio newc) read into a tree in RAM at start-up, plus the
//! special files /dev/null, /dev/zero, /dev/urandom and /dev/random (virtio-rng). Files of
//! the initramfs stay in its memory until written (then copied); new files and directories
//! live in RAM and are lost at power-off (persistence on the virtio disk is the next step).
//! Paths are normalized by `linux_abi::path`; symbolic links are not followed.

use alloc::collections::BTreeMap;
use alloc::rc::Rc;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::cell::RefCell;

use linux_abi::cpio;

pub const S_IFMT: u32 = 0o170000;
pub const S_IFREG: u32 = 0o100000;
pub const S_IFDIR: u32 = 0o040000;
pub const S_IFCHR: u32 = 0o020000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dev {
    Null,
    Zero,
    Random,
}

pub enum Data {
    /// Still the initramfs's bytes.
    Rom(&'static [u8]),
    Ram(Vec<u8>),
    Dir,
    Dev(Dev),
    Symlink(String),
}

pub struct Inode {
    pub ino: u64,
    pub mode: u32,
    /// Owner and group (`chown`); in RAM only, like the mode's changes (`chmod`).
    pub uid: u32,
    pub gid: u32,
    pub mtime: u64,
    pub data: Data,
    /// Persistence (files under the data directory, with a data disk; see `persist`): the
    /// length the journal holds, whether bytes below it changed since, and whether the
    /// journal knows the file at all.
    pub synced: u64,
    pub dirty_below: bool,
    pub on_disk: bool,
}

impl Inode {
    pub fn new(ino: u64, mode: u32, mtime: u64, data: Data) -> Inode {
        Inode { ino, mode, uid: 0, gid: 0, mtime, data, synced: 0, dirty_below: false, on_disk: false }
    }
}

pub type Node = Rc<RefCell<Inode>>;

impl Inode {
    /// Everything of the file is on the data disk now.
    pub fn mark_on_disk(&mut self) {
        self.synced = self.size();
        self.dirty_below = false;
        self.on_disk = true;
    }

    pub fn size(&self) -> u64 {
        match &self.data {
            Data::Rom(bytes) => bytes.len() as u64,
            Data::Ram(bytes) => bytes.len() as u64,
            Data::Symlink(target) => target.len() as u64,
            Data::Dir => 4096,
            Data::Dev(_) => 0,
        }
    }

    pub fn is_dir(&self) -> bool {
        matches!(self.data, Data::Dir)
    }

    pub fn bytes(&self) -> &[u8] {
        match &self.data {
            Data::Rom(bytes) => bytes,
            Data::Ram(bytes) => bytes,
            _ => &[],
        }
    }

    /// The contents, made writable.
    pub fn ram(&mut self) -> &mut Vec<u8> {
        if let Data::Rom(bytes) = self.data {
            self.data = Data::Ram(bytes.to_vec());
        }
        match &mut self.data {
            Data::Ram(bytes) => bytes,
            _ => unreachable!("ram() on a file that is not regular"),
        }
    }
}

pub struct Fs {
    /// Normalized absolute path -> node.
    pub nodes: BTreeMap<String, Node>,
    next_ino: u64,
}

pub const ENOENT: i64 = 2;
pub const EEXIST: i64 = 17;
pub const ENOTDIR: i64 = 20;
pub const EISDIR: i64 = 21;
pub const ENOTEMPTY: i64 = 39;

impl Fs {
    /// Reads the initramfs. Members' directories are created as needed.
    pub fn from_cpio(archive: &'static [u8], now: u64) -> Result<Fs, cpio::Error> {
        let mut fs = Fs { nodes: BTreeMap::new(), next_ino: 1 };
        fs.add("/", S_IFDIR | 0o755, Data::Dir, now);
        for entry in cpio::entries(archive) {
            let entry = entry?;
            let path = linux_abi::path::resolve("/", entry.name);
            let data = if entry.is_dir() {
                Data::Dir
            } else if entry.is_symlink() {
                Data::Symlink(String::from_utf8_lossy(entry.data).to_string())
            } else {
                Data::Rom(entry.data)
            };
            fs.make_parents(&path, now);
            fs.add(&path, entry.mode, data, u64::from(entry.mtime));
        }
        for dir in ["/dev", "/tmp", "/data"] {
            if !fs.nodes.contains_key(dir) {
                fs.add(dir, S_IFDIR | 0o755, Data::Dir, now);
            }
        }
        fs.add("/dev/null", S_IFCHR | 0o666, Data::Dev(Dev::Null), now);
        fs.add("/dev/zero", S_IFCHR | 0o666, Data::Dev(Dev::Zero), now);
        fs.add("/dev/urandom", S_IFCHR | 0o666, Data::Dev(Dev::Random), now);
        fs.add("/dev/random", S_IFCHR | 0o666, Data::Dev(Dev::Random), now);
        Ok(fs)
    }

    pub fn make_parents(&mut self, path: &str, now: u64) {
        let (parent, _) = linux_abi::path::split(path);
        if parent != "/" && !self.nodes.contains_key(parent) {
            let parent = parent.to_string();
            self.make_parents(&parent, now);
            self.add(&parent, S_IFDIR | 0o755, Data::Dir, now);
        }
    }

    pub fn add(&mut self, path: &str, mode: u32, data: Data, mtime: u64) -> Node {
        let node = Rc::new(RefCell::new(Inode::new(self.next_ino, mode, mtime, data)));
        self.next_ino += 1;
        self.nodes.insert(path.to_string(), node.clone());
        node
    }

    pub fn get(&self, path: &str) -> Option<Node> {
        self.nodes.get(path).cloned()
    }

    /// The path a node is at now (None once unlinked).
    pub fn path_of(&self, node: &Node) -> Option<String> {
        self.nodes.iter().find(|(_, n)| Rc::ptr_eq(n, node)).map(|(k, _)| k.clone())
    }

    /// The parent of `path` exists and is a directory.
    pub fn parent_ok(&self, path: &str) -> Result<(), i64> {
        let (parent, _) = linux_abi::path::split(path);
        match self.nodes.get(parent) {
            None => Err(ENOENT),
            Some(node) if !node.borrow().is_dir() => Err(ENOTDIR),
            Some(_) => Ok(()),
        }
    }

    pub fn create(&mut self, path: &str, mode: u32, now: u64) -> Result<Node, i64> {
        self.parent_ok(path)?;
        Ok(self.add(path, S_IFREG | (mode & 0o7777), Data::Ram(Vec::new()), now))
    }

    pub fn mkdir(&mut self, path: &str, mode: u32, now: u64) -> Result<(), i64> {
        if self.nodes.contains_key(path) {
            return Err(EEXIST);
        }
        self.parent_ok(path)?;
        self.add(path, S_IFDIR | (mode & 0o7777), Data::Dir, now);
        Ok(())
    }

    fn has_children(&self, path: &str) -> bool {
        let prefix = if path == "/" { String::from("/") } else { alloc::format!("{path}/") };
        self.nodes.range(prefix.clone()..).next().is_some_and(|(k, _)| k.starts_with(&prefix))
    }

    pub fn unlink(&mut self, path: &str, dir: bool) -> Result<(), i64> {
        let node = self.nodes.get(path).ok_or(ENOENT)?;
        let is_dir = node.borrow().is_dir();
        if dir && !is_dir {
            return Err(ENOTDIR);
        }
        if !dir && is_dir {
            return Err(EISDIR);
        }
        if is_dir && self.has_children(path) {
            return Err(ENOTEMPTY);
        }
        self.nodes.remove(path);
        Ok(())
    }

    /// Atomic within the tree: the target, if any, is replaced in one step.
    pub fn rename(&mut self, from: &str, to: &str) -> Result<(), i64> {
        let node = self.nodes.get(from).cloned().ok_or(ENOENT)?;
        self.parent_ok(to)?;
        if node.borrow().is_dir() {
            // Move the directory and everything below it.
            let prefix = alloc::format!("{from}/");
            let below: Vec<String> = self
                .nodes
                .range(prefix.clone()..)
                .take_while(|(k, _)| k.starts_with(&prefix))
                .map(|(k, _)| k.clone())
                .collect();
            for key in below {
                let moved = self.nodes.remove(&key).expect("listed");
                self.nodes.insert(alloc::format!("{to}/{}", &key[prefix.len()..]), moved);
            }
        } else if let Some(old) = self.nodes.get(to) {
            if old.borrow().is_dir() {
                return Err(EISDIR);
            }
        }
        self.nodes.remove(from);
        self.nodes.insert(to.to_string(), node);
        Ok(())
    }

    /// Names directly inside the directory `path`, with their nodes.
    pub fn list(&self, path: &str) -> Vec<(String, Node)> {
        let prefix = if path == "/" { String::from("/") } else { alloc::format!("{path}/") };
        self.nodes
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .filter(|(k, _)| k.len() > prefix.len() && !k[prefix.len()..].contains('/'))
            .map(|(k, v)| (k[prefix.len()..].to_string(), v.clone()))
            .collect()
    }
}
