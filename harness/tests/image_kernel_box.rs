//! `kernel-box --image`: the main job's scenario on an image given by path, with every check
//! holding, on our own `.sys` and on the C reference driver (`examples/c-reference/`, built
//! with mingw-w64: a driver the harness was not fitted to; ignored, with the reason, without
//! `x86_64-w64-mingw32-gcc`); and a file that is no image fails the job.
#![cfg(all(target_arch = "x86_64", unix))]

use std::path::Path;
use std::process::Command;

use teredo_harness::sysbuild;

/// Fewer checks than this and the scenario was cut short (a foreign image gets 20 today).
const FLOOR: usize = 15;

/// Runs `kernel-box --image path`; returns the exit success, the `N of M` counts, and the
/// output.
fn kernel_box(path: &Path) -> (bool, usize, usize, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_kernel-box"))
        .arg("--image")
        .arg(path)
        .output()
        .expect("kernel-box runs");
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    let last = text
        .lines()
        .find_map(|l| l.strip_prefix("kernel-box: "))
        .unwrap_or_else(|| panic!("no summary line:\n{text}"));
    let mut numbers = last
        .split(' ')
        .take(3)
        .filter_map(|w| w.parse::<usize>().ok());
    let (Some(held), Some(total)) = (numbers.next(), numbers.next()) else {
        panic!("summary line without counts: {last}");
    };
    (output.status.success(), held, total, text)
}

fn assert_all_hold(path: &Path) -> String {
    let (success, held, total, text) = kernel_box(path);
    assert!(
        success && held == total,
        "{held} of {total} checks hold:\n{text}"
    );
    assert!(total >= FLOOR, "only {total} checks ran:\n{text}");
    let name = path.file_name().expect("a file").to_string_lossy();
    let size = std::fs::metadata(path).expect("exists").len();
    assert!(
        text.contains(&format!("{name}: {size} bytes, entry point RVA 0x")),
        "the output names the image: {text}"
    );
    text
}

#[test]
fn kernel_box_runs_our_sys_given_as_an_image_with_every_check_holding() {
    let path = sysbuild::build_sys().unwrap_or_else(|e| panic!("{e}"));
    let text = assert_all_hold(&path);
    assert!(
        text.contains("teredo-monitor: "),
        "its own DbgPrint output: {text}"
    );
}

#[test]
fn kernel_box_fails_on_an_image_that_is_not_a_driver() {
    let dir = std::env::temp_dir().join(format!("kernel-box-not-a-driver-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("not-a-driver.sys");
    std::fs::write(&path, b"MZ but nothing else").expect("write");
    let output = Command::new(env!("CARGO_BIN_EXE_kernel-box"))
        .arg("--image")
        .arg(&path)
        .output()
        .expect("kernel-box runs");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!output.status.success(), "a non-image must fail the job");
}

#[test]
#[cfg_attr(
    not(teredo_harness_mingw),
    ignore = "needs x86_64-w64-mingw32-gcc (apt-get install gcc-mingw-w64-x86-64)"
)]
fn kernel_box_runs_the_c_reference_driver_with_every_check_holding() {
    let path = sysbuild::build_c_reference().unwrap_or_else(|e| panic!("{e}"));
    let text = assert_all_hold(&path);
    assert!(
        text.contains("classify ran between every two restarts"),
        "the reader ran against the C driver's export: {text}"
    );
    assert!(
        text.contains("teredo-reference: "),
        "its own DbgPrintEx output: {text}"
    );
}
