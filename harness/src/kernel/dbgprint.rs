//! Debugger output: `DbgPrint`, `DbgPrintEx`, `vDbgPrintEx` with the kernel's format
//! grammar ([`format`], a pure function over the format bytes and an [`ArgSource`]), and the
//! fault injection that runs a driver routine from inside its own notification callback.
//!
//! Variadic arguments: the Windows x64 convention passes the first four argument slots in
//! `rcx`, `rdx`, `r8`, `r9` and the rest on the stack above a 32-byte home area the caller
//! always reserves. `DbgPrint` and `DbgPrintEx` are naked trampolines that spill the four
//! registers into that home area, so that all the arguments lie in one array of 8-byte
//! slots, and pass its address to the formatter. `vDbgPrintEx`'s `va_list` is already such a
//! pointer.
//!
//! Grammar: `%[flags][width][.precision][length]conversion` with flags `- + space # 0`,
//! width and precision as digits or `*`, lengths `hh h l ll L I I32 I64 z t j w`, and
//! conversions `c C s S Z wZ d i u x X o p %` (with `%hs %ls %ws %hc %lc %wc`). A NULL string
//! prints `(null)`. A conversion the model does not format (`%f`, `%n`, an unknown letter)
//! prints `%!x!` and is reported ([`dbgprint_problems`]); the floating-point ones consume
//! their 8-byte slot, so later arguments stay aligned; an unknown letter consumes nothing
//! and the report says the rest of the line may be misaligned. A Unicode conversion above
//! `PASSIVE_LEVEL` (valid only at `PASSIVE_LEVEL`) is reported.

use core::ffi::{CStr, c_char};
use std::cell::Cell;
use std::sync::{Mutex, PoisonError};

use super::irql::current_irql;
use super::netio::IN_CALLBACK;
use super::{PASSIVE_LEVEL, STATUS_SUCCESS, lock, note};

/// `(DriverUnload, DriverObject)` to run from inside the next callback (see
/// [`run_in_next_callback`]).
pub(crate) static IN_CALLBACK_HOOK: Mutex<Option<(usize, usize)>> = Mutex::new(None);

/// Fault injection for the self-cancel scenario: the next time the driver prints from
/// inside one of its notification callbacks, the model calls `unload(driver_object)` (the
/// driver's own `DriverUnload`) on that thread, before returning from `DbgPrint`: the
/// driver then cancels its registration from inside its callback, as a driver bug would.
pub fn run_in_next_callback(unload: usize, driver_object: usize) {
    *IN_CALLBACK_HOOK
        .lock()
        .unwrap_or_else(PoisonError::into_inner) = Some((unload, driver_object));
}

/// Where the formatter gets its arguments and the memory they point to.
pub trait ArgSource {
    /// The next 8-byte argument slot.
    fn next(&mut self) -> u64;
    /// The bytes of the NUL-terminated string at `address` (not NULL).
    fn narrow(&self, address: u64) -> Vec<u8>;
    /// The units of the NUL-terminated UTF-16 string at `address` (not NULL).
    fn wide(&self, address: u64) -> Vec<u16>;
    /// `(Length, Buffer)` of the `UNICODE_STRING` or `ANSI_STRING` at `address` (not NULL).
    fn counted(&self, address: u64) -> (u16, u64);
    /// `length` bytes at `address` (not NULL).
    fn bytes(&self, address: u64, length: usize) -> Vec<u8>;
}

/// The result of formatting one call.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Formatted {
    /// The text, as the debugger would show it.
    pub text: String,
    /// What the model could not format faithfully, or what broke a documented rule.
    pub problems: Vec<String>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Length {
    Default,
    Char,
    Short,
    Long,
    LongLong,
    Pointer,
    Wide,
}

/// Formats `format` as the kernel's `DbgPrint` does, at `irql` (for the Unicode rule).
#[allow(
    clippy::too_many_lines,
    reason = "one pass over the grammar: flags, width, precision, length, conversion"
)]
pub fn format(format: &[u8], args: &mut dyn ArgSource, irql: u8) -> Formatted {
    let mut out = Formatted::default();
    let mut at = 0;
    while at < format.len() {
        let b = format[at];
        at += 1;
        if b != b'%' {
            out.text.push(char::from(b));
            continue;
        }
        let start = at - 1;
        let (mut left, mut plus, mut space, mut alternate, mut zero) =
            (false, false, false, false, false);
        while let Some(&flag) = format.get(at) {
            match flag {
                b'-' => left = true,
                b'+' => plus = true,
                b' ' => space = true,
                b'#' => alternate = true,
                b'0' => zero = true,
                _ => break,
            }
            at += 1;
        }
        let mut width = None;
        if format.get(at) == Some(&b'*') {
            at += 1;
            #[allow(clippy::cast_possible_truncation, reason = "an int argument")]
            let w = (args.next() as u32).cast_signed();
            if w < 0 {
                left = true;
            }
            width = Some(w.unsigned_abs() as usize);
        } else {
            width = digits(format, &mut at).or(width);
        }
        let mut precision = None;
        if format.get(at) == Some(&b'.') {
            at += 1;
            if format.get(at) == Some(&b'*') {
                at += 1;
                #[allow(clippy::cast_possible_truncation, reason = "an int argument")]
                let p = (args.next() as u32).cast_signed();
                precision = usize::try_from(p).ok();
            } else {
                precision = Some(digits(format, &mut at).unwrap_or(0));
            }
        }
        let rest = &format[at..];
        let (length, skip) = if rest.starts_with(b"I64") || rest.starts_with(b"ll") {
            (Length::LongLong, if rest[0] == b'I' { 3 } else { 2 })
        } else if rest.starts_with(b"I32") {
            (Length::Long, 3)
        } else if rest.starts_with(b"hh") {
            (Length::Char, 2)
        } else {
            match rest.first() {
                Some(b'h') => (Length::Short, 1),
                Some(b'l' | b'L') => (Length::Long, 1),
                Some(b'I' | b'z' | b't' | b'j') => (Length::Pointer, 1),
                Some(b'w') => (Length::Wide, 1),
                _ => (Length::Default, 0),
            }
        };
        at += skip;
        let Some(&conversion) = format.get(at) else {
            out.text.push_str("%!end!");
            out.problems
                .push("a format that ends inside a conversion".to_owned());
            break;
        };
        at += 1;
        let spec = &format[start..at];
        let pad = Pad {
            width: width.unwrap_or(0),
            left,
            zero: zero && !left && precision.is_none(),
        };
        let unicode = |out: &mut Formatted| {
            if irql > PASSIVE_LEVEL {
                out.problems.push(format!(
                    "the Unicode conversion {} at IRQL {irql}: valid only at PASSIVE_LEVEL",
                    String::from_utf8_lossy(spec)
                ));
            }
        };
        match conversion {
            b'%' => out.text.push('%'),
            b'd' | b'i' | b'u' | b'x' | b'X' | b'o' => {
                let raw = args.next();
                let signed = matches!(conversion, b'd' | b'i');
                let (negative, magnitude) = integer(raw, length, signed);
                let digits = match conversion {
                    b'x' => format!("{magnitude:x}"),
                    b'X' => format!("{magnitude:X}"),
                    b'o' => format!("{magnitude:o}"),
                    _ => magnitude.to_string(),
                };
                let digits = match precision {
                    Some(0) if magnitude == 0 => String::new(),
                    Some(p) if digits.len() < p => {
                        format!("{}{digits}", "0".repeat(p - digits.len()))
                    }
                    _ => digits,
                };
                let prefix = if negative {
                    "-"
                } else if signed && plus {
                    "+"
                } else if signed && space {
                    " "
                } else if alternate && magnitude != 0 {
                    match conversion {
                        b'x' => "0x",
                        b'X' => "0X",
                        b'o' if !digits.starts_with('0') => "0",
                        _ => "",
                    }
                } else {
                    ""
                };
                pad.number(&mut out.text, prefix, &digits);
            }
            b'p' => {
                let raw = args.next();
                pad.number(&mut out.text, "", &format!("{raw:016X}"));
            }
            b'c' | b'C' => {
                #[allow(clippy::cast_possible_truncation, reason = "a char is the low bits")]
                let text = if conversion == b'C' && length != Length::Short
                    || matches!(length, Length::Long | Length::Wide)
                {
                    unicode(&mut out);
                    char::decode_utf16([args.next() as u16])
                        .map(|c| c.unwrap_or(char::REPLACEMENT_CHARACTER))
                        .collect::<String>()
                } else {
                    char::from(args.next() as u8).to_string()
                };
                pad.text(&mut out.text, &text);
            }
            b's' | b'S' => {
                let wide = if conversion == b'S' {
                    length != Length::Short
                } else {
                    matches!(length, Length::Long | Length::Wide)
                };
                let address = args.next();
                let text = if address == 0 {
                    "(null)".to_owned()
                } else if wide {
                    unicode(&mut out);
                    let mut units = args.wide(address);
                    if let Some(p) = precision {
                        units.truncate(p);
                    }
                    String::from_utf16_lossy(&units)
                } else {
                    let mut bytes = args.narrow(address);
                    if let Some(p) = precision {
                        bytes.truncate(p);
                    }
                    String::from_utf8_lossy(&bytes).into_owned()
                };
                pad.text(&mut out.text, &text);
            }
            b'Z' => {
                let address = args.next();
                let wide = length == Length::Wide;
                if wide {
                    unicode(&mut out);
                }
                let text = if address == 0 {
                    "(null)".to_owned()
                } else {
                    let (bytes, buffer) = args.counted(address);
                    if buffer == 0 {
                        "(null)".to_owned()
                    } else {
                        let raw = args.bytes(buffer, usize::from(bytes));
                        if wide {
                            let units: Vec<u16> = raw
                                .chunks_exact(2)
                                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                                .collect();
                            String::from_utf16_lossy(&units)
                        } else {
                            String::from_utf8_lossy(&raw).into_owned()
                        }
                    }
                };
                pad.text(&mut out.text, &text);
            }
            b'f' | b'F' | b'e' | b'E' | b'g' | b'G' | b'a' | b'A' => {
                let _ = args.next();
                unsupported(&mut out.text, conversion);
                out.problems.push(format!(
                    "{} is not formatted by the model (floating point in a driver needs                      KeSaveExtendedProcessorState); its slot was consumed",
                    String::from_utf8_lossy(spec)
                ));
            }
            other => {
                unsupported(&mut out.text, other);
                out.problems.push(format!(
                    "{} is not a conversion the model knows: nothing consumed, the rest of                      the line may be misaligned",
                    String::from_utf8_lossy(spec)
                ));
            }
        }
    }
    out
}

/// What the debugger shows for a conversion the model does not format: `%!x!`.
fn unsupported(out: &mut String, conversion: u8) {
    out.push_str("%!");
    out.push(char::from(conversion));
    out.push('!');
}

fn digits(format: &[u8], at: &mut usize) -> Option<usize> {
    let start = *at;
    let mut value = 0usize;
    while let Some(d) = format.get(*at).filter(|d| d.is_ascii_digit()) {
        value = value
            .saturating_mul(10)
            .saturating_add(usize::from(d - b'0'));
        *at += 1;
    }
    (*at > start).then_some(value)
}

/// `(negative, magnitude)` of the slot `raw` read at `length`.
#[allow(
    clippy::cast_possible_truncation,
    reason = "each length reads the low bits of its slot, as the callee of a C variadic does"
)]
fn integer(raw: u64, length: Length, signed: bool) -> (bool, u64) {
    let value: i64 = match (length, signed) {
        (Length::Char, true) => i64::from((raw as u8).cast_signed()),
        (Length::Char, false) => i64::from(raw as u8),
        (Length::Short, true) => i64::from((raw as u16).cast_signed()),
        (Length::Short, false) => i64::from(raw as u16),
        (Length::LongLong | Length::Pointer, _) => {
            if signed {
                raw.cast_signed()
            } else {
                return (false, raw);
            }
        }
        (_, true) => i64::from((raw as u32).cast_signed()),
        (_, false) => i64::from(raw as u32),
    };
    (value < 0, value.unsigned_abs())
}

struct Pad {
    width: usize,
    left: bool,
    zero: bool,
}

impl Pad {
    fn text(&self, out: &mut String, text: &str) {
        let fill = self.width.saturating_sub(text.chars().count());
        if !self.left {
            out.extend(std::iter::repeat_n(' ', fill));
        }
        out.push_str(text);
        if self.left {
            out.extend(std::iter::repeat_n(' ', fill));
        }
    }

    fn number(&self, out: &mut String, prefix: &str, digits: &str) {
        let fill = self.width.saturating_sub(prefix.len() + digits.len());
        if self.zero {
            out.push_str(prefix);
            out.extend(std::iter::repeat_n('0', fill));
            out.push_str(digits);
        } else {
            self.text(out, &format!("{prefix}{digits}"));
        }
    }
}

/// The arguments of a real call: consecutive 8-byte slots, and the driver's memory.
struct Slots(*const u64);

impl ArgSource for Slots {
    fn next(&mut self) -> u64 {
        // SAFETY: the slots come from a `DbgPrint*` call (the trampoline's home area and the
        // caller's stack above it, or a `va_list`): the caller passed at least as many
        // arguments as its format consumes (`DbgPrint`'s contract).
        let value = unsafe { self.0.read_unaligned() };
        // SAFETY: one slot further, inside the same argument area (as above).
        self.0 = unsafe { self.0.add(1) };
        value
    }

    fn narrow(&self, address: u64) -> Vec<u8> {
        // SAFETY: a `%s` argument is a NUL-terminated string (`DbgPrint`'s contract).
        unsafe {
            CStr::from_ptr(core::ptr::with_exposed_provenance::<c_char>(to_usize(
                address,
            )))
        }
        .to_bytes()
        .to_vec()
    }

    fn wide(&self, address: u64) -> Vec<u16> {
        let start = core::ptr::with_exposed_provenance::<u16>(to_usize(address));
        let mut units = Vec::new();
        // SAFETY: a `%S`/`%ws` argument is a NUL-terminated UTF-16 string (`DbgPrint`'s
        // contract): every unit up to the NUL is readable.
        while let unit @ 1.. = unsafe { start.add(units.len()).read_unaligned() } {
            units.push(unit);
        }
        units
    }

    fn counted(&self, address: u64) -> (u16, u64) {
        let at = core::ptr::with_exposed_provenance::<u8>(to_usize(address));
        // SAFETY: a `%Z`/`%wZ` argument points to an `ANSI_STRING`/`UNICODE_STRING`
        // (`DbgPrint`'s contract): `Length` at 0, `Buffer` at 8.
        unsafe {
            (
                at.cast::<u16>().read_unaligned(),
                at.add(8).cast::<u64>().read_unaligned(),
            )
        }
    }

    fn bytes(&self, address: u64, length: usize) -> Vec<u8> {
        // SAFETY: a counted string's buffer holds `Length` bytes (`DbgPrint`'s contract).
        unsafe {
            std::slice::from_raw_parts(
                core::ptr::with_exposed_provenance::<u8>(to_usize(address)),
                length,
            )
        }
        .to_vec()
    }
}

#[allow(clippy::cast_possible_truncation, reason = "x86-64: usize is 64 bits")]
fn to_usize(address: u64) -> usize {
    address as usize
}

static PROBLEMS: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Every problem the formatter reported since the model was reset (also in the debugger
/// output, as `[harness] DbgPrint: ...` lines).
#[must_use]
pub fn dbgprint_problems() -> Vec<String> {
    PROBLEMS
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone()
}

pub(crate) fn clear_problems() {
    PROBLEMS
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clear();
}

/// `DbgPrint(Format, ...)`: a trampoline (see the module documentation).
#[unsafe(naked)]
pub(crate) extern "win64" fn dbg_print() {
    core::arch::naked_asm!(
        "mov [rsp + 8], rcx",
        "mov [rsp + 16], rdx",
        "mov [rsp + 24], r8",
        "mov [rsp + 32], r9",
        "lea rcx, [rsp + 8]",
        // Entered with rsp = 8 (mod 16); 40 bytes keep the callee's home area and align it.
        "sub rsp, 40",
        "call {print}",
        "add rsp, 40",
        "ret",
        print = sym dbg_print_slots,
    );
}

/// `DbgPrintEx(ComponentId, Level, Format, ...)`: a trampoline.
#[unsafe(naked)]
pub(crate) extern "win64" fn dbg_print_ex() {
    core::arch::naked_asm!(
        "mov [rsp + 8], rcx",
        "mov [rsp + 16], rdx",
        "mov [rsp + 24], r8",
        "mov [rsp + 32], r9",
        "lea rcx, [rsp + 8]",
        "sub rsp, 40",
        "call {print}",
        "add rsp, 40",
        "ret",
        print = sym dbg_print_ex_slots,
    );
}

/// # Safety
///
/// `slots` is the argument array of a `DbgPrint` call: the format, then its arguments.
unsafe extern "win64" fn dbg_print_slots(slots: *const u64) -> i32 {
    let mut args = Slots(slots);
    let format = args.next();
    // SAFETY: the format and its arguments as `DbgPrint`'s contract gives them.
    unsafe { print(format, &mut args) }
}

/// # Safety
///
/// `slots` is the argument array of a `DbgPrintEx` call.
unsafe extern "win64" fn dbg_print_ex_slots(slots: *const u64) -> i32 {
    let mut args = Slots(slots);
    let (_component, _level) = (args.next(), args.next());
    let format = args.next();
    // SAFETY: the format and its arguments as `DbgPrintEx`'s contract gives them.
    unsafe { print(format, &mut args) }
}

/// `vDbgPrintEx(ComponentId, Level, Format, arglist)`: on x64 a `va_list` is the address of
/// the first 8-byte argument slot.
///
/// # Safety
///
/// `format` is a NUL-terminated string and `arguments` its `va_list`.
pub(crate) unsafe extern "win64" fn v_dbg_print_ex(
    _component: u32,
    _level: u32,
    format: *const c_char,
    arguments: *const u64,
) -> i32 {
    // SAFETY: as this function's contract.
    unsafe { print(format.expose_provenance() as u64, &mut Slots(arguments)) }
}

/// # Safety
///
/// `format` is the address of a NUL-terminated string; `args` holds what it consumes.
unsafe fn print(format: u64, args: &mut Slots) -> i32 {
    if format == 0 {
        note("DbgPrint with a NULL format");
        return STATUS_SUCCESS;
    }
    let bytes = args.narrow(format);
    let formatted = self::format(&bytes, args, current_irql());
    for problem in &formatted.problems {
        note(&format!("DbgPrint: {problem}"));
    }
    PROBLEMS
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .extend(formatted.problems);
    let out = formatted.text;
    let mut state = lock();
    for line in out.trim_end_matches('\n').split('\n') {
        if state.echo {
            println!("{line}");
        }
        state.debugger.push(line.to_owned());
    }
    drop(state);
    if IN_CALLBACK.with(Cell::get) {
        let hook = IN_CALLBACK_HOOK
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some((unload, driver_object)) = hook {
            note("fault injection: running the driver's DriverUnload inside its callback");
            // SAFETY: `unload` is the image's `DRIVER_UNLOAD` routine and `driver_object`
            // the machine's driver object, both given by the machine, which keeps them
            // alive while the image runs; the routine is an NTAPI function.
            let unload =
                unsafe { std::mem::transmute::<usize, extern "win64" fn(*mut u8)>(unload) };
            unload(core::ptr::with_exposed_provenance_mut(driver_object));
        }
        super::netio::run_overlap_hook();
    }
    STATUS_SUCCESS
}
