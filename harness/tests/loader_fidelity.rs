//! The loader accepts what the Windows loader accepts: the example driver's `.sys`, edited
//! in place into the shapes a C driver built with GNU ld takes (module names in capitals,
//! no base relocation directory, no `DriverEntry` export), loads and runs.
#![cfg(all(target_arch = "x86_64", unix))]

use core::ffi::c_void;
use std::sync::{Mutex, PoisonError};

use goblin::pe::PE;
use teredo_harness::kernel::{self, PASSIVE_LEVEL};
use teredo_harness::loader::LoadError;
use teredo_harness::{Machine, sysbuild};

/// Held by each test that maps something at the image's preferred base: one of them
/// occupies that range on purpose, which must not fail another's load.
static PREFERRED_BASE: Mutex<()> = Mutex::new(());

fn sys() -> Vec<u8> {
    sysbuild::sys_image()
        .unwrap_or_else(|e| panic!("the .sys must build: {e}"))
        .to_vec()
}

/// The file offset of `rva`.
fn offset_of(pe: &PE<'_>, rva: u32) -> usize {
    let section = pe
        .sections
        .iter()
        .find(|s| (s.virtual_address..s.virtual_address + s.size_of_raw_data).contains(&rva))
        .unwrap_or_else(|| panic!("RVA {rva:#x} is in no section's file data"));
    (rva - section.virtual_address + section.pointer_to_raw_data) as usize
}

/// The file offset of `e_lfanew`'s optional header.
fn optional_header(bytes: &[u8]) -> usize {
    let lfanew = u32::from_le_bytes(bytes[0x3C..0x40].try_into().expect("4 bytes")) as usize;
    lfanew + 4 + 20
}

/// Rewrites every import module name in capitals (`NETIO.SYS`, `NTOSKRNL.EXE`), as mingw
/// writes them. Returns the names as they now read.
fn capitalise_import_modules(bytes: &mut [u8]) -> Vec<String> {
    let offsets: Vec<usize> = {
        let pe = PE::parse(bytes).expect("parses");
        let imports = pe.import_data.as_ref().expect("an import directory");
        imports
            .import_data
            .iter()
            .map(|entry| offset_of(&pe, entry.import_directory_entry.name_rva))
            .collect()
    };
    assert!(offsets.len() >= 2, "netio.sys and ntoskrnl.exe");
    for at in &offsets {
        let end = at + bytes[*at..].iter().position(|b| *b == 0).expect("NUL");
        bytes[*at..end].make_ascii_uppercase();
    }
    let pe = PE::parse(bytes).expect("parses");
    let mut modules: Vec<String> = pe.imports.iter().map(|i| i.dll.to_owned()).collect();
    modules.dedup();
    modules
}

/// Empties the base relocation directory entry, as GNU ld leaves an image with nothing to
/// relocate.
fn drop_relocation_directory(bytes: &mut [u8]) {
    // PE32+: the data directories start 112 bytes into the optional header; entry 5 is the
    // base relocation table (RVA, size).
    let entry = optional_header(bytes) + 112 + 5 * 8;
    bytes[entry..entry + 8].fill(0);
}

/// Renames the export `DriverEntry` (a C driver exports nothing) to `DriverEntrX`.
fn hide_driver_entry_export(bytes: &mut [u8]) {
    let at = {
        let pe = PE::parse(bytes).expect("parses");
        let exports = pe.export_data.as_ref().expect("an export directory");
        exports
            .export_name_pointer_table
            .iter()
            .map(|rva| offset_of(&pe, *rva))
            .find(|at| bytes[*at..].starts_with(b"DriverEntry\0"))
            .expect("the export DriverEntry")
    };
    bytes[at + 10] = b'X';
}

/// `DriverEntry`, a client start, `DriverUnload`: the driver registers, is notified and
/// cancels, on the model's records.
fn runs_the_scenario(machine: &Machine) {
    assert_eq!(
        machine.driver_entry(),
        Ok(0),
        "{:?}",
        kernel::debugger_output()
    );
    let registered = kernel::netio_stats();
    assert_eq!(registered.live.len(), 1, "one registration");
    assert_eq!(registered.delivered, 1, "the initial notification");
    let port = machine
        .on_cpu("client start", PASSIVE_LEVEL, kernel::client::start)
        .expect("no stop");
    assert_ne!(port, 0);
    assert_eq!(
        kernel::netio_stats().delivered,
        2,
        "the change reached the image"
    );
    assert_eq!(machine.driver_unload(), Ok(true));
    let after = kernel::netio_stats();
    assert!(after.live.is_empty(), "unload cancelled: {after:?}");
    assert!(
        kernel::pool_stats().balanced(),
        "{:?}",
        kernel::pool_stats()
    );
    assert_eq!(kernel::stopped(), None);
}

#[test]
fn module_names_in_capitals_bind_like_lowercase_ones() {
    let mut bytes = sys();
    let modules = capitalise_import_modules(&mut bytes);
    assert!(modules.contains(&"NETIO.SYS".to_owned()), "{modules:?}");
    assert!(modules.contains(&"NTOSKRNL.EXE".to_owned()), "{modules:?}");
    let machine = Machine::boot(&bytes, false).unwrap_or_else(|e| panic!("loads: {e}"));
    assert!(machine.image().imports_bound() >= 8);
    runs_the_scenario(&machine);
}

#[test]
fn an_unresolved_import_is_reported_as_the_image_spells_its_module() {
    let mut bytes = sys();
    capitalise_import_modules(&mut bytes);
    let error = teredo_harness::loader::load(&bytes, &|module, name| {
        (module != "netio.sys" || name != "GetTeredoPort")
            .then(|| kernel::resolve(module, name))
            .flatten()
    })
    .expect_err("GetTeredoPort unresolved");
    assert_eq!(
        error,
        LoadError::UnresolvedImports(vec![("NETIO.SYS".into(), "GetTeredoPort".into())])
    );
}

#[test]
fn an_image_without_relocations_loads_at_its_preferred_base_or_fails_clearly() {
    let _base = PREFERRED_BASE
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    let mut bytes = sys();
    drop_relocation_directory(&mut bytes);
    let preferred = PE::parse(&bytes).expect("parses").image_base;

    let machine = Machine::boot(&bytes, false).unwrap_or_else(|e| panic!("loads: {e}"));
    assert!(machine.image().at_preferred_base());
    assert_eq!(machine.image().base() as u64, preferred);
    assert_eq!(machine.image().relocations_applied(), 0);
    runs_the_scenario(&machine);
    drop(machine);

    // The same image while something else occupies its preferred base.
    let squat_at = usize::try_from(preferred).expect("fits");
    // SAFETY: a fresh anonymous mapping at a hint; without MAP_FIXED nothing that exists
    // is replaced. Unmapped below.
    let squat = unsafe {
        libc::mmap(
            core::ptr::without_provenance_mut::<c_void>(squat_at),
            4096,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_eq!(squat.addr(), squat_at, "the test could place its page");
    let result = Machine::boot(&bytes, false);
    // SAFETY: `squat` is the page mapped above, unmapped once.
    unsafe { libc::munmap(squat, 4096) };
    match result {
        Err(LoadError::Map(message)) => {
            assert!(
                message.contains("no base relocations") && message.contains("preferred base"),
                "{message}"
            );
        }
        Err(other) => panic!("expected a mapping error, got {other}"),
        Ok(_) => panic!("loaded over a mapping that holds its preferred base"),
    }
}

#[test]
fn the_entry_point_is_address_of_entry_point_not_an_export() {
    let mut bytes = sys();
    let entry_rva = PE::parse(&bytes).expect("parses").entry;
    hide_driver_entry_export(&mut bytes);
    let pe = PE::parse(&bytes).expect("parses");
    assert!(
        pe.exports.iter().all(|e| e.name != Some("DriverEntry")),
        "no export DriverEntry left"
    );
    drop(pe);
    let machine = Machine::boot(&bytes, false).unwrap_or_else(|e| panic!("loads: {e}"));
    assert_eq!(machine.image().driver_entry_export(), None);
    assert_eq!(machine.image().entry_rva(), entry_rva);
    runs_the_scenario(&machine);
}

#[test]
fn all_three_at_once_like_a_gnu_ld_image() {
    let _base = PREFERRED_BASE
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    let mut bytes = sys();
    capitalise_import_modules(&mut bytes);
    drop_relocation_directory(&mut bytes);
    hide_driver_entry_export(&mut bytes);
    let machine = Machine::boot(&bytes, false).unwrap_or_else(|e| panic!("loads: {e}"));
    assert!(machine.image().at_preferred_base());
    assert_eq!(machine.image().driver_entry_export(), None);
    runs_the_scenario(&machine);
}
