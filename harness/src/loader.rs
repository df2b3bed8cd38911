//! Maps a PE image the way the Windows loader does: sections at their RVAs in fresh memory,
//! base relocations applied, every import bound to a host function, section protections
//! set.
//!
//! - **Base.** An image with a base relocation directory is mapped at a base of the host's
//!   choosing, never the preferred one, so that every relocation is exercised. An image
//!   without one (GNU ld omits an empty `.reloc`; a stripped image has none) has nothing
//!   the loader could relocate: it is mapped at its preferred base, and when the host
//!   cannot give that range the load fails with [`LoadError::Map`] saying so.
//! - **Imports.** Module names are compared without case, as Windows compares them
//!   (`NETIO.SYS`, `netio.sys` and `Netio.Sys` are one module): the resolver receives the
//!   name in ASCII lowercase. Function names are case-sensitive, as exports are.
//! - **Entry point.** The routine called as `DriverEntry` is the PE `AddressOfEntryPoint`
//!   (a C driver exports nothing; a WDK build's entry is `GsDriverEntry`, which calls the
//!   driver's `DriverEntry`). An export named `DriverEntry`, when present, is kept only as a
//!   cross-check ([`LoadedImage::driver_entry_export`]).

use core::ffi::c_void;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};

use goblin::pe::PE;
use goblin::pe::relocation::{IMAGE_REL_BASED_ABSOLUTE, IMAGE_REL_BASED_DIR64};
use goblin::pe::section_table::{IMAGE_SCN_MEM_EXECUTE, IMAGE_SCN_MEM_READ, IMAGE_SCN_MEM_WRITE};

/// Why an image could not be loaded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LoadError {
    /// The bytes are not a PE32+ AMD64 image.
    Format(String),
    /// Imports no host function provides, as `(module, name)`, all of them.
    UnresolvedImports(Vec<(String, String)>),
    /// A base relocation of a type this loader does not apply, or out of bounds.
    Relocation(String),
    /// The host refused the memory, or could not give an image without relocations its
    /// preferred base.
    Map(String),
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LoadError::Format(m) => write!(f, "bad image: {m}"),
            LoadError::UnresolvedImports(list) => {
                f.write_str("unresolved imports:")?;
                for (module, name) in list {
                    write!(f, " {module}!{name}")?;
                }
                Ok(())
            }
            LoadError::Relocation(m) => write!(f, "relocation: {m}"),
            LoadError::Map(m) => write!(f, "mapping: {m}"),
        }
    }
}

impl std::error::Error for LoadError {}

/// A mapped image.
///
/// # Invariants
///
/// `base` is the start of a private mapping of `size` bytes owned by this value, holding
/// the relocated, bound image; it is unmapped exactly once, on drop.
#[derive(Debug)]
pub struct LoadedImage {
    base: *mut u8,
    size: usize,
    preferred_base: u64,
    entry_rva: u32,
    driver_entry_export: Option<u32>,
    relocations_applied: usize,
    imports_bound: usize,
    retired: AtomicBool,
    /// `INIT*` sections, page-aligned `(rva, len)`: discarded after `DriverEntry`.
    init_sections: Vec<(usize, usize)>,
    /// `PAGE*` sections, page-aligned `(rva, len, protection)`: pageable.
    page_sections: Vec<(usize, usize, i32)>,
}

// SAFETY: the mapping is plain memory owned by this value; nothing about it is tied to the
// thread that created it.
unsafe impl Send for LoadedImage {}
// SAFETY: `&LoadedImage` only reads the fields and hands out addresses.
unsafe impl Sync for LoadedImage {}

impl LoadedImage {
    /// Where the image was mapped.
    #[must_use]
    pub fn base(&self) -> usize {
        self.base.addr()
    }

    /// `SizeOfImage`.
    #[must_use]
    pub fn size(&self) -> usize {
        self.size
    }

    /// The base the image was linked for.
    #[must_use]
    pub fn preferred_base(&self) -> u64 {
        self.preferred_base
    }

    /// The address of the entry point (`AddressOfEntryPoint`), the routine the I/O manager
    /// calls as `DriverEntry`.
    #[must_use]
    pub fn entry(&self) -> usize {
        self.base() + self.entry_rva as usize
    }

    /// `AddressOfEntryPoint`.
    #[must_use]
    pub fn entry_rva(&self) -> u32 {
        self.entry_rva
    }

    /// The RVA of an export named `DriverEntry`, if the image has one (Rust images built
    /// with `/ENTRY:DriverEntry` export it; C drivers do not). Not used to enter the image.
    #[must_use]
    pub fn driver_entry_export(&self) -> Option<u32> {
        self.driver_entry_export
    }

    /// Whether the image sits at the base it was linked for (only images without base
    /// relocations do).
    #[must_use]
    pub fn at_preferred_base(&self) -> bool {
        self.base() as u64 == self.preferred_base
    }

    /// How many `DIR64` relocations were applied.
    #[must_use]
    pub fn relocations_applied(&self) -> usize {
        self.relocations_applied
    }

    /// How many import slots were bound.
    #[must_use]
    pub fn imports_bound(&self) -> usize {
        self.imports_bound
    }

    /// Whether `address` lies inside the image.
    #[must_use]
    pub fn contains(&self, address: usize) -> bool {
        (self.base()..self.base() + self.size).contains(&address)
    }

    /// Makes the whole image inaccessible, as an unloaded image is: any later call into it
    /// faults instead of running stale code. The memory stays reserved until drop.
    ///
    /// # Panics
    ///
    /// If the host refuses the protection change.
    pub fn retire(&self) {
        // SAFETY: `base..base+size` is our own mapping (type invariant); changing its
        // protection does not invalidate any Rust reference (none point into it).
        let rc = unsafe { libc::mprotect(self.base.cast(), self.size, libc::PROT_NONE) };
        assert_eq!(rc, 0, "mprotect(PROT_NONE) of the image failed");
        #[cfg(target_os = "linux")]
        crate::kernel::trap::guard(
            self.base(),
            self.size,
            crate::kernel::trap::GuardKind::Unloaded,
            libc::PROT_NONE,
        );
        self.retired.store(true, Ordering::Release);
    }

    /// `INIT*` sections as `(rva, len)`, page-aligned.
    #[must_use]
    pub fn init_sections(&self) -> &[(usize, usize)] {
        &self.init_sections
    }

    /// `PAGE*` sections as `(rva, len)`, page-aligned.
    #[must_use]
    pub fn page_sections(&self) -> Vec<(usize, usize)> {
        self.page_sections.iter().map(|&(r, l, _)| (r, l)).collect()
    }

    /// Discards the `INIT*` sections, as the I/O manager does once `DriverEntry` returned:
    /// they become inaccessible, and on Linux a later access by driver code stops the
    /// machine naming the RVA ([`crate::kernel::trap`]).
    ///
    /// # Panics
    ///
    /// If the host refuses the protection change.
    pub fn discard_init(&self) {
        for &(rva, len) in &self.init_sections {
            // SAFETY: `rva..rva+len` is a section inside our mapping (checked at load); no
            // Rust reference points into it.
            let rc = unsafe { libc::mprotect(self.base.add(rva).cast(), len, libc::PROT_NONE) };
            assert_eq!(rc, 0, "mprotect(PROT_NONE) of an INIT section failed");
            #[cfg(target_os = "linux")]
            crate::kernel::trap::guard(
                self.base() + rva,
                len,
                crate::kernel::trap::GuardKind::DiscardedInit,
                libc::PROT_NONE,
            );
        }
    }

    /// Whether [`retire`](Self::retire) made the image inaccessible.
    #[must_use]
    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Acquire)
    }
}

impl Drop for LoadedImage {
    fn drop(&mut self) {
        #[cfg(target_os = "linux")]
        crate::kernel::trap::unguard(self.base(), self.size);
        // SAFETY: the mapping is ours and unmapped only here (type invariant).
        unsafe { libc::munmap(self.base.cast::<c_void>(), self.size) };
    }
}

/// Page protection for a section's characteristics.
fn protection(characteristics: u32) -> i32 {
    let mut prot = libc::PROT_NONE;
    if characteristics & IMAGE_SCN_MEM_READ != 0 {
        prot |= libc::PROT_READ;
    }
    if characteristics & IMAGE_SCN_MEM_WRITE != 0 {
        prot |= libc::PROT_WRITE;
    }
    if characteristics & IMAGE_SCN_MEM_EXECUTE != 0 {
        prot |= libc::PROT_EXEC | libc::PROT_READ;
    }
    prot
}

/// Maps `bytes` and binds each import through `resolve(module, name)`, `module` in ASCII
/// lowercase.
///
/// # Errors
///
/// See [`LoadError`]; every unresolved import is listed with its module as the image
/// spells it.
pub fn load(
    bytes: &[u8],
    resolve: &dyn Fn(&str, &str) -> Option<usize>,
) -> Result<LoadedImage, LoadError> {
    let pe = PE::parse(bytes).map_err(|e| LoadError::Format(e.to_string()))?;
    if pe.header.coff_header.machine != crate::pe::MACHINE_AMD64 || !pe.is_64 {
        return Err(LoadError::Format("not a PE32+ AMD64 image".into()));
    }
    let optional = pe
        .header
        .optional_header
        .ok_or_else(|| LoadError::Format("no optional header".into()))?;
    let size = optional.windows_fields.size_of_image as usize;
    let headers = (optional.windows_fields.size_of_headers as usize).min(bytes.len());
    if pe.entry == 0 {
        return Err(LoadError::Format(
            "AddressOfEntryPoint is 0: a driver needs an entry point".into(),
        ));
    }
    let relocatable = optional
        .data_directories
        .get_base_relocation_table()
        .is_some_and(|d| d.size > 0);
    let driver_entry_export = pe
        .exports
        .iter()
        .find(|e| e.name == Some("DriverEntry"))
        .and_then(|e| u32::try_from(e.rva).ok());

    // Resolve everything before mapping anything: the error names every missing import.
    let mut bindings = Vec::with_capacity(pe.imports.len());
    let mut missing = Vec::new();
    for import in &pe.imports {
        match resolve(&import.dll.to_ascii_lowercase(), &import.name) {
            Some(address) => bindings.push((import.offset, address)),
            None => missing.push((import.dll.to_owned(), import.name.to_string())),
        }
    }
    if !missing.is_empty() {
        return Err(LoadError::UnresolvedImports(missing));
    }

    // Without relocations the preferred base is the only correct one: ask for it as a hint
    // (never MAP_FIXED, which would replace whatever the host has there) and check below.
    let hint = if relocatable {
        core::ptr::null_mut()
    } else {
        let preferred = usize::try_from(pe.image_base)
            .map_err(|_| LoadError::Map("preferred base beyond the address space".into()))?;
        core::ptr::without_provenance_mut::<c_void>(preferred)
    };
    // SAFETY: a fresh anonymous private mapping; without MAP_FIXED the hint only suggests an
    // address, and no existing memory is affected.
    let base = unsafe {
        libc::mmap(
            hint,
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(LoadError::Map(std::io::Error::last_os_error().to_string()));
    }
    // INVARIANT: `base` is a fresh mapping of `size` bytes, owned from here on (dropping
    // `image` on an error path unmaps it).
    let mut image = LoadedImage {
        base: base.cast(),
        size,
        preferred_base: pe.image_base,
        entry_rva: pe.entry,
        driver_entry_export,
        relocations_applied: 0,
        imports_bound: 0,
        retired: AtomicBool::new(false),
        init_sections: Vec::new(),
        page_sections: Vec::new(),
    };
    if relocatable && image.at_preferred_base() {
        return Err(LoadError::Map(
            "mapped at the preferred base by chance: the relocations would go untested".into(),
        ));
    }
    if !relocatable && !image.at_preferred_base() {
        return Err(LoadError::Map(format!(
            "the image has no base relocations, so it runs only at its preferred base {:#x}, \
             and the host could not map {size:#x} bytes there (it offered {:#x})",
            pe.image_base,
            image.base()
        )));
    }

    image.window(0, headers)?.copy_from_slice(&bytes[..headers]);
    for section in &pe.sections {
        let raw = section.size_of_raw_data.min(section.virtual_size) as usize;
        let from = section.pointer_to_raw_data as usize;
        let data = bytes
            .get(from..from + raw)
            .ok_or_else(|| LoadError::Format("section data outside the file".into()))?;
        image
            .window(section.virtual_address as usize, raw)?
            .copy_from_slice(data);
    }
    image.relocate(&pe)?;
    for (slot_rva, address) in bindings {
        image
            .window(slot_rva, 8)?
            .copy_from_slice(&(address as u64).to_le_bytes());
        image.imports_bound += 1;
    }
    image.protect(&pe, headers)?;
    Ok(image)
}

impl LoadedImage {
    /// `len` bytes of the mapping at `offset`, for writing while the image is loaded.
    fn window(&mut self, offset: usize, len: usize) -> Result<&mut [u8], LoadError> {
        if offset.checked_add(len).is_none_or(|end| end > self.size) {
            return Err(LoadError::Format(format!(
                "{len} bytes at RVA {offset:#x} outside SizeOfImage {:#x}",
                self.size
            )));
        }
        // SAFETY: in bounds of our mapping (checked above), still writable (protections are
        // set last), and borrowed mutably from the owner for the slice's lifetime, so no
        // other reference into it exists.
        Ok(unsafe { std::slice::from_raw_parts_mut(self.base.add(offset), len) })
    }

    /// Applies the base relocations for the difference between the mapping and the
    /// preferred base.
    fn relocate(&mut self, pe: &PE<'_>) -> Result<(), LoadError> {
        let delta = (self.base() as u64).wrapping_sub(pe.image_base);
        let Some(relocations) = &pe.relocation_data else {
            // Nothing to relocate: correct exactly at the preferred base (`load` maps an image
            // without relocations only there).
            return if delta == 0 {
                Ok(())
            } else {
                Err(LoadError::Relocation(
                    "no base relocations: the image cannot move".into(),
                ))
            };
        };
        for block in relocations.blocks() {
            let block = block.map_err(|e| LoadError::Relocation(e.to_string()))?;
            for word in block.words() {
                let word = word.map_err(|e| LoadError::Relocation(e.to_string()))?;
                match u16::from(word.reloc_type()) {
                    IMAGE_REL_BASED_ABSOLUTE => {}
                    IMAGE_REL_BASED_DIR64 => {
                        let at = block.rva as usize + usize::from(word.offset());
                        let slot = self.window(at, 8)?;
                        let mut value = [0u8; 8];
                        value.copy_from_slice(slot);
                        let moved = u64::from_le_bytes(value).wrapping_add(delta);
                        slot.copy_from_slice(&moved.to_le_bytes());
                        self.relocations_applied += 1;
                    }
                    other => {
                        return Err(LoadError::Relocation(format!(
                            "type {other} at block {:#x} is not applied by this loader",
                            block.rva
                        )));
                    }
                }
            }
        }
        Ok(())
    }

    /// Headers read-only; each section as its characteristics say.
    ///
    /// `INIT*` sections are remembered for [`discard_init`](LoadedImage::discard_init);
    /// `PAGE*` sections start paged out (`PROT_NONE`, guarded as pageable: see
    /// [`crate::kernel::trap`]) on Linux, where the fault handler pages them in.
    fn protect(&mut self, pe: &PE<'_>, headers: usize) -> Result<(), LoadError> {
        let page = 4096;
        let mut ranges = vec![(0, headers.div_ceil(page) * page, libc::PROT_READ)];
        for section in &pe.sections {
            let len = (section.virtual_size as usize).div_ceil(page) * page;
            let rva = section.virtual_address as usize;
            let name = section.name().unwrap_or("");
            let mut prot = protection(section.characteristics);
            if name.starts_with("INIT") {
                self.init_sections.push((rva, len));
            }
            if cfg!(target_os = "linux") && name.starts_with("PAGE") {
                self.page_sections.push((rva, len, prot));
                prot = libc::PROT_NONE;
            }
            ranges.push((rva, len, prot));
        }
        for (start, len, prot) in ranges {
            if start + len > self.size {
                return Err(LoadError::Format("section outside SizeOfImage".into()));
            }
            // SAFETY: `start..start+len` lies inside our mapping (checked above); no Rust
            // reference points into it.
            let rc = unsafe { libc::mprotect(self.base.add(start).cast(), len, prot) };
            if rc != 0 {
                return Err(LoadError::Map(std::io::Error::last_os_error().to_string()));
            }
        }
        #[cfg(target_os = "linux")]
        for &(rva, len, prot) in &self.page_sections {
            crate::kernel::trap::guard(
                self.base() + rva,
                len,
                crate::kernel::trap::GuardKind::Pageable,
                prot,
            );
        }
        Ok(())
    }
}
