//! Inode numbers for a file system that has none.
//!
//! FAT identifies a file only by where its directory entry is, which moves on rename. The
//! table gives each path seen an inode number that never changes while the file exists and is
//! never reused; renames move a node (and everything under it) to its new path, deletes drop
//! it. Paths are compared as FAT compares names: without regard to case.

use std::collections::{BTreeMap, HashMap};

/// An inode number as FUSE sees it.
pub type Ino = u64;

/// The root directory's inode number (fixed by FUSE).
pub const ROOT_INO: Ino = 1;

/// A path from the root: the names of the entries on the way, as stored on the volume.
pub type FatPath = Vec<String>;

/// Case-folded `/A/B` form of a path; children of `/A` share the prefix `/A/`.
fn key(path: &[String]) -> String {
    let mut key = String::new();
    for name in path {
        key.push('/');
        key.extend(name.chars().flat_map(char::to_uppercase));
    }
    key
}

/// The two-way map between inode numbers and paths.
#[derive(Debug)]
pub struct InodeTable {
    paths: HashMap<Ino, FatPath>,
    inos: BTreeMap<String, Ino>,
    next: Ino,
}

impl Default for InodeTable {
    fn default() -> Self {
        Self::new()
    }
}

impl InodeTable {
    /// A table holding only the root.
    pub fn new() -> Self {
        let mut table = Self {
            paths: HashMap::new(),
            inos: BTreeMap::new(),
            next: ROOT_INO + 1,
        };
        table.paths.insert(ROOT_INO, Vec::new());
        table.inos.insert(key(&[]), ROOT_INO);
        table
    }

    /// The path of `ino`, if it is known and still exists.
    pub fn path(&self, ino: Ino) -> Option<&FatPath> {
        self.paths.get(&ino)
    }

    /// The inode number of `path`, if one was given out.
    pub fn ino(&self, path: &[String]) -> Option<Ino> {
        self.inos.get(&key(path)).copied()
    }

    /// The inode number of `path`, giving out a new one the first time. The stored spelling is
    /// updated to `path`'s (names match without regard to case).
    pub fn ino_for(&mut self, path: &[String]) -> Ino {
        let key = key(path);
        if let Some(&ino) = self.inos.get(&key) {
            if let Some(stored) = self.paths.get_mut(&ino) {
                if stored.as_slice() != path {
                    *stored = path.to_vec();
                }
            }
            return ino;
        }
        let ino = self.next;
        self.next += 1;
        self.inos.insert(key, ino);
        self.paths.insert(ino, path.to_vec());
        ino
    }

    /// Keys of `path` and everything below it.
    fn subtree(&self, path: &[String]) -> Vec<String> {
        let top = key(path);
        let below = format!("{top}/");
        let mut keys: Vec<String> = self
            .inos
            .range(below.clone()..)
            .take_while(|(k, _)| k.starts_with(&below))
            .map(|(k, _)| k.clone())
            .collect();
        if self.inos.contains_key(&top) {
            keys.push(top);
        }
        keys
    }

    /// Forgets `path` and everything below it (they were deleted). The root stays.
    pub fn remove(&mut self, path: &[String]) {
        if path.is_empty() {
            return;
        }
        for k in self.subtree(path) {
            if let Some(ino) = self.inos.remove(&k) {
                self.paths.remove(&ino);
            }
        }
    }

    /// Moves `from` and everything below it to `to`, keeping their inode numbers. Whatever
    /// was at `to` must have been removed first.
    pub fn rename(&mut self, from: &[String], to: &[String]) {
        if from.is_empty() {
            return;
        }
        let depth = from.len();
        for k in self.subtree(from) {
            let Some(ino) = self.inos.remove(&k) else {
                continue;
            };
            let Some(old) = self.paths.get(&ino) else {
                continue;
            };
            let mut new = to.to_vec();
            new.extend(old.iter().skip(depth).cloned());
            self.inos.insert(key(&new), ino);
            self.paths.insert(ino, new);
        }
    }

    /// Number of inodes known, the root included.
    pub fn len(&self) -> usize {
        self.paths.len()
    }

    /// Never true: the root is always there.
    pub fn is_empty(&self) -> bool {
        self.paths.is_empty()
    }

    /// Checks that the two maps agree (for tests).
    pub fn check_consistent(&self) -> Result<(), String> {
        if self.paths.len() != self.inos.len() {
            return Err(format!(
                "{} paths but {} keys",
                self.paths.len(),
                self.inos.len()
            ));
        }
        for (ino, path) in &self.paths {
            if self.inos.get(&key(path)) != Some(ino) {
                return Err(format!("inode {ino} at {path:?} is not found by its path"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(names: &[&str]) -> FatPath {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn renames_carry_the_subtree_along() {
        let mut table = InodeTable::new();
        let dir = table.ino_for(&p(&["a"]));
        let file = table.ino_for(&p(&["a", "f"]));
        let deep = table.ino_for(&p(&["a", "b", "g"]));
        let other = table.ino_for(&p(&["ab"]));
        table.rename(&p(&["a"]), &p(&["z", "y"]));
        assert_eq!(table.path(dir), Some(&p(&["z", "y"])));
        assert_eq!(table.path(file), Some(&p(&["z", "y", "f"])));
        assert_eq!(table.path(deep), Some(&p(&["z", "y", "b", "g"])));
        assert_eq!(table.path(other), Some(&p(&["ab"])));
        assert_eq!(table.ino(&p(&["a", "f"])), None);
        table.check_consistent().expect("consistent");
        table.remove(&p(&["Z"]));
        assert_eq!(table.path(file), None);
        assert_eq!(table.len(), 2); // the root and `ab`
        table.check_consistent().expect("consistent");
    }

    #[test]
    fn names_match_without_regard_to_case() {
        let mut table = InodeTable::new();
        let ino = table.ino_for(&p(&["Readme.TXT"]));
        assert_eq!(table.ino_for(&p(&["README.txt"])), ino);
        assert_eq!(table.path(ino), Some(&p(&["README.txt"])));
        assert_ne!(table.ino_for(&p(&["other"])), ino);
    }
}
