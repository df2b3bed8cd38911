//! `DbgPrint`'s format grammar: the pure formatter over a fake argument source, and the real
//! variadic entry points with more arguments than registers.
#![cfg(all(target_arch = "x86_64", unix))]

use core::ffi::c_char;
use std::collections::HashMap;

use teredo_harness::kernel::{self, ArgSource, DISPATCH_LEVEL, PASSIVE_LEVEL};
use teredo_harness::{Machine, sysbuild};

/// Arguments in order, and memory by address.
#[derive(Default)]
struct Fake {
    args: Vec<u64>,
    next: usize,
    narrow: HashMap<u64, Vec<u8>>,
    wide: HashMap<u64, Vec<u16>>,
    counted: HashMap<u64, (u16, u64)>,
}

impl ArgSource for Fake {
    fn next(&mut self) -> u64 {
        let value = self.args[self.next];
        self.next += 1;
        value
    }
    fn narrow(&self, address: u64) -> Vec<u8> {
        self.narrow[&address].clone()
    }
    fn wide(&self, address: u64) -> Vec<u16> {
        self.wide[&address].clone()
    }
    fn counted(&self, address: u64) -> (u16, u64) {
        self.counted[&address]
    }
    fn bytes(&self, address: u64, length: usize) -> Vec<u8> {
        let units = &self.wide[&address];
        units
            .iter()
            .flat_map(|u| u.to_le_bytes())
            .take(length)
            .collect()
    }
}

fn fmt(format: &str, args: &[u64]) -> (String, Vec<String>, usize) {
    let mut fake = Fake {
        args: args.to_vec(),
        ..Fake::default()
    };
    fake.narrow.insert(0x1000, b"teredo".to_vec());
    fake.wide.insert(0x2000, "port".encode_utf16().collect());
    fake.counted.insert(0x3000, (6, 0x2000));
    let out = kernel::format(format.as_bytes(), &mut fake, PASSIVE_LEVEL);
    (out.text, out.problems, fake.next)
}

fn text(format: &str, args: &[u64]) -> String {
    let (text, problems, consumed) = fmt(format, args);
    assert!(problems.is_empty(), "{format}: {problems:?}");
    assert_eq!(consumed, args.len(), "{format}: every argument consumed");
    text
}

#[test]
fn integers_with_flags_width_precision_and_lengths() {
    let minus_one = u64::MAX;
    assert_eq!(
        text("%d|%i|%u", &[minus_one, 42, minus_one]),
        "-1|42|4294967295"
    );
    assert_eq!(text("%5d|%-5d|%05d", &[42, 42, 42]), "   42|42   |00042");
    assert_eq!(text("%+d|% d|%+d", &[7, 7, minus_one]), "+7| 7|-1");
    assert_eq!(text("%.3d|%8.3d", &[5, 5]), "005|     005");
    assert_eq!(
        text("%x|%X|%#x|%#o|%o", &[255, 255, 255, 8, 8]),
        "ff|FF|0xff|010|10"
    );
    assert_eq!(text("%*d|%-*d|%.*d", &[4, 1, 3, 2, 2, 3]), "   1|2  |03");
    assert_eq!(
        text("%*d", &[(-3i64).cast_unsigned(), 9]),
        "9  ",
        "negative * width"
    );
    assert_eq!(
        text("%hd|%hu|%hhd", &[0x1_FFFF, 0x1_FFFF, 0xFF]),
        "-1|65535|-1"
    );
    assert_eq!(
        text("%ld|%lu", &[minus_one, minus_one]),
        "-1|4294967295",
        "l is 32-bit"
    );
    assert_eq!(
        text(
            "%lld|%I64u|%I64x|%llx",
            &[minus_one, minus_one, minus_one, 1 << 40]
        ),
        "-1|18446744073709551615|ffffffffffffffff|10000000000"
    );
    assert_eq!(
        text("%I32d|%Iu|%zu", &[minus_one, 1 << 33, 1 << 34]),
        "-1|8589934592|17179869184"
    );
    assert_eq!(text("%p", &[0xFFFF_F800_1234_5678]), "FFFFF80012345678");
    assert_eq!(text("100%%", &[]), "100%");
}

#[test]
fn strings_characters_and_counted_strings() {
    assert_eq!(text("[%s]", &[0x1000]), "[teredo]");
    assert_eq!(
        text("[%8s]|[%-8s]|[%.3s]", &[0x1000, 0x1000, 0x1000]),
        "[  teredo]|[teredo  ]|[ter]"
    );
    assert_eq!(
        text("%s|%S|%wZ|%Z", &[0, 0, 0, 0]),
        "(null)|(null)|(null)|(null)"
    );
    assert_eq!(
        text("%S|%ws|%ls|%hs", &[0x2000, 0x2000, 0x2000, 0x1000]),
        "port|port|port|teredo"
    );
    assert_eq!(text("%wZ", &[0x3000]), "por", "Length is 6 bytes: 3 units");
    assert_eq!(
        text(
            "%c%c|%C|%wc",
            &[u64::from(b'o'), u64::from(b'k'), 0x263A, 0x41]
        ),
        "ok|\u{263A}|A"
    );
}

#[test]
fn unsupported_conversions_are_visible_and_reported() {
    let (out, problems, consumed) = fmt("a=%f b=%d", &[0x4000_0000_0000_0000, 7]);
    assert_eq!(
        out, "a=%!f! b=7",
        "the float's slot was consumed: b is still right"
    );
    assert_eq!(consumed, 2);
    assert_eq!(problems.len(), 1, "{problems:?}");
    let (out, problems, consumed) = fmt("x=%q y=%d", &[7]);
    assert_eq!(out, "x=%!q! y=7");
    assert_eq!(consumed, 1, "an unknown letter consumes nothing");
    assert!(problems[0].contains("misaligned"), "{problems:?}");
    let (out, problems, _) = fmt("%n", &[]);
    assert_eq!(out, "%!n!");
    assert_eq!(problems.len(), 1);
}

#[test]
fn unicode_conversions_above_passive_level_are_reported() {
    for format in ["%S", "%ws", "%ls", "%wZ", "%C", "%wc"] {
        let mut fake = Fake {
            args: vec![0x2000],
            ..Fake::default()
        };
        fake.wide.insert(0x2000, "p".encode_utf16().collect());
        fake.counted.insert(0x2000, (0, 0));
        let out = kernel::format(format.as_bytes(), &mut fake, DISPATCH_LEVEL);
        assert_eq!(out.problems.len(), 1, "{format}: {out:?}");
        assert!(out.problems[0].contains("PASSIVE_LEVEL"), "{format}");
        let narrow = kernel::format(
            b"%d",
            &mut Fake {
                args: vec![1],
                ..Fake::default()
            },
            DISPATCH_LEVEL,
        );
        assert!(
            narrow.problems.is_empty(),
            "narrow conversions are fine at DISPATCH_LEVEL"
        );
    }
}

type DbgPrint = unsafe extern "win64" fn(*const c_char, ...) -> i32;
type DbgPrintEx = unsafe extern "win64" fn(u32, u32, *const c_char, ...) -> i32;

#[test]
fn the_real_entry_points_read_arguments_beyond_the_registers() {
    let sys = sysbuild::sys_image().unwrap_or_else(|e| panic!("the .sys must build: {e}"));
    let machine = Machine::boot(sys, false).unwrap_or_else(|e| panic!("loads: {e}"));
    let lines = machine
        .on_cpu("print", PASSIVE_LEVEL, || {
            let print = kernel::resolve("ntoskrnl.exe", "DbgPrint").expect("modelled");
            let print_ex = kernel::resolve("ntoskrnl.exe", "DbgPrintEx").expect("modelled");
            // SAFETY: the model's DbgPrint/DbgPrintEx trampolines have these variadic
            // Windows x64 signatures.
            let (print, print_ex) = unsafe {
                (
                    std::mem::transmute::<usize, DbgPrint>(print),
                    std::mem::transmute::<usize, DbgPrintEx>(print_ex),
                )
            };
            let name = c"seven";
            // SAFETY: the format's conversions match the arguments.
            unsafe {
                print(
                    c"%d %d %d %d %d %d %s %I64x\n".as_ptr(),
                    1i32,
                    2i32,
                    3i32,
                    4i32,
                    5i32,
                    6i32,
                    name.as_ptr(),
                    0x1234_5678_9ABC_u64,
                );
                print_ex(
                    77,
                    0,
                    c"ex %u %s %d %d\n".as_ptr(),
                    10u32,
                    core::ptr::null::<c_char>(),
                    -3i32,
                    4i32,
                );
            }
            kernel::debugger_output()
        })
        .expect("no stop");
    assert!(
        lines.contains(&"1 2 3 4 5 6 seven 123456789abc".to_owned()),
        "{lines:?}"
    );
    assert!(lines.contains(&"ex 10 (null) -3 4".to_owned()), "{lines:?}");
    assert!(kernel::dbgprint_problems().is_empty());
}
