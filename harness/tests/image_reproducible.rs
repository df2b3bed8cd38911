//! The image we test is the image we ship: the build step links with the WDK's settings
//! where rust-lld accepts them, and the image depends on the sources only, not on where
//! the build machine keeps them.
#![cfg(all(target_arch = "x86_64", unix))]

use std::path::{Path, PathBuf};

use teredo_harness::{pe, sysbuild};

/// `IMAGE_DLLCHARACTERISTICS_*` of a wdk-build driver: `HIGH_ENTROPY_VA` (0x20),
/// `DYNAMIC_BASE` (0x40, `/DYNAMICBASE`), `FORCE_INTEGRITY` (0x80, `/INTEGRITYCHECK`),
/// `NX_COMPAT` (0x100, `/NXCOMPAT`).
const WDK_DLL_CHARACTERISTICS: u16 = 0x01E0;

fn sys() -> &'static [u8] {
    sysbuild::sys_image().unwrap_or_else(|e| panic!("the .sys must build: {e}"))
}

#[test]
fn dll_characteristics_are_those_of_a_wdk_build() {
    let facts = pe::facts(sys()).expect("parses");
    assert_eq!(
        facts.dll_characteristics, WDK_DLL_CHARACTERISTICS,
        "{:#06x}: /INTEGRITYCHECK sets FORCE_INTEGRITY (0x80)",
        facts.dll_characteristics
    );
    assert_eq!(
        facts.checksum_stored, facts.checksum_computed,
        "/RELEASE: a valid checksum, which FORCE_INTEGRITY images need for signing"
    );
}

/// Copies the repository's files (not `.git`, no `target` directory) from `from` to `to`.
fn copy_sources(from: &Path, to: &Path) -> std::io::Result<u64> {
    std::fs::create_dir_all(to)?;
    let mut files = 0;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let name = entry.file_name();
        if name == ".git" || name == "target" {
            continue;
        }
        let kind = entry.file_type()?;
        if kind.is_dir() {
            files += copy_sources(&entry.path(), &to.join(&name))?;
        } else if kind.is_file() {
            std::fs::copy(entry.path(), to.join(&name))?;
            files += 1;
        }
    }
    Ok(files)
}

/// The offsets where `a` and `b` differ (the first few), and how many bytes differ.
fn differences(a: &[u8], b: &[u8]) -> (Vec<usize>, usize) {
    let differing: Vec<usize> = (0..a.len().max(b.len()))
        .filter(|&i| a.get(i) != b.get(i))
        .collect();
    let count = differing.len();
    (differing.into_iter().take(8).collect(), count)
}

fn contains(haystack: &[u8], needle: &Path) -> bool {
    let needle = needle.as_os_str().as_encoded_bytes();
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn a_clone_at_another_path_builds_a_byte_identical_image_without_build_paths() {
    let root = sysbuild::repository_root();
    let ours = sys();
    // Another clone: a path of another length, another parent, the same files.
    let temp = TempDir(std::env::temp_dir().join(format!(
        "teredo-harness-reproducible-{}",
        std::process::id()
    )));
    let clone = temp.0.join("elsewhere/another-clone-of-teredo-watcher");
    let files = copy_sources(&root, &clone).expect("copy the sources");
    assert!(files > 20, "copied {files} files: the sources are there");
    let built = sysbuild::build_in(&clone, &temp.0.join("target"), sysbuild::Variant::Release)
        .unwrap_or_else(|e| panic!("the clone builds: {e}"));
    let theirs = std::fs::read(&built).expect("read the clone's image");

    let (offsets, count) = differences(ours, &theirs);
    assert_eq!(
        count,
        0,
        "{count} bytes differ (first at {offsets:#x?}); sizes {} and {}",
        ours.len(),
        theirs.len()
    );
    let home = std::env::var_os("HOME").map(PathBuf::from);
    let paths = [
        Some(root.clone()),
        Some(clone.clone()),
        Some(temp.0.clone()),
        Some(sysbuild::cargo_home()),
        Some(PathBuf::from(sysbuild::BUILD_ROOT)),
        home,
    ];
    let mut checked = 0;
    for path in paths.iter().flatten() {
        assert!(
            !contains(ours, path) && !contains(&theirs, path),
            "the image contains the build machine's path {}",
            path.display()
        );
        checked += 1;
    }
    assert!(
        checked >= 4,
        "the repository, the clone, the temp dir, the cargo home"
    );
    assert!(
        contains(ours, Path::new(sysbuild::REMAPPED_ROOT)),
        "the library's panic locations name the remapped root instead"
    );
}
