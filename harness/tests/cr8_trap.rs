//! `mov rax, cr8` and `mov cr8, rcx` executed by code in a watched range are emulated
//! against the thread's modelled IRQL; another privileged instruction there stops the
//! machine with its address and bytes.
#![cfg(all(target_arch = "x86_64", target_os = "linux"))]

use teredo_harness::kernel::{self, DISPATCH_LEVEL, PASSIVE_LEVEL, trap};
use teredo_harness::{Machine, Stop, sysbuild};

/// Maps `code` executable and watches its page as driver code (slot 1, one range at a
/// time). Leaked: the page stays mapped for the process.
fn code_page(code: &[u8]) -> usize {
    // SAFETY: a fresh anonymous mapping; nothing existing is affected.
    let page = unsafe {
        libc::mmap(
            core::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(page, libc::MAP_FAILED);
    // SAFETY: the page is ours, writable, and `code` fits in it.
    unsafe {
        core::ptr::copy_nonoverlapping(code.as_ptr(), page.cast::<u8>(), code.len());
        assert_eq!(
            libc::mprotect(page, 4096, libc::PROT_READ | libc::PROT_EXEC),
            0
        );
    }
    trap::watch_code(1, page.addr(), 4096);
    page.expose_provenance()
}

#[test]
fn cr8_reads_and_writes_are_emulated_and_other_privileged_code_stops_the_machine() {
    // One page, one watched range: four functions 16 bytes apart.
    let mut code = vec![0xCC_u8; 64];
    // mov rax, cr8 ; ret
    code[0..5].copy_from_slice(&[0x44, 0x0F, 0x20, 0xC0, 0xC3]);
    // mov cr8, rcx ; ret
    code[16..21].copy_from_slice(&[0x44, 0x0F, 0x22, 0xC1, 0xC3]);
    // mov r9, cr8 ; mov rax, r9 ; ret
    code[32..40].copy_from_slice(&[0x45, 0x0F, 0x20, 0xC1, 0x4C, 0x89, 0xC8, 0xC3]);
    // hlt ; ret
    code[48..50].copy_from_slice(&[0xF4, 0xC3]);
    let page = code_page(&code);
    let (read, write, read_r9, hlt) = (page, page + 16, page + 32, page + 48);
    let sys = sysbuild::sys_image().unwrap_or_else(|e| panic!("the .sys must build: {e}"));
    let machine = Machine::boot(sys, false).unwrap_or_else(|e| panic!("loads: {e}"));
    let before = trap::cr8_accesses_emulated();
    let seen = machine
        .on_cpu("cr8", DISPATCH_LEVEL, move || {
            // SAFETY: each page holds a complete function of this signature (above).
            let (read, write, read_r9) = unsafe {
                (
                    std::mem::transmute::<usize, extern "win64" fn() -> u64>(read),
                    std::mem::transmute::<usize, extern "win64" fn(u64)>(write),
                    std::mem::transmute::<usize, extern "win64" fn() -> u64>(read_r9),
                )
            };
            let at_dispatch = read();
            write(u64::from(PASSIVE_LEVEL));
            let lowered = (kernel::current_irql(), read_r9());
            write(u64::from(DISPATCH_LEVEL));
            (at_dispatch, lowered, kernel::current_irql())
        })
        .expect("no stop");
    assert_eq!(seen, (2, (0, 0), DISPATCH_LEVEL));
    assert!(trap::cr8_accesses_emulated() >= before + 4);
    let result = machine.on_cpu("hlt", PASSIVE_LEVEL, move || {
        // SAFETY: a complete function of this signature (above).
        let f = unsafe { std::mem::transmute::<usize, extern "win64" fn()>(hlt) };
        f();
    });
    match result {
        Err(Stop::Bugcheck(stop)) => {
            assert_eq!(stop.code, kernel::KMODE_EXCEPTION_NOT_HANDLED);
            assert_eq!(stop.parameters[1], hlt);
            assert!(stop.reason.contains("f4 c3"), "{stop}");
        }
        other => panic!("expected a stop, got {other:?}"),
    }
}
