//! Console output on COM1 (16550 UART at 0x3f8), by port I/O straight from ring 3.

use core::fmt;

use crate::port::{inb, outb};

/// I/O base of COM1.
pub const COM1: u16 = 0x3f8;
const LSR: u16 = COM1 + 5;
const LSR_THR_EMPTY: u8 = 1 << 5;

/// 115200 8N1, FIFOs on, no UART interrupts (output is polled).
pub(crate) fn init() {
    outb(COM1 + 1, 0x00); // IER: no interrupts
    outb(COM1 + 3, 0x80); // LCR: DLAB to set the divisor
    outb(COM1, 0x01); // divisor 1: 115200 baud
    outb(COM1 + 1, 0x00);
    outb(COM1 + 3, 0x03); // LCR: 8N1
    outb(COM1 + 2, 0xc7); // FCR: FIFOs on and cleared
    outb(COM1 + 4, 0x03); // MCR: DTR | RTS
}

/// Writes one byte, waiting until the transmitter holding register is empty.
pub fn write_byte(byte: u8) {
    while inb(LSR) & LSR_THR_EMPTY == 0 {
        core::hint::spin_loop();
    }
    outb(COM1, byte);
}

/// Writes bytes as they are (no newline translation).
pub fn write_bytes(bytes: &[u8]) {
    for &byte in bytes {
        write_byte(byte);
    }
}

/// `core::fmt` sink for COM1.
pub struct Serial;

impl fmt::Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        write_bytes(s.as_bytes());
        Ok(())
    }
}

#[doc(hidden)]
pub fn _print(args: fmt::Arguments) {
    // Serial::write_str never fails.
    let _ = fmt::Write::write_fmt(&mut Serial, args);
}

/// Prints to COM1, like `std::print!`.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => {
        $crate::serial::_print(::core::format_args!($($arg)*))
    };
}

/// Prints a line to COM1, like `std::println!`.
#[macro_export]
macro_rules! println {
    () => {
        $crate::serial::write_byte(b'\n')
    };
    ($($arg:tt)*) => {
        $crate::serial::_print(::core::format_args!("{}\n", ::core::format_args!($($arg)*)))
    };
}
