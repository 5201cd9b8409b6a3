//! The file operations of `FatFs`, without FUSE, on images made in memory (fatfs's
//! formatter) and, where dosfstools is installed, by `mkfs.vfat`, checked with `fsck.vfat`.

use std::collections::BTreeMap;
use std::io::{Cursor, Read};
use std::path::Path;
use std::process::Command;

use fatfs::{FatType, FormatVolumeOptions};
use proptest::prelude::*;
use ring3_fat::{Errno, FatFs, FileDevice, Ino, Kind, MemDevice, VolumeOptions, ROOT_INO};

fn formatted(size: usize, fat_type: FatType) -> Vec<u8> {
    let mut cursor = Cursor::new(vec![0u8; size]);
    let mut options = FormatVolumeOptions::new().fat_type(fat_type);
    if fat_type == FatType::Fat32 {
        options = options.bytes_per_cluster(512);
    }
    fatfs::format_volume(&mut cursor, options).expect("format");
    cursor.into_inner()
}

fn image(fat_type: FatType) -> MemDevice {
    let size = match fat_type {
        FatType::Fat12 => 2 << 20,
        FatType::Fat16 => 8 << 20,
        FatType::Fat32 => 40 << 20,
    };
    MemDevice::new(formatted(size, fat_type))
}

fn open(device: &MemDevice) -> FatFs<MemDevice> {
    FatFs::open(device.clone(), VolumeOptions::default()).expect("open")
}

/// Inode of `path` ("a/b"), walking from the root with lookups.
fn ino(fs: &mut FatFs<MemDevice>, path: &str) -> Ino {
    let mut ino = ROOT_INO;
    for name in path.split('/').filter(|n| !n.is_empty()) {
        ino = fs.lookup(ino, name).expect("lookup").ino;
    }
    ino
}

fn read_all(fs: &mut FatFs<MemDevice>, ino: Ino) -> Vec<u8> {
    let size = fs.getattr(ino).expect("getattr").size;
    let mut data = Vec::new();
    while (data.len() as u64) < size {
        let chunk = fs.read(ino, data.len() as u64, 100_000).expect("read");
        assert!(!chunk.is_empty(), "short read");
        data.extend(chunk);
    }
    data
}

/// Path → contents (`None` for a directory), as fatfs itself reads the image.
type Tree = BTreeMap<String, Option<Vec<u8>>>;

fn tree_from_fatfs(bytes: Vec<u8>) -> Tree {
    let fs = fatfs::FileSystem::new(Cursor::new(bytes), fatfs::FsOptions::new()).expect("reopen");
    let mut tree = Tree::new();
    fn walk<T: fatfs::ReadWriteSeek>(dir: fatfs::Dir<'_, T>, prefix: &str, tree: &mut Tree) {
        for entry in dir.iter() {
            let entry = entry.expect("entry");
            let name = entry.file_name();
            if name == "." || name == ".." {
                continue;
            }
            let path = format!("{prefix}{name}");
            if entry.is_dir() {
                tree.insert(path.clone(), None);
                walk(entry.to_dir(), &format!("{path}/"), tree);
            } else {
                let mut data = Vec::new();
                entry.to_file().read_to_end(&mut data).expect("read");
                tree.insert(path, Some(data));
            }
        }
    }
    walk(fs.root_dir(), "", &mut tree);
    tree
}

fn tree_from_fatfs_ops(fs: &mut FatFs<MemDevice>) -> Tree {
    let mut tree = Tree::new();
    let mut pending = vec![(ROOT_INO, String::new())];
    while let Some((dir, prefix)) = pending.pop() {
        for entry in fs.readdir(dir).expect("readdir") {
            if entry.name == "." || entry.name == ".." {
                continue;
            }
            let path = format!("{prefix}{}", entry.name);
            match entry.kind {
                Kind::Directory => {
                    tree.insert(path.clone(), None);
                    pending.push((entry.ino, format!("{path}/")));
                }
                Kind::File => {
                    let data = read_all(fs, entry.ino);
                    tree.insert(path, Some(data));
                }
            }
        }
    }
    tree
}

fn dosfstools() -> bool {
    Command::new("fsck.vfat").arg("--help").output().is_ok()
        && Command::new("mkfs.vfat").arg("--help").output().is_ok()
}

fn fsck_clean(path: &Path) {
    let output = Command::new("fsck.vfat")
        .arg("-n")
        .arg(path)
        .output()
        .expect("fsck.vfat");
    assert!(
        output.status.success(),
        "fsck.vfat -n {}:\n{}{}",
        path.display(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

fn fsck_bytes(bytes: &[u8]) {
    if !dosfstools() {
        return;
    }
    let file = tempfile::NamedTempFile::new().expect("temp");
    std::fs::write(file.path(), bytes).expect("write image");
    fsck_clean(file.path());
}

#[test]
fn files_and_directories_round_trip() {
    for fat_type in [FatType::Fat12, FatType::Fat16, FatType::Fat32] {
        let device = image(fat_type);
        let mut fs = open(&device);
        assert_eq!(fs.fat_type(), fat_type);
        let docs = fs.mkdir(ROOT_INO, "Documents").expect("mkdir").ino;
        let file = fs
            .create(docs, "a rather long file name.text")
            .expect("create");
        assert_eq!(file.kind, Kind::File);
        assert_eq!(file.size, 0);
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
        assert_eq!(fs.write(file.ino, 0, &data).expect("write"), data.len());
        assert_eq!(
            fs.getattr(file.ino).expect("getattr").size,
            data.len() as u64
        );
        assert_eq!(read_all(&mut fs, file.ino), data);
        assert_eq!(
            fs.read(file.ino, 99_990, 100).expect("read tail"),
            &data[99_990..]
        );
        assert!(fs
            .read(file.ino, 200_000, 10)
            .expect("read past end")
            .is_empty());
        // Case-insensitive lookup finds the same inode.
        assert_eq!(
            fs.lookup(docs, "A RATHER LONG FILE NAME.TEXT")
                .expect("lookup")
                .ino,
            file.ino
        );
        let names: Vec<String> = fs
            .readdir(docs)
            .expect("readdir")
            .into_iter()
            .map(|e| e.name)
            .collect();
        assert_eq!(names, [".", "..", "a rather long file name.text"]);
        fs.inodes().check_consistent().expect("inodes");
        fs.sync().expect("sync");
        assert!(device.sync_count() >= 1);
        fs.close().expect("close");
        let bytes = device.contents();
        let tree = tree_from_fatfs(bytes.clone());
        assert_eq!(tree.get("Documents"), Some(&None));
        assert_eq!(
            tree.get("Documents/a rather long file name.text"),
            Some(&Some(data))
        );
        fsck_bytes(&bytes);
    }
}

#[test]
fn writes_past_the_end_leave_zeros_and_truncate_shrinks_and_grows() {
    let device = image(FatType::Fat16);
    let mut fs = open(&device);
    let file = fs.create(ROOT_INO, "sparse.bin").expect("create").ino;
    fs.write(file, 0, b"head").expect("write");
    fs.write(file, 10_000, b"tail").expect("write past end");
    let data = read_all(&mut fs, file);
    assert_eq!(data.len(), 10_004);
    assert_eq!(&data[..4], b"head");
    assert!(data[4..10_000].iter().all(|&b| b == 0));
    assert_eq!(&data[10_000..], b"tail");
    // Overwrite in the middle, across a cluster boundary.
    fs.write(file, 2040, &[0xaa; 20]).expect("overwrite");
    assert_eq!(read_all(&mut fs, file)[2040..2060], [0xaa; 20]);
    assert_eq!(fs.set_size(file, 3).expect("shrink").size, 3);
    assert_eq!(read_all(&mut fs, file), b"hea");
    assert_eq!(fs.set_size(file, 5000).expect("grow").size, 5000);
    let data = read_all(&mut fs, file);
    assert_eq!(&data[..3], b"hea");
    assert!(data[3..].iter().all(|&b| b == 0));
    assert_eq!(fs.set_size(file, 0).expect("empty").size, 0);
    fs.write(file, 0, b"again").expect("write after emptying");
    assert_eq!(read_all(&mut fs, file), b"again");
    assert_eq!(fs.write(file, u64::from(u32::MAX), b"x"), Err(Errno::EFBIG));
    fs.close().expect("close");
    fsck_bytes(&device.contents());
}

#[test]
fn renames_move_files_and_directories() {
    for fat_type in [FatType::Fat16, FatType::Fat32] {
        let device = image(fat_type);
        let mut fs = open(&device);
        let a = fs.mkdir(ROOT_INO, "a").expect("mkdir").ino;
        let b = fs.mkdir(ROOT_INO, "b").expect("mkdir").ino;
        let sub = fs.mkdir(a, "sub").expect("mkdir").ino;
        let deep = fs.create(sub, "deep file.txt").expect("create").ino;
        fs.write(deep, 0, b"deep").expect("write");
        let top = fs.create(a, "top").expect("create").ino;
        fs.write(top, 0, b"top").expect("write");
        let victim = fs.create(b, "victim").expect("create").ino;
        fs.write(victim, 0, b"old").expect("write");

        // A file replaces another, across directories.
        fs.rename(a, "top", b, "victim").expect("replace");
        assert_eq!(fs.getattr(victim), Err(Errno::ENOENT));
        assert_eq!(fs.lookup(b, "victim").expect("lookup").ino, top);
        assert_eq!(read_all(&mut fs, top), b"top");
        assert_eq!(fs.lookup(a, "top"), Err(Errno::ENOENT));

        // A directory with contents moves to another directory; inode numbers stay.
        fs.rename(a, "sub", b, "moved").expect("move dir");
        assert_eq!(fs.lookup(b, "moved").expect("lookup").ino, sub);
        assert_eq!(fs.lookup(sub, "deep file.txt").expect("lookup").ino, deep);
        assert_eq!(read_all(&mut fs, deep), b"deep");
        assert_eq!(fs.lookup(sub, "..").expect("dotdot").ino, b);

        // Into itself.
        assert_eq!(fs.rename(b, "moved", sub, "x"), Err(Errno::EINVAL));
        // Case-only rename.
        fs.rename(b, "moved", b, "MOVED").expect("case rename");
        let names: Vec<String> = fs
            .readdir(b)
            .expect("readdir")
            .into_iter()
            .map(|e| e.name)
            .collect();
        assert!(names.contains(&"MOVED".to_string()), "{names:?}");
        assert_eq!(fs.lookup(b, "MOVED").expect("lookup").ino, sub);
        // Replacing a non-empty directory, a file by a directory, a directory by a file.
        let other = fs.mkdir(a, "other").expect("mkdir").ino;
        fs.create(other, "f").expect("create");
        assert_eq!(fs.rename(b, "MOVED", a, "other"), Err(Errno::ENOTEMPTY));
        assert_eq!(fs.rename(b, "MOVED", b, "victim"), Err(Errno::ENOTDIR));
        assert_eq!(fs.rename(b, "victim", a, "other"), Err(Errno::EISDIR));
        fs.inodes().check_consistent().expect("inodes");
        fs.close().expect("close");
        let tree = tree_from_fatfs(device.contents());
        assert_eq!(
            tree.get("b/MOVED/deep file.txt"),
            Some(&Some(b"deep".to_vec()))
        );
        assert_eq!(tree.get("b/victim"), Some(&Some(b"top".to_vec())));
        assert!(!tree.contains_key("a/sub"));
        fsck_bytes(&device.contents());
    }
}

#[test]
fn errors_have_the_right_errno() {
    let device = image(FatType::Fat12);
    let mut fs = open(&device);
    let dir = fs.mkdir(ROOT_INO, "dir").expect("mkdir").ino;
    let file = fs.create(ROOT_INO, "file").expect("create").ino;
    fs.create(dir, "inner").expect("create");
    assert_eq!(
        fs.create(ROOT_INO, "FILE").map(|a| a.ino),
        Err(Errno::EEXIST)
    );
    assert_eq!(fs.mkdir(ROOT_INO, "dir").map(|a| a.ino), Err(Errno::EEXIST));
    assert_eq!(
        fs.lookup(ROOT_INO, "nothing").map(|a| a.ino),
        Err(Errno::ENOENT)
    );
    assert_eq!(fs.unlink(ROOT_INO, "dir"), Err(Errno::EISDIR));
    assert_eq!(fs.rmdir(ROOT_INO, "file"), Err(Errno::ENOTDIR));
    assert_eq!(fs.rmdir(ROOT_INO, "dir"), Err(Errno::ENOTEMPTY));
    assert_eq!(fs.unlink(ROOT_INO, "nothing"), Err(Errno::ENOENT));
    assert_eq!(fs.create(file, "x").map(|a| a.ino), Err(Errno::ENOTDIR));
    assert_eq!(fs.readdir(file).map(|l| l.len()), Err(Errno::ENOTDIR));
    assert_eq!(fs.read(dir, 0, 10).map(|d| d.len()), Err(Errno::EISDIR));
    for bad in [
        "a*b",
        "a\"b",
        "a:b",
        "a<b",
        "a?b",
        "a|b",
        "a\\b",
        "trailing.",
        "",
    ] {
        assert_eq!(
            fs.create(ROOT_INO, bad).map(|a| a.ino),
            Err(Errno::EINVAL),
            "{bad:?}"
        );
    }
    let long = "x".repeat(256);
    assert_eq!(
        fs.create(ROOT_INO, &long).map(|a| a.ino),
        Err(Errno::ENAMETOOLONG)
    );
    assert_eq!(
        fs.lookup(ROOT_INO, &long).map(|a| a.ino),
        Err(Errno::ENAMETOOLONG)
    );
    fs.create(ROOT_INO, &"y".repeat(255))
        .expect("255 characters fit");
    fs.create(ROOT_INO, "ünïcödé — ok").expect("unicode");
    fs.unlink(dir, "inner").expect("unlink");
    fs.rmdir(ROOT_INO, "dir").expect("rmdir");
    assert_eq!(fs.getattr(dir).map(|a| a.ino), Err(Errno::ENOENT));
    fs.inodes().check_consistent().expect("inodes");
    fs.close().expect("close");

    let mut read_only = FatFs::open(
        device.clone(),
        VolumeOptions {
            read_only: true,
            ..VolumeOptions::default()
        },
    )
    .expect("open read-only");
    let file = read_only.lookup(ROOT_INO, "file").expect("lookup").ino;
    assert_eq!(read_only.write(file, 0, b"x"), Err(Errno::EROFS));
    assert_eq!(
        read_only.create(ROOT_INO, "new").map(|a| a.ino),
        Err(Errno::EROFS)
    );
    let before = device.contents();
    read_only.close().expect("close");
    assert!(
        before == device.contents(),
        "a read-only volume was written"
    );
}

#[test]
fn running_out_of_space_is_enospc() {
    let device = MemDevice::new(formatted(1 << 20, FatType::Fat12));
    let mut fs = open(&device);
    let file = fs.create(ROOT_INO, "big").expect("create").ino;
    let chunk = vec![0x5a; 64 * 1024];
    let mut offset = 0;
    let error = loop {
        match fs.write(file, offset, &chunk) {
            Ok(n) => offset += n as u64,
            Err(e) => break e,
        }
        assert!(offset < 2 << 20, "wrote more than the volume holds");
    };
    assert_eq!(error, Errno::ENOSPC);
    let stats = fs.statfs().expect("statfs");
    assert_eq!(stats.free_clusters, 0);
    fs.unlink(ROOT_INO, "big").expect("unlink");
    assert!(fs.statfs().expect("statfs").free_clusters > 0);
    fs.close().expect("close");
    fsck_bytes(&device.contents());
}

#[test]
fn a_device_without_fat_is_refused_with_a_reason() {
    let error = FatFs::open(MemDevice::new(vec![0u8; 1 << 20]), VolumeOptions::default())
        .err()
        .expect("zeros are not FAT");
    assert!(error.contains("no FAT"), "{error}");
    assert!(FatFs::open(MemDevice::new(vec![0u8; 256]), VolumeOptions::default()).is_err());
}

#[test]
fn a_fat_partition_in_an_mbr_is_found() {
    let offset = 1 << 20;
    let volume = formatted(8 << 20, FatType::Fat16);
    let mut disk = vec![0u8; offset + volume.len()];
    disk[offset..].copy_from_slice(&volume);
    let entry = &mut disk[446..462];
    entry[4] = 0x0e;
    entry[8..12].copy_from_slice(&((offset / 512) as u32).to_le_bytes());
    entry[12..16].copy_from_slice(&((volume.len() / 512) as u32).to_le_bytes());
    disk[510] = 0x55;
    disk[511] = 0xaa;
    let device = MemDevice::new(disk);
    let mut fs = open(&device);
    assert_eq!(fs.placement().partition, Some(1));
    assert_eq!(fs.placement().offset, offset as u64);
    let file = fs.create(ROOT_INO, "in partition").expect("create").ino;
    fs.write(file, 0, b"data").expect("write");
    fs.close().expect("close");
    let tree = tree_from_fatfs(device.contents()[offset..].to_vec());
    assert_eq!(tree.get("in partition"), Some(&Some(b"data".to_vec())));
}

#[test]
fn images_made_by_mkfs_vfat_stay_fsck_clean() {
    if !dosfstools() {
        eprintln!("dosfstools is not installed: skipped");
        return;
    }
    for (bits, size_mib) in [("12", 4u64), ("16", 32), ("32", 64)] {
        let file = tempfile::NamedTempFile::new().expect("temp");
        file.as_file().set_len(size_mib << 20).expect("size");
        let status = Command::new("mkfs.vfat")
            .args(["-F", bits, "-n", "RING3TEST"])
            .arg(file.path())
            .output()
            .expect("mkfs.vfat");
        assert!(status.status.success(), "{status:?}");
        let device = FileDevice::open(file.path(), false, false).expect("open image");
        let mut fs = FatFs::open(device, VolumeOptions::default()).expect("open FAT");
        assert_eq!(fs.label(), "RING3TEST");
        let dir = fs.mkdir(ROOT_INO, "Some Directory").expect("mkdir").ino;
        let nested = fs.mkdir(dir, "nested").expect("mkdir").ino;
        for i in 0..40 {
            let f = fs
                .create(nested, &format!("file number {i}.dat"))
                .expect("create")
                .ino;
            fs.write(f, 0, &vec![i as u8; i * 1000]).expect("write");
        }
        fs.rename(dir, "nested", ROOT_INO, "moved up")
            .expect("move");
        for i in (0..40).step_by(3) {
            fs.unlink(nested, &format!("file number {i}.dat"))
                .expect("unlink");
        }
        fs.close().expect("close");
        fsck_clean(file.path());
        let tree = tree_from_fatfs(std::fs::read(file.path()).expect("read image"));
        assert_eq!(
            tree.get("moved up/file number 5.dat"),
            Some(&Some(vec![5u8; 5000]))
        );
        assert!(!tree.contains_key("moved up/file number 3.dat"));
    }
}

// ---- Random operation sequences against a model of the tree ----

#[derive(Debug, Clone)]
enum Op {
    Create(usize, usize),
    Mkdir(usize, usize),
    Write(usize, u16, u16, u8),
    Truncate(usize, u16),
    Unlink(usize),
    Rmdir(usize),
    Rename(usize, usize, usize),
    Sync,
    Reopen,
}

const NAMES: [&str; 6] = ["a", "b", "Long Name Number One.txt", "c.d", "x y z", "ünï"];

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (any::<usize>(), 0..NAMES.len()).prop_map(|(d, n)| Op::Create(d, n)),
        2 => (any::<usize>(), 0..NAMES.len()).prop_map(|(d, n)| Op::Mkdir(d, n)),
        4 => (any::<usize>(), 0u16..12_000, 0u16..6_000, any::<u8>()).prop_map(|(f, o, l, b)| Op::Write(f, o, l, b)),
        1 => (any::<usize>(), 0u16..12_000).prop_map(|(f, s)| Op::Truncate(f, s)),
        1 => any::<usize>().prop_map(Op::Unlink),
        1 => any::<usize>().prop_map(Op::Rmdir),
        3 => (any::<usize>(), any::<usize>(), 0..NAMES.len()).prop_map(|(s, d, n)| Op::Rename(s, d, n)),
        1 => Just(Op::Sync),
        1 => Just(Op::Reopen),
    ]
}

/// The model: path components → contents (`None`: directory). The root is `[]`.
type Model = BTreeMap<Vec<String>, Option<Vec<u8>>>;

fn pick(model: &Model, index: usize, want: Option<bool>) -> Option<Vec<String>> {
    let candidates: Vec<&Vec<String>> = model
        .iter()
        .filter(|(_, v)| match want {
            Some(true) => v.is_none(),
            Some(false) => v.is_some(),
            None => true,
        })
        .map(|(k, _)| k)
        .collect();
    if candidates.is_empty() {
        None
    } else {
        Some(candidates[index % candidates.len()].clone())
    }
}

fn ino_of(fs: &mut FatFs<MemDevice>, path: &[String]) -> Ino {
    ino(fs, &path.join("/"))
}

fn has_children(model: &Model, path: &[String]) -> bool {
    model
        .keys()
        .any(|k| k.len() == path.len() + 1 && k.starts_with(path))
}

fn run_ops(fat_type: FatType, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let device = image(fat_type);
    let mut fs = open(&device);
    let mut model = Model::new();
    model.insert(Vec::new(), None);
    for op in ops {
        match op {
            Op::Create(d, n) | Op::Mkdir(d, n) => {
                let dir = pick(&model, d, Some(true)).expect("root exists");
                let mut path = dir.clone();
                path.push(NAMES[n].to_string());
                let parent = ino_of(&mut fs, &dir);
                let is_dir = matches!(op, Op::Mkdir(..));
                let result = if is_dir {
                    fs.mkdir(parent, NAMES[n])
                } else {
                    fs.create(parent, NAMES[n])
                };
                let exists = model.contains_key(&path);
                if exists {
                    prop_assert_eq!(result.map(|a| a.ino), Err(Errno::EEXIST));
                } else {
                    prop_assert!(result.is_ok(), "{:?} {:?}: {:?}", op, path, result);
                }
                model
                    .entry(path)
                    .or_insert(if is_dir { None } else { Some(Vec::new()) });
            }
            Op::Write(f, offset, len, byte) => {
                let Some(path) = pick(&model, f, Some(false)) else {
                    continue;
                };
                let ino = ino_of(&mut fs, &path);
                let data = vec![byte; len as usize];
                prop_assert_eq!(fs.write(ino, u64::from(offset), &data), Ok(data.len()));
                let Some(Some(content)) = model.get_mut(&path) else {
                    unreachable!()
                };
                let end = offset as usize + data.len();
                if content.len() < end {
                    content.resize(end.max(content.len()), 0);
                }
                content[offset as usize..end].copy_from_slice(&data);
            }
            Op::Truncate(f, size) => {
                let Some(path) = pick(&model, f, Some(false)) else {
                    continue;
                };
                let ino = ino_of(&mut fs, &path);
                prop_assert_eq!(
                    fs.set_size(ino, u64::from(size)).map(|a| a.size),
                    Ok(u64::from(size))
                );
                let Some(Some(content)) = model.get_mut(&path) else {
                    unreachable!()
                };
                content.resize(size as usize, 0);
            }
            Op::Unlink(i) | Op::Rmdir(i) => {
                let Some(path) = pick(&model, i, None) else {
                    continue;
                };
                if path.is_empty() {
                    continue;
                }
                let (name, parent_path) = path.split_last().expect("not root");
                let parent = ino_of(&mut fs, parent_path);
                let is_dir = model[&path].is_none();
                let result = if matches!(op, Op::Unlink(_)) {
                    fs.unlink(parent, name)
                } else {
                    fs.rmdir(parent, name)
                };
                let expected = match (matches!(op, Op::Unlink(_)), is_dir) {
                    (true, true) => Err(Errno::EISDIR),
                    (false, false) => Err(Errno::ENOTDIR),
                    (false, true) if has_children(&model, &path) => Err(Errno::ENOTEMPTY),
                    _ => Ok(()),
                };
                prop_assert_eq!(result, expected, "{:?} {:?}", op, path);
                if expected.is_ok() {
                    model.remove(&path);
                }
            }
            Op::Rename(s, d, n) => {
                let Some(from) = pick(&model, s, None) else {
                    continue;
                };
                if from.is_empty() {
                    continue;
                }
                let to_dir = pick(&model, d, Some(true)).expect("root exists");
                let mut to = to_dir.clone();
                to.push(NAMES[n].to_string());
                let (from_name, from_parent) = from.split_last().expect("not root");
                let from_ino = ino_of(&mut fs, from_parent);
                let to_ino = ino_of(&mut fs, &to_dir);
                let moving_dir = model[&from].is_none();
                let expected = if moving_dir && to.starts_with(&from) && to != from {
                    Err(Errno::EINVAL)
                } else if to == from {
                    Ok(())
                } else {
                    match model.get(&to) {
                        None => Ok(()),
                        Some(None) if !moving_dir => Err(Errno::EISDIR),
                        Some(Some(_)) if moving_dir => Err(Errno::ENOTDIR),
                        Some(None) if has_children(&model, &to) => Err(Errno::ENOTEMPTY),
                        Some(_) => Ok(()),
                    }
                };
                let result = fs.rename(from_ino, from_name, to_ino, NAMES[n]);
                prop_assert_eq!(result, expected, "{:?} {:?} -> {:?}", op, from, to);
                if expected.is_ok() && to != from {
                    model.remove(&to);
                    let moved: Vec<(Vec<String>, Option<Vec<u8>>)> = model
                        .iter()
                        .filter(|(k, _)| k.starts_with(&from))
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect();
                    for (k, v) in moved {
                        model.remove(&k);
                        let mut new = to.clone();
                        new.extend(k[from.len()..].iter().cloned());
                        model.insert(new, v);
                    }
                }
            }
            Op::Sync => prop_assert_eq!(fs.sync(), Ok(())),
            Op::Reopen => {
                fs.close().expect("close");
                fs = open(&device);
            }
        }
        fs.inodes()
            .check_consistent()
            .map_err(TestCaseError::fail)?;
    }
    let expected: Tree = model
        .iter()
        .filter(|(k, _)| !k.is_empty())
        .map(|(k, v)| (k.join("/"), v.clone()))
        .collect();
    prop_assert_eq!(&tree_from_fatfs_ops(&mut fs), &expected);
    fs.close().expect("close");
    let bytes = device.contents();
    prop_assert_eq!(&tree_from_fatfs(bytes.clone()), &expected);
    fsck_bytes(&bytes);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn random_operations_match_the_model_fat12(ops in proptest::collection::vec(op(), 1..50)) {
        run_ops(FatType::Fat12, ops)?;
    }

    #[test]
    fn random_operations_match_the_model_fat16(ops in proptest::collection::vec(op(), 1..50)) {
        run_ops(FatType::Fat16, ops)?;
    }

    #[test]
    fn random_operations_match_the_model_fat32(ops in proptest::collection::vec(op(), 1..50)) {
        run_ops(FatType::Fat32, ops)?;
    }
}
