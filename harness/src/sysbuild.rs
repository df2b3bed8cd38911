//! Builds the example driver into a PE `.sys` with `rust-lld`, in this build step only.
//!
//! The Windows flow (cargo-make / `cargo wdk build` on a Windows host) gets its linker setup
//! from `wdk-build`. None of the settings below are written to any `.cargo/config.toml`:
//! they are passed on this one command line, with `--no-default-features --features
//! kernel-shim,firewall` (no windows-drivers-rs crate in the graph; the driver programs WFP
//! through `fwpkclnt.sys`), into a target directory of the harness's own.
//!
//! The image depends on the sources only: the build reads them through [`BUILD_ROOT`] and
//! remaps that path and the cargo home in file names ([`rustflags_in`]), so two clones at
//! different paths build the same bytes (`tests/image_reproducible.rs`).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The Windows target the driver is built for.
pub const TARGET: &str = "x86_64-pc-windows-msvc";

/// The linker arguments of a kernel-mode driver image: those `wdk-build`'s
/// `configure_wdk_binary_build` passes for a WDM driver, in its order, then `/RELEASE`.
///
/// rust-lld accepts all of them. `/KERNEL` has no effect there (MSVC's link checks that
/// every object was compiled with `/kernel`; rustc objects never are, hence `/IGNORE:4257`
/// in the WDK flow); `/MAP` writes `teredo_monitor.map` beside the image. The last three are
/// ours: `/RELEASE` writes the PE checksum (the WDK's `MSBuild` targets set one for drivers);
/// `/Brepro` stamps the header with a hash of the content instead of the time of the link;
/// `/DEBUG:NONE` writes no PDB, so the image has no debug directory, whose signature would
/// hash the target directory's paths.
pub const LINK_ARGS: [&str; 17] = [
    "/DRIVER",
    "/NODEFAULTLIB",
    "/SUBSYSTEM:NATIVE",
    "/KERNEL",
    "/ENTRY:DriverEntry",
    "/IGNORE:4257",
    "/IGNORE:4216",
    "/NXCOMPAT",
    "/DYNAMICBASE",
    "/MAP",
    "/MAPINFO:EXPORTS",
    "/OPT:REF,ICF",
    "/INTEGRITYCHECK",
    "/MANIFEST:NO",
    "/RELEASE",
    "/Brepro",
    "/DEBUG:NONE",
];

/// The fixed path every build of the image reads its sources through: a symbolic link to
/// the clone being built, re-pointed under [`BUILD_ROOT_LOCK`].
///
/// Cargo hashes the absolute path of a path dependency that lies outside the building
/// workspace into its `-C metadata` (here the library, `../..` from the driver's own
/// workspace); that hash reaches every symbol name and so the order of the functions in the
/// image. Through one fixed path, clones anywhere on the machine build the same bytes.
pub const BUILD_ROOT: &str = "/tmp/teredo-harness-src";
/// The lock file that serializes builds through [`BUILD_ROOT`].
pub const BUILD_ROOT_LOCK: &str = "/tmp/teredo-harness-src.lock";

/// What the source root is called in the image (panic locations, for instance) instead of
/// its absolute path on the build machine.
pub const REMAPPED_ROOT: &str = "teredo-watcher";
/// What the cargo home (registry sources) is called in the image.
pub const REMAPPED_CARGO_HOME: &str = "cargo-home";

/// Which image to build.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    /// The release profile, as the Windows flow builds it.
    Release,
    /// The release profile with debug assertions on: the library's IRQL checks then panic,
    /// and the panic handler bugchecks (exercises the shim's panic path in the real image).
    DebugAssertions,
    /// The release image with the driver's own log compiled out (the logic crate's
    /// `no-log` feature): what the library and the driver's code cost without it
    /// (`kernel-box --sizes`). Not run by any scenario: the driver is silent.
    NoLog,
    /// `examples/teredo-port-monitor`: the C reference driver's job (monitor the port, log,
    /// the classify exports) on the library's `StaticTeredoWatcher`, the image whose size is
    /// compared with the C driver's (`kernel-box --sizes`, `tests/port_monitor.rs`).
    PortMonitor,
}

impl Variant {
    fn dir(self) -> &'static str {
        match self {
            Variant::Release => "release",
            Variant::DebugAssertions => "debug-assertions",
            Variant::NoLog => "no-log",
            Variant::PortMonitor => "port-monitor",
        }
    }

    /// The package's manifest, relative to the repository root.
    fn manifest(self) -> &'static str {
        match self {
            Variant::PortMonitor => "examples/teredo-port-monitor/Cargo.toml",
            _ => "examples/teredo-monitor/Cargo.toml",
        }
    }

    /// The features of the build (all with `--no-default-features`).
    fn features(self) -> &'static str {
        match self {
            Variant::NoLog => "kernel-shim,firewall,teredo-monitor-logic/no-log",
            // A single-platform crate: it has no features.
            Variant::PortMonitor => "",
            Variant::Release | Variant::DebugAssertions => "kernel-shim,firewall",
        }
    }

    /// The file the link writes (the crate's name; cdylibs end in `.dll`) and the name the
    /// harness gives the image.
    fn image_names(self) -> (&'static str, &'static str) {
        match self {
            Variant::PortMonitor => ("teredo_port_monitor.dll", "teredo_port_monitor.sys"),
            _ => ("teredo_monitor.dll", "teredo_monitor.sys"),
        }
    }
}

/// The repository root (the harness lives in `harness/`).
#[must_use]
pub fn repository_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// Where the nested build puts its output: `TEREDO_HARNESS_SYS_TARGET_DIR` at run time if
/// set, else the directory the build script chose beside this build's target directory.
#[must_use]
pub fn target_dir() -> PathBuf {
    std::env::var_os("TEREDO_HARNESS_SYS_TARGET_DIR").map_or_else(
        || PathBuf::from(env!("TEREDO_HARNESS_SYS_TARGET_DIR")),
        PathBuf::from,
    )
}

/// The `cargo` command line that builds the release `.sys`, without the program name.
#[must_use]
pub fn cargo_args() -> Vec<String> {
    cargo_args_for(Variant::Release)
}

/// The `cargo` command line that builds `variant`, without the program name.
#[must_use]
pub fn cargo_args_for(variant: Variant) -> Vec<String> {
    cargo_args_in(Path::new(BUILD_ROOT), variant)
}

/// `$CARGO_HOME`, else `$HOME/.cargo` (where cargo keeps registry sources).
#[must_use]
pub fn cargo_home() -> PathBuf {
    std::env::var_os("CARGO_HOME").map_or_else(
        || {
            std::env::var_os("HOME").map_or_else(
                || PathBuf::from(".cargo"),
                |h| PathBuf::from(h).join(".cargo"),
            )
        },
        PathBuf::from,
    )
}

/// `s` as a TOML basic string.
fn toml_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The rustc flags of the driver build from the sources at `root`: lld-link, the static
/// CRT (as the Windows flow's `.cargo/config.toml` sets it), [`LINK_ARGS`], and the path
/// remappings that keep the build machine's paths out of the image.
#[must_use]
pub fn rustflags_in(root: &Path) -> Vec<String> {
    [
        "-Clinker-flavor=lld-link".to_owned(),
        "-Ctarget-feature=+crt-static".to_owned(),
    ]
    .into_iter()
    .chain(LINK_ARGS.iter().map(|a| format!("-Clink-arg={a}")))
    .chain([
        format!("--remap-path-prefix={}={REMAPPED_ROOT}", root.display()),
        format!(
            "--remap-path-prefix={}={REMAPPED_CARGO_HOME}",
            cargo_home().display()
        ),
    ])
    .collect()
}

/// The `cargo` command line that builds `variant` from the sources at `root` (a clone of
/// this repository, or [`BUILD_ROOT`] pointing to one), without the program name.
#[must_use]
pub fn cargo_args_in(root: &Path, variant: Variant) -> Vec<String> {
    let manifest = root.join(variant.manifest());
    let rustflags = rustflags_in(root)
        .iter()
        .map(|f| toml_string(f))
        .collect::<Vec<_>>()
        .join(",");
    [
        "build",
        "--quiet",
        "--release",
        "--lib",
        "--manifest-path",
        &manifest.display().to_string(),
        "--target",
        TARGET,
        "--no-default-features",
        // `firewall`: the driver programs WFP through fwpkclnt.sys (the example's default
        // with wdk), so the image imports the filter engine the harness models.
        "--features",
        variant.features(),
        "--config",
        &format!("target.{TARGET}.linker=\"rust-lld\""),
        "--config",
        &format!("target.{TARGET}.rustflags=[{rustflags}]"),
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .chain(
        (variant == Variant::DebugAssertions)
            .then(|| {
                [
                    "--config".to_owned(),
                    "profile.release.debug-assertions=true".to_owned(),
                ]
            })
            .into_iter()
            .flatten(),
    )
    .collect()
}

/// Adds the Windows target with `rustup` when it is missing, so that the main job stays one
/// command on a fresh clone. Without `rustup` nothing happens (the build then says what is
/// missing).
fn ensure_target() {
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output();
    if let Ok(output) = installed
        && output.status.success()
        && !String::from_utf8_lossy(&output.stdout)
            .lines()
            .any(|l| l.trim() == TARGET)
    {
        eprintln!("kernel-box: rustup target add {TARGET}");
        let _ = Command::new("rustup")
            .args(["target", "add", TARGET])
            .status();
    }
}

/// Runs the nested build and copies the image to `<target dir>/teredo_monitor.sys`.
///
/// # Errors
///
/// The build's own output when it fails, or the I/O error.
pub fn build_sys() -> Result<PathBuf, String> {
    build_variant(Variant::Release)
}

/// Builds `variant` (each in a target directory of its own, so that switching does not
/// rebuild) and copies the image to `<its target dir>/teredo_monitor.sys` (or
/// `teredo_port_monitor.sys` for [`Variant::PortMonitor`]).
///
/// # Errors
///
/// The build's own output when it fails, or the I/O error.
pub fn build_variant(variant: Variant) -> Result<PathBuf, String> {
    build_in(
        &repository_root(),
        &target_dir().join(variant.dir()),
        variant,
    )
}

/// Builds `variant` from the sources at `root` into `target_dir` with the same command as
/// [`build_variant`], and copies the image to `<target_dir>/teredo_monitor.sys` (or
/// `teredo_port_monitor.sys`).
///
/// # Errors
///
/// The build's own output when it fails, or the I/O error.
pub fn build_in(root: &Path, target_dir: &Path, variant: Variant) -> Result<PathBuf, String> {
    ensure_target();
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(BUILD_ROOT_LOCK)
        .map_err(|e| format!("opening {BUILD_ROOT_LOCK}: {e}"))?;
    // Held until this function returns (the file closes): nobody re-points the link while
    // cargo reads through it.
    lock.lock()
        .map_err(|e| format!("locking {BUILD_ROOT_LOCK}: {e}"))?;
    point_build_root(root)?;
    forget_other_roots(root, target_dir)?;
    let build_root = Path::new(BUILD_ROOT);
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let output = Command::new(cargo)
        .args(cargo_args_in(build_root, variant))
        .current_dir(build_root)
        .env("CARGO_TARGET_DIR", target_dir)
        // The outer build's flags and wrappers (clippy's, coverage's) are not this build's.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("CARGO_BUILD_TARGET")
        .output()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "building the .sys failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    let (linked, image) = variant.image_names();
    let built = target_dir.join(TARGET).join("release").join(linked);
    let sys = target_dir.join(image);
    std::fs::copy(&built, &sys).map_err(|e| format!("copying {}: {e}", built.display()))?;
    Ok(sys)
}

/// Makes [`BUILD_ROOT`] a symbolic link to `root` (the caller holds [`BUILD_ROOT_LOCK`]).
fn point_build_root(root: &Path) -> Result<(), String> {
    let link = Path::new(BUILD_ROOT);
    let root = root
        .canonicalize()
        .map_err(|e| format!("{}: {e}", root.display()))?;
    match std::fs::symlink_metadata(link) {
        Ok(meta) if meta.file_type().is_symlink() => {
            if std::fs::read_link(link).is_ok_and(|target| target == root) {
                return Ok(());
            }
            std::fs::remove_file(link).map_err(|e| format!("removing {BUILD_ROOT}: {e}"))?;
        }
        Ok(_) => return Err(format!("{BUILD_ROOT} exists and is not a symbolic link")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("{BUILD_ROOT}: {e}")),
    }
    std::os::unix::fs::symlink(&root, link)
        .map_err(|e| format!("linking {BUILD_ROOT} to {}: {e}", root.display()))
}

/// Empties `target_dir` when it was last built from another root than `root`.
///
/// Cargo sees every clone under the same path ([`BUILD_ROOT`]) and decides freshness by
/// modification times: a target directory built from one clone could take another clone's
/// older files for unchanged. The file `source-root` in it names the clone it was built
/// from.
fn forget_other_roots(root: &Path, target_dir: &Path) -> Result<(), String> {
    let marker = target_dir.join("source-root");
    let root = root
        .canonicalize()
        .map_err(|e| format!("{}: {e}", root.display()))?;
    let wanted = root.as_os_str().as_encoded_bytes();
    match std::fs::read(&marker) {
        Ok(built_from) if built_from == wanted => return Ok(()),
        Ok(_) => std::fs::remove_dir_all(target_dir)
            .map_err(|e| format!("emptying {}: {e}", target_dir.display()))?,
        Err(_) => {}
    }
    std::fs::create_dir_all(target_dir)
        .and_then(|()| std::fs::write(&marker, wanted))
        .map_err(|e| format!("writing {}: {e}", marker.display()))
}

/// The `.sys`, built once per process.
///
/// # Errors
///
/// As [`build_sys`]; the same error is returned to every caller.
pub fn sys_image() -> Result<&'static [u8], String> {
    static IMAGE: OnceLock<Result<Vec<u8>, String>> = OnceLock::new();
    IMAGE
        .get_or_init(|| {
            let path = build_sys()?;
            std::fs::read(&path).map_err(|e| format!("reading {}: {e}", path.display()))
        })
        .as_deref()
        .map_err(Clone::clone)
}

/// The port monitor's `.sys` ([`Variant::PortMonitor`]), built once per process.
///
/// # Errors
///
/// As [`build_variant`]; the same error is returned to every caller.
pub fn port_monitor_image() -> Result<&'static [u8], String> {
    static IMAGE: OnceLock<Result<Vec<u8>, String>> = OnceLock::new();
    IMAGE
        .get_or_init(|| {
            let path = build_variant(Variant::PortMonitor)?;
            std::fs::read(&path).map_err(|e| format!("reading {}: {e}", path.display()))
        })
        .as_deref()
        .map_err(Clone::clone)
}

/// The `.sys` with debug assertions on ([`Variant::DebugAssertions`]), built once per
/// process.
///
/// # Errors
///
/// As [`build_variant`].
pub fn debug_assertions_image() -> Result<&'static [u8], String> {
    static IMAGE: OnceLock<Result<Vec<u8>, String>> = OnceLock::new();
    IMAGE
        .get_or_init(|| {
            let path = build_variant(Variant::DebugAssertions)?;
            std::fs::read(&path).map_err(|e| format!("reading {}: {e}", path.display()))
        })
        .as_deref()
        .map_err(Clone::clone)
}

/// The compiler of the C reference driver (`examples/c-reference/build.sh`).
pub const MINGW_GCC: &str = "x86_64-w64-mingw32-gcc";

/// Whether the C reference driver can be built here: the build script found [`MINGW_GCC`]
/// when this crate was compiled (cfg `teredo_harness_mingw`).
pub const MINGW_AVAILABLE: bool = cfg!(teredo_harness_mingw);

/// Builds the C reference driver (`examples/c-reference/`) with its `build.sh` into
/// `<target dir>/c-reference/` and returns the path of `teredo_reference.sys`.
///
/// # Errors
///
/// The script's output when it fails (exit status 127: [`MINGW_GCC`] is missing), or the
/// I/O error.
pub fn build_c_reference() -> Result<PathBuf, String> {
    let out = target_dir().join("c-reference");
    let script = repository_root().join("examples/c-reference/build.sh");
    let output = Command::new("bash")
        .arg(&script)
        .arg(&out)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    if !output.status.success() {
        return Err(format!(
            "building the C reference driver failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(out.join("teredo_reference.sys"))
}

/// The C reference driver's image, built once per process.
///
/// # Errors
///
/// As [`build_c_reference`].
pub fn c_reference_image() -> Result<&'static [u8], String> {
    static IMAGE: OnceLock<Result<Vec<u8>, String>> = OnceLock::new();
    IMAGE
        .get_or_init(|| {
            let path = build_c_reference()?;
            std::fs::read(&path).map_err(|e| format!("reading {}: {e}", path.display()))
        })
        .as_deref()
        .map_err(Clone::clone)
}

/// The sizes of a PE image, as `kernel-box --sizes` reports them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageSizes {
    /// The file, in bytes.
    pub file: usize,
    /// Code: the virtual sizes of the executable sections (`.text`, and `PAGE`/`INIT` when
    /// the image has them).
    pub code: u64,
    /// Everything else the sections hold (read-only data, unwind tables, relocations,
    /// imports and exports), by virtual size.
    pub other_sections: u64,
}

/// The sizes of the PE image `bytes`.
///
/// # Errors
///
/// When `bytes` is not a PE image.
pub fn image_sizes(bytes: &[u8]) -> Result<ImageSizes, String> {
    /// `IMAGE_SCN_MEM_EXECUTE`.
    const EXECUTE: u32 = 0x2000_0000;
    let pe = goblin::pe::PE::parse(bytes).map_err(|e| format!("not a PE image: {e}"))?;
    let (mut code, mut other_sections) = (0, 0);
    for section in &pe.sections {
        if section.characteristics & EXECUTE != 0 {
            code += u64::from(section.virtual_size);
        } else {
            other_sections += u64::from(section.virtual_size);
        }
    }
    Ok(ImageSizes {
        file: bytes.len(),
        code,
        other_sections,
    })
}
