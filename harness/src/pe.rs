//! The PE facts a Windows loader relies on, read with `goblin`, and the PE checksum.

use goblin::pe::PE;

/// `IMAGE_FILE_MACHINE_AMD64`.
pub const MACHINE_AMD64: u16 = 0x8664;
/// `IMAGE_SUBSYSTEM_NATIVE`.
pub const SUBSYSTEM_NATIVE: u16 = 1;

/// One imported function.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImportEntry {
    /// The module, as the import table names it.
    pub module: String,
    /// The function name.
    pub name: String,
    /// The RVA of its import address table slot.
    pub iat_rva: usize,
}

/// What a loader checks in the headers of a driver image.
#[derive(Clone, Debug)]
pub struct PeFacts {
    /// `FileHeader.Machine`.
    pub machine: u16,
    /// Whether the optional header is PE32+.
    pub is_64: bool,
    /// `OptionalHeader.Subsystem`.
    pub subsystem: u16,
    /// `OptionalHeader.ImageBase`: the preferred base.
    pub image_base: u64,
    /// `OptionalHeader.SizeOfImage`.
    pub size_of_image: u32,
    /// `OptionalHeader.AddressOfEntryPoint`.
    pub entry_rva: u32,
    /// The exported names whose RVA is the entry point.
    pub entry_names: Vec<String>,
    /// `OptionalHeader.CheckSum` as stored.
    pub checksum_stored: u32,
    /// The checksum computed over the file.
    pub checksum_computed: u32,
    /// `OptionalHeader.DllCharacteristics`.
    pub dll_characteristics: u16,
    /// Whether a base relocation directory is present (needed at a non-preferred base).
    pub has_relocations: bool,
    /// The import table, in order.
    pub imports: Vec<ImportEntry>,
    /// The file size in bytes.
    pub file_size: usize,
}

impl PeFacts {
    /// The imported functions of `module` (compared case-insensitively), in table order.
    #[must_use]
    pub fn imports_of(&self, module: &str) -> Vec<&str> {
        self.imports
            .iter()
            .filter(|i| i.module.eq_ignore_ascii_case(module))
            .map(|i| i.name.as_str())
            .collect()
    }

    /// The imported modules, in table order, each once.
    #[must_use]
    pub fn modules(&self) -> Vec<&str> {
        let mut modules: Vec<&str> = Vec::new();
        for import in &self.imports {
            if !modules.contains(&import.module.as_str()) {
                modules.push(&import.module);
            }
        }
        modules
    }
}

/// Reads the facts of `bytes`.
///
/// # Errors
///
/// When `goblin` cannot parse the image or it has no optional header.
pub fn facts(bytes: &[u8]) -> Result<PeFacts, String> {
    let pe = PE::parse(bytes).map_err(|e| format!("not a PE image: {e}"))?;
    let optional = pe
        .header
        .optional_header
        .ok_or("no optional header: not an image")?;
    let windows = optional.windows_fields;
    let entry_rva = pe.entry;
    let entry_names = pe
        .exports
        .iter()
        .filter(|e| e.rva == entry_rva as usize)
        .filter_map(|e| e.name.map(str::to_owned))
        .collect();
    let imports = pe
        .imports
        .iter()
        .map(|i| ImportEntry {
            module: i.dll.to_owned(),
            name: i.name.to_string(),
            iat_rva: i.offset,
        })
        .collect();
    Ok(PeFacts {
        machine: pe.header.coff_header.machine,
        is_64: pe.is_64,
        subsystem: windows.subsystem,
        image_base: pe.image_base,
        size_of_image: windows.size_of_image,
        entry_rva,
        entry_names,
        checksum_stored: windows.check_sum,
        checksum_computed: checksum(bytes)?,
        dll_characteristics: windows.dll_characteristics,
        has_relocations: optional
            .data_directories
            .get_base_relocation_table()
            .is_some_and(|d| d.size > 0),
        imports,
        file_size: bytes.len(),
    })
}

/// The offset of `OptionalHeader.CheckSum` in the file.
fn checksum_offset(bytes: &[u8]) -> Result<usize, String> {
    let lfanew = bytes
        .get(0x3C..0x40)
        .ok_or("file too short for a DOS header")?;
    let lfanew = u32::from_le_bytes([lfanew[0], lfanew[1], lfanew[2], lfanew[3]]) as usize;
    // "PE\0\0", the 20-byte file header, then CheckSum at 64 into the optional header.
    let offset = lfanew + 4 + 20 + 64;
    if offset + 4 > bytes.len() {
        return Err("file too short for an optional header".into());
    }
    Ok(offset)
}

/// The PE image checksum (`CheckSumMappedFile`): the one's-complement-style 16-bit sum of
/// the file with the `CheckSum` field taken as zero, folded, plus the file length.
///
/// # Errors
///
/// When the file is too short to hold the headers.
pub fn checksum(bytes: &[u8]) -> Result<u32, String> {
    let skip = checksum_offset(bytes)?;
    let mut sum: u32 = 0;
    for (index, pair) in bytes.chunks(2).enumerate() {
        let at = index * 2;
        if (skip..skip + 4).contains(&at) {
            continue;
        }
        let word = u32::from(pair[0]) | pair.get(1).map_or(0, |&b| u32::from(b) << 8);
        sum += word;
        sum = (sum & 0xFFFF) + (sum >> 16);
    }
    sum = (sum & 0xFFFF) + (sum >> 16);
    let length = u32::try_from(bytes.len()).map_err(|_| "file larger than 4 GiB")?;
    Ok(sum.wrapping_add(length))
}
