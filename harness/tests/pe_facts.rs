//! The PE facts a Windows loader relies on, checked on the `.sys` the build produces.
#![cfg(all(target_arch = "x86_64", unix))]

use std::collections::BTreeSet;

use teredo_harness::loader::{self, LoadError};
use teredo_harness::{kernel, pe, sysbuild};

fn sys() -> &'static [u8] {
    sysbuild::sys_image().unwrap_or_else(|e| panic!("the .sys must build: {e}"))
}

const NETIO: [&str; 3] = [
    "CancelMibChangeNotify2",
    "GetTeredoPort",
    "NotifyTeredoPortChange",
];

#[test]
fn the_image_is_an_amd64_native_driver_entered_at_driver_entry() {
    let facts = pe::facts(sys()).expect("parses");
    assert_eq!(facts.machine, pe::MACHINE_AMD64);
    assert!(facts.is_64, "PE32+");
    assert_eq!(facts.subsystem, pe::SUBSYSTEM_NATIVE);
    assert_eq!(
        facts.entry_names,
        ["DriverEntry"],
        "the entry point is DriverEntry"
    );
    assert_ne!(facts.checksum_stored, 0, "/RELEASE writes a checksum");
    assert_eq!(
        facts.checksum_stored, facts.checksum_computed,
        "valid checksum"
    );
    assert!(
        facts.has_relocations,
        "relocatable: the kernel picks the base"
    );
    assert_ne!(facts.dll_characteristics & 0x0040, 0, "DYNAMIC_BASE");
}

#[test]
fn netio_functions_come_from_netio_sys_the_filter_engine_from_fwpkclnt_and_the_rest_from_ntoskrnl()
{
    let facts = pe::facts(sys()).expect("parses");
    let modules: BTreeSet<&str> = facts.modules().into_iter().collect();
    assert_eq!(
        modules,
        BTreeSet::from(["fwpkclnt.sys", "netio.sys", "ntoskrnl.exe"]),
        "no iphlpapi.dll, no fwpuclnt.dll, no user-mode DLL"
    );
    // The filter engine's management calls from the kernel-mode client library, each one
    // the model binds.
    let engine = facts.imports_of("fwpkclnt.sys");
    for name in [
        "FwpmEngineOpen0",
        "FwpmEngineClose0",
        "FwpmTransactionBegin0",
        "FwpmTransactionCommit0",
        "FwpmTransactionAbort0",
        "FwpmFilterAdd0",
        "FwpmFilterDeleteById0",
    ] {
        assert!(engine.contains(&name), "fwpkclnt.sys!{name} imported");
    }
    assert!(
        engine
            .iter()
            .all(|n| teredo_harness::kernel::resolve("fwpkclnt.sys", n).is_some()),
        "every filter-engine import is modelled: {engine:?}"
    );
    let netio: BTreeSet<&str> = facts.imports_of("netio.sys").into_iter().collect();
    assert_eq!(netio, BTreeSet::from(NETIO));
    let ntoskrnl = facts.imports_of("ntoskrnl.exe");
    for name in [
        "KeGetCurrentIrql",
        "KeAcquireSpinLockRaiseToDpc",
        "KeReleaseSpinLock",
        "PsGetCurrentThreadId",
        "KeInitializeEvent",
        "KeSetEvent",
        "KeClearEvent",
        "KeWaitForSingleObject",
        "ExAllocatePool2",
        "ExFreePoolWithTag",
        "KeBugCheckEx",
        "DbgPrint",
    ] {
        assert!(ntoskrnl.contains(&name), "ntoskrnl.exe!{name} imported");
    }
    assert!(NETIO.iter().all(|n| !ntoskrnl.contains(n)));
}

#[test]
fn the_checksum_detects_a_changed_byte() {
    let mut bytes = sys().to_vec();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x5A;
    let facts = pe::facts(&bytes).expect("parses");
    assert_ne!(facts.checksum_stored, facts.checksum_computed);
}

#[test]
fn an_unresolved_import_fails_the_load_with_its_module_and_name() {
    let without_get_port = |module: &str, name: &str| {
        if name == "GetTeredoPort" {
            None
        } else {
            kernel::resolve(module, name)
        }
    };
    let error = loader::load(sys(), &without_get_port).expect_err("must not load");
    assert_eq!(
        error,
        LoadError::UnresolvedImports(vec![("netio.sys".into(), "GetTeredoPort".into())])
    );
    assert!(error.to_string().contains("netio.sys!GetTeredoPort"));
}

#[test]
fn the_linker_settings_stay_out_of_every_cargo_config() {
    let root = sysbuild::repository_root();
    for config in [
        ".cargo/config.toml",
        "examples/teredo-monitor/.cargo/config.toml",
    ] {
        let Ok(text) = std::fs::read_to_string(root.join(config)) else {
            continue;
        };
        for setting in [
            "lld-link",
            "/DRIVER",
            "/NODEFAULTLIB",
            "rust-lld",
            "kernel-shim",
        ] {
            assert!(
                !text.contains(setting),
                "{config} mentions {setting}: the Windows/WDK flow would pick it up"
            );
        }
    }
    // The build step passes them on its own command line only.
    let args = sysbuild::cargo_args().join(" ");
    assert!(
        args.contains("/DRIVER") && args.contains("kernel-shim"),
        "{args}"
    );
}
