//! The i8042 keyboard controller at 0x60 (data) and 0x64 (status/command), with a minimal PS/2
//! keyboard behind it that answers commands and types one thing: Ctrl+Alt+Del.
//!
//! Guests talk to it mostly to reset the machine (command 0xfe, or the output port's reset bit)
//! and to probe it at boot. Its one host input is an operator's shutdown request
//! ([`I8042::press_ctrl_alt_del`], as Firecracker's SendCtrlAltDel), which the vCPU loop admits
//! through the event source at a counted exit, so that record and replay deliver it at the same
//! point; otherwise the device is a pure function of the guest's accesses and never reads the
//! clock.
//!
//! Implemented: the status register, controller commands 0x20-0x3f / 0x60-0x7f (read/write the
//! command byte and internal RAM), 0xa7/0xa8/0xa9 (aux disable/enable/test), 0xaa (self-test),
//! 0xab (keyboard interface test), 0xad/0xae (keyboard disable/enable), 0xd0/0xd1 (read/write
//! output port; bit 0 clear resets), 0xd2/0xd3 (write keyboard/aux output buffer), 0xdd/0xdf
//! (A20 off/on), 0xf0-0xff (pulse output lines; bit 0 pulsed resets); IRQ1/IRQ12 levels that
//! follow a full output buffer when enabled in the command byte; keyboard commands reset (0xff),
//! identify (0xf2), echo (0xee), LEDs (0xed), typematic (0xf3), scan code set (0xf0), enable /
//! disable / defaults (0xf4-0xf6).
//! Not implemented: A20 masking (the bit is stored; the VMM has no A20 gate), an aux (mouse)
//! device (bytes sent with 0xd4 are dropped), key input, parity and timeout errors.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::bus::{DeviceContext, PioDevice};
use crate::state::whole_device_state;
use crate::{ensure_state, irq, ports, IrqLines, StateError, VmRequest};

/// The aux (PS/2 mouse) interrupt line.
const IRQ_AUX: u8 = 12;

const STATUS_OBF: u8 = 0x01;
const STATUS_SYS: u8 = 0x04;
/// The last write went to the command port.
const STATUS_A2: u8 = 0x08;
/// Keyboard not inhibited (no key lock).
const STATUS_UNLOCKED: u8 = 0x10;
const STATUS_AUX_OBF: u8 = 0x20;

const CMD_KBD_INT: u8 = 0x01;
const CMD_AUX_INT: u8 = 0x02;
const CMD_SYS: u8 = 0x04;
const CMD_KBD_DISABLE: u8 = 0x10;
const CMD_AUX_DISABLE: u8 = 0x20;
const CMD_TRANSLATE: u8 = 0x40;

const OUT_RESET: u8 = 0x01;
const OUT_A20: u8 = 0x02;

const KBD_ACK: u8 = 0xfa;
const KBD_RESEND: u8 = 0xfe;
const KBD_SELF_TEST_OK: u8 = 0xaa;

/// Bytes waiting for the guest; more than a real controller plus keyboard could hold.
const OUTPUT_CAPACITY: usize = 16;

/// Ctrl+Alt+Del pressed and released, as a translating controller presents it (scan code set
/// 1): Ctrl, Alt, Del (E0 53) down, then Del, Alt, Ctrl up.
pub const CTRL_ALT_DEL_SET1: [u8; 8] = [0x1d, 0x38, 0xe0, 0x53, 0xe0, 0xd3, 0xb8, 0x9d];
/// The same in scan code set 2 (translation off): Ctrl 14, Alt 11, Del E0 71, breaks with F0.
pub const CTRL_ALT_DEL_SET2: [u8; 11] = [0x14, 0x11, 0xe0, 0x71, 0xe0, 0xf0, 0x71, 0xf0, 0x11, 0xf0, 0x14];

/// The i8042 controller and its keyboard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042 {
    /// Internal RAM; byte 0 is the command byte.
    ram: [u8; 32],
    /// Output buffer contents in order, each marked `true` when it comes from the aux port.
    output: VecDeque<(u8, bool)>,
    /// What a read of an empty output buffer returns: the last byte read.
    last_read: u8,
    /// A controller command waiting for its data byte on port 0x60.
    pending_command: Option<u8>,
    /// A keyboard command waiting for its parameter byte.
    pending_kbd_command: Option<u8>,
    output_port: u8,
    last_write_was_command: bool,
    scan_code_set: u8,
    /// IRQ1 / IRQ12 levels as last driven, so changes are recorded once.
    kbd_irq: bool,
    aux_irq: bool,
}

impl Default for I8042 {
    fn default() -> Self {
        Self::new()
    }
}

impl I8042 {
    /// The state after firmware: keyboard interrupt and translation on, system flag set,
    /// reset and A20 lines high, output buffer empty.
    pub fn new() -> Self {
        let mut ram = [0u8; 32];
        ram[0] = CMD_KBD_INT | CMD_SYS | CMD_TRANSLATE;
        I8042 {
            ram,
            output: VecDeque::new(),
            last_read: 0,
            pending_command: None,
            pending_kbd_command: None,
            output_port: 0xc0 | OUT_A20 | OUT_RESET,
            last_write_was_command: false,
            scan_code_set: 2,
            kbd_irq: false,
            aux_irq: false,
        }
    }

    fn command_byte(&self) -> u8 {
        self.ram[0]
    }

    /// The keyboard types Ctrl+Alt+Del (an operator's shutdown request): the key codes go to
    /// the output buffer (set 1 while the controller translates, else set 2) and IRQ1 rises if
    /// the command byte enables it. Bytes that do not fit are dropped, as on overrun.
    pub fn press_ctrl_alt_del(&mut self, irqs: &mut IrqLines) {
        let codes: &[u8] =
            if self.command_byte() & CMD_TRANSLATE != 0 { &CTRL_ALT_DEL_SET1 } else { &CTRL_ALT_DEL_SET2 };
        for &b in codes {
            self.push(b, false);
        }
        self.update_irqs(irqs);
    }

    fn status(&self) -> u8 {
        let mut s = STATUS_UNLOCKED | (self.command_byte() & STATUS_SYS);
        if self.last_write_was_command {
            s |= STATUS_A2;
        }
        if let Some(&(_, aux)) = self.output.front() {
            s |= STATUS_OBF;
            if aux {
                s |= STATUS_AUX_OBF;
            }
        }
        s
    }

    fn push(&mut self, byte: u8, aux: bool) {
        if self.output.len() < OUTPUT_CAPACITY {
            self.output.push_back((byte, aux));
        } else {
            tracing::debug!(byte, "i8042: output buffer overrun, byte dropped");
        }
    }

    /// Drives IRQ1 / IRQ12 from the output buffer and the command byte's interrupt enables.
    fn update_irqs(&mut self, irqs: &mut IrqLines) {
        let head = self.output.front().map(|&(_, aux)| aux);
        let kbd = head == Some(false) && self.command_byte() & CMD_KBD_INT != 0;
        let aux = head == Some(true) && self.command_byte() & CMD_AUX_INT != 0;
        if kbd != self.kbd_irq {
            self.kbd_irq = kbd;
            irqs.set_level(irq::KEYBOARD, kbd);
        }
        if aux != self.aux_irq {
            self.aux_irq = aux;
            irqs.set_level(IRQ_AUX, aux);
        }
    }

    fn read_data(&mut self, irqs: &mut IrqLines) -> u8 {
        if let Some((byte, _)) = self.output.pop_front() {
            self.last_read = byte;
            // Reading empties the buffer and drops the line; a byte queued behind it raises it
            // again, a fresh edge for the edge-triggered PIC input.
            self.lower_irqs(irqs);
            self.update_irqs(irqs);
        }
        self.last_read
    }

    /// Records both lines low (when they were high), before the next byte is presented.
    fn lower_irqs(&mut self, irqs: &mut IrqLines) {
        if self.kbd_irq {
            self.kbd_irq = false;
            irqs.set_level(irq::KEYBOARD, false);
        }
        if self.aux_irq {
            self.aux_irq = false;
            irqs.set_level(IRQ_AUX, false);
        }
    }

    fn write_command(&mut self, cmd: u8, requests: &mut Vec<VmRequest>) {
        // A new command abandons one still waiting for its data byte.
        self.pending_command = None;
        match cmd {
            0x20..=0x3f => self.push(self.ram[usize::from(cmd & 0x1f)], false),
            0x60..=0x7f | 0xd1..=0xd4 => self.pending_command = Some(cmd),
            0xa7 => self.ram[0] |= CMD_AUX_DISABLE,
            0xa8 => self.ram[0] &= !CMD_AUX_DISABLE,
            // Interface tests: 0x00 = no error.
            0xa9 | 0xab => self.push(0x00, false),
            0xaa => {
                // Self-test passed; the controller sets the system flag.
                self.ram[0] |= CMD_SYS;
                self.push(0x55, false);
            }
            0xad => self.ram[0] |= CMD_KBD_DISABLE,
            0xae => self.ram[0] &= !CMD_KBD_DISABLE,
            0xd0 => self.push(self.output_port, false),
            0xdd => self.output_port &= !OUT_A20,
            0xdf => self.output_port |= OUT_A20,
            // Pulse the output lines whose bit is clear: line 0 is the CPU reset.
            0xf0..=0xff => {
                if cmd & OUT_RESET == 0 {
                    requests.push(VmRequest::Reset);
                }
            }
            _ => tracing::debug!(cmd, "i8042: unsupported controller command ignored"),
        }
    }

    fn write_data(&mut self, value: u8, requests: &mut Vec<VmRequest>) {
        match self.pending_command.take() {
            Some(cmd @ 0x60..=0x7f) => self.ram[usize::from(cmd & 0x1f)] = value,
            Some(0xd1) => {
                self.output_port = value;
                if value & OUT_RESET == 0 {
                    requests.push(VmRequest::Reset);
                }
            }
            Some(0xd2) => self.push(value, false),
            Some(0xd3) => self.push(value, true),
            Some(0xd4) => tracing::debug!(value, "i8042: no aux device, byte dropped"),
            Some(cmd) => tracing::debug!(cmd, value, "i8042: data for unknown command ignored"),
            None => self.keyboard_write(value),
        }
    }

    /// The keyboard's side: a byte sent to the device.
    fn keyboard_write(&mut self, value: u8) {
        if let Some(cmd) = self.pending_kbd_command.take() {
            match cmd {
                0xf0 if value == 0 => {
                    self.push(KBD_ACK, false);
                    self.push(self.scan_code_set, false);
                }
                0xf0 if (1..=3).contains(&value) => {
                    self.scan_code_set = value;
                    self.push(KBD_ACK, false);
                }
                0xf0 => self.push(KBD_RESEND, false),
                // LEDs, typematic rate: accepted and ignored.
                _ => self.push(KBD_ACK, false),
            }
            return;
        }
        match value {
            0xed | 0xf0 | 0xf3 => {
                self.pending_kbd_command = Some(value);
                self.push(KBD_ACK, false);
            }
            0xee => self.push(0xee, false),
            0xf2 => {
                // MF2 keyboard; the controller translates the second ID byte when translating.
                self.push(KBD_ACK, false);
                self.push(0xab, false);
                self.push(if self.command_byte() & CMD_TRANSLATE != 0 { 0x41 } else { 0x83 }, false);
            }
            0xf4..=0xf6 => self.push(KBD_ACK, false),
            0xff => {
                self.scan_code_set = 2;
                self.push(KBD_ACK, false);
                self.push(KBD_SELF_TEST_OK, false);
            }
            _ => self.push(KBD_RESEND, false),
        }
    }
}

whole_device_state! {
    /// The complete state of the controller and its keyboard: the internal RAM (command byte
    /// first), the bytes waiting in the output buffer with their source, the byte an empty
    /// buffer rereads, a controller or keyboard command waiting for its data byte, the output
    /// port, whether the last write went to the command port (status A2), the scan code set,
    /// and the IRQ1/IRQ12 levels as last driven.
    I8042State for I8042
}

impl I8042 {
    fn check_state(&self) -> Result<(), StateError> {
        ensure_state!(
            self.output.len() <= OUTPUT_CAPACITY,
            "i8042",
            "{} bytes in an output buffer of {OUTPUT_CAPACITY}",
            self.output.len()
        );
        if let Some(c) = self.pending_command {
            let takes_data = matches!(c, 0x60..=0x7f | 0xd1..=0xd4);
            ensure_state!(takes_data, "i8042", "controller command {c:#04x} does not take a data byte");
        }
        if let Some(c) = self.pending_kbd_command {
            let takes_data = matches!(c, 0xed | 0xf0 | 0xf3);
            ensure_state!(takes_data, "i8042", "keyboard command {c:#04x} does not take a parameter");
        }
        ensure_state!((1..=3).contains(&self.scan_code_set), "i8042", "scan code set {}", self.scan_code_set);
        // The lines follow the buffer's head and the enables after every access.
        let mut driven = self.clone();
        driven.update_irqs(&mut IrqLines::default());
        ensure_state!(
            (driven.kbd_irq, driven.aux_irq) == (self.kbd_irq, self.aux_irq),
            "i8042",
            "IRQ1/IRQ12 levels {:?} do not follow the output buffer and command byte",
            (self.kbd_irq, self.aux_irq)
        );
        Ok(())
    }
}

impl PioDevice for I8042 {
    /// Byte `i` of a wide access goes to port `base + offset + i`, as an ISA bus splits it.
    fn pio_read(&mut self, ctx: &mut DeviceContext<'_>, base: u16, offset: u16, data: &mut [u8]) {
        let first = base.wrapping_add(offset);
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = match first.wrapping_add(i as u16) {
                ports::I8042_DATA => self.read_data(ctx.irqs),
                ports::I8042_COMMAND => self.status(),
                port => {
                    tracing::debug!(port, "i8042: read of unknown port");
                    0xff
                }
            };
        }
    }

    fn pio_write(&mut self, ctx: &mut DeviceContext<'_>, base: u16, offset: u16, data: &[u8]) {
        let first = base.wrapping_add(offset);
        for (i, &byte) in data.iter().enumerate() {
            match first.wrapping_add(i as u16) {
                ports::I8042_DATA => {
                    self.last_write_was_command = false;
                    self.write_data(byte, ctx.requests);
                }
                ports::I8042_COMMAND => {
                    self.last_write_was_command = true;
                    self.write_command(byte, ctx.requests);
                }
                port => tracing::debug!(port, "i8042: write to unknown port ignored"),
            }
            self.update_irqs(ctx.irqs);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::testing::{lockstep, refused, restored};
    use crate::{IrqChange, ManualClock, Stateful};

    #[derive(Default)]
    struct Harness {
        dev: I8042,
        irqs: IrqLines,
        requests: Vec<VmRequest>,
    }

    impl Harness {
        fn new() -> Self {
            Self::default()
        }
        fn outb(&mut self, port: u16, value: u8) -> &mut Self {
            let mut clock = ManualClock(0);
            let mut ctx = DeviceContext { inputs: &mut clock, irqs: &mut self.irqs, requests: &mut self.requests };
            self.dev.pio_write(&mut ctx, port, 0, &[value]);
            self
        }
        fn inb(&mut self, port: u16) -> u8 {
            let mut clock = ManualClock(0);
            let mut ctx = DeviceContext { inputs: &mut clock, irqs: &mut self.irqs, requests: &mut self.requests };
            let mut b = [0u8];
            self.dev.pio_read(&mut ctx, port, 0, &mut b);
            b[0]
        }
        /// Reads everything in the output buffer, as a driver's flush loop does.
        fn drain_output(&mut self) -> Vec<u8> {
            let mut out = vec![];
            while self.inb(0x64) & STATUS_OBF != 0 {
                out.push(self.inb(0x60));
            }
            out
        }
        fn irq_changes(&mut self) -> Vec<(u8, IrqChange)> {
            self.irqs.drain().collect()
        }
    }

    #[test]
    fn status_register_and_self_test() {
        let mut h = Harness::new();
        assert_eq!(h.inb(0x64), STATUS_UNLOCKED | STATUS_SYS);
        h.outb(0x60, 0x00); // "writes" via 0x60 clear A2
        h.drain_output();
        h.outb(0x64, 0xaa);
        let s = h.inb(0x64);
        assert_eq!(s & (STATUS_OBF | STATUS_A2 | STATUS_AUX_OBF), STATUS_OBF | STATUS_A2);
        assert_eq!(h.inb(0x60), 0x55);
        assert_eq!(h.inb(0x64) & STATUS_OBF, 0);
        assert_eq!(h.inb(0x60), 0x55, "empty buffer rereads the last byte");
        h.outb(0x64, 0xab);
        assert_eq!(h.drain_output(), vec![0x00]);
        h.outb(0x64, 0xa9);
        assert_eq!(h.drain_output(), vec![0x00]);
        // Self-test sets the system flag even if the guest cleared it.
        h.outb(0x64, 0x60).outb(0x60, 0x00);
        assert_eq!(h.inb(0x64) & STATUS_SYS, 0);
        h.outb(0x64, 0xaa);
        assert_eq!(h.inb(0x64) & STATUS_SYS, STATUS_SYS);
        assert!(h.requests.is_empty());
    }

    #[test]
    fn command_byte_round_trip() {
        let mut h = Harness::new();
        h.outb(0x64, 0x20);
        assert_eq!(h.drain_output(), vec![0x45]);
        h.outb(0x64, 0x60).outb(0x60, 0x74);
        h.outb(0x64, 0x20);
        assert_eq!(h.drain_output(), vec![0x74]);
        h.outb(0x64, 0xad).outb(0x64, 0xa7).outb(0x64, 0x20);
        assert_eq!(h.drain_output(), vec![0x74]);
        h.outb(0x64, 0xae).outb(0x64, 0xa8).outb(0x64, 0x20);
        assert_eq!(h.drain_output(), vec![0x44]);
        h.outb(0x64, 0xad).outb(0x64, 0x20);
        assert_eq!(h.drain_output(), vec![0x54]);
        // Internal RAM beyond the command byte.
        h.outb(0x64, 0x65).outb(0x60, 0x99).outb(0x64, 0x25);
        assert_eq!(h.drain_output(), vec![0x99]);
    }

    #[test]
    fn reset_via_pulse_command() {
        let mut h = Harness::new();
        h.outb(0x64, 0xfe);
        assert_eq!(h.requests, vec![VmRequest::Reset]);
        // Pulses that leave line 0 alone do not reset.
        h.requests.clear();
        h.outb(0x64, 0xff).outb(0x64, 0xfd).outb(0x64, 0xf1);
        assert!(h.requests.is_empty());
        h.outb(0x64, 0xf0);
        assert_eq!(h.requests, vec![VmRequest::Reset]);
    }

    #[test]
    fn reset_via_output_port() {
        let mut h = Harness::new();
        h.outb(0x64, 0xd0);
        assert_eq!(h.drain_output(), vec![0xc3]);
        // A20 off keeps the reset line high: no reset.
        h.outb(0x64, 0xd1).outb(0x60, 0xc1);
        assert!(h.requests.is_empty());
        h.outb(0x64, 0xd0);
        assert_eq!(h.drain_output(), vec![0xc1]);
        h.outb(0x64, 0xdf).outb(0x64, 0xd0);
        assert_eq!(h.drain_output(), vec![0xc3]);
        h.outb(0x64, 0xd1).outb(0x60, 0xc2);
        assert_eq!(h.requests, vec![VmRequest::Reset]);
        // 0xd1 followed by another command abandons it.
        h.requests.clear();
        h.outb(0x64, 0xd1).outb(0x64, 0x20);
        h.drain_output();
        h.outb(0x60, 0x00);
        assert!(h.requests.is_empty(), "0x00 went to the keyboard, not the output port");
    }

    #[test]
    fn keyboard_answers_commands() {
        let mut h = Harness::new();
        h.outb(0x60, 0xff);
        assert_eq!(h.drain_output(), vec![0xfa, 0xaa]);
        h.outb(0x60, 0xf2);
        assert_eq!(h.drain_output(), vec![0xfa, 0xab, 0x41]);
        h.outb(0x64, 0x60).outb(0x60, 0x05); // translation off
        h.outb(0x60, 0xf2);
        assert_eq!(h.drain_output(), vec![0xfa, 0xab, 0x83]);
        h.outb(0x60, 0xed).outb(0x60, 0x07);
        assert_eq!(h.drain_output(), vec![0xfa, 0xfa]);
        h.outb(0x60, 0xf0).outb(0x60, 0x00);
        assert_eq!(h.drain_output(), vec![0xfa, 0xfa, 0x02]);
        h.outb(0x60, 0xf0).outb(0x60, 0x09);
        assert_eq!(h.drain_output(), vec![0xfa, 0xfe]);
        h.outb(0x60, 0xee).outb(0x60, 0xf4).outb(0x60, 0x12);
        assert_eq!(h.drain_output(), vec![0xee, 0xfa, 0xfe]);
        // Controller-injected bytes.
        h.outb(0x64, 0xd2).outb(0x60, 0x1c);
        h.outb(0x64, 0xd3).outb(0x60, 0x08);
        assert_eq!(h.inb(0x64) & (STATUS_OBF | STATUS_AUX_OBF), STATUS_OBF);
        assert_eq!(h.inb(0x60), 0x1c);
        assert_eq!(h.inb(0x64) & (STATUS_OBF | STATUS_AUX_OBF), STATUS_OBF | STATUS_AUX_OBF);
        assert_eq!(h.inb(0x60), 0x08);
        h.outb(0x64, 0xd4).outb(0x60, 0xff);
        assert!(h.drain_output().is_empty(), "no mouse answers");
    }

    #[test]
    fn irq1_follows_the_output_buffer() {
        let mut h = Harness::new();
        h.outb(0x64, 0xaa);
        assert_eq!(h.irq_changes(), vec![(1, IrqChange::Level(true))]);
        h.outb(0x64, 0xab);
        assert_eq!(h.irq_changes(), vec![], "still full: no new edge");
        h.inb(0x60);
        assert_eq!(
            h.irq_changes(),
            vec![(1, IrqChange::Level(false)), (1, IrqChange::Level(true))],
            "the next byte gives a fresh edge"
        );
        h.inb(0x60);
        assert_eq!(h.irq_changes(), vec![(1, IrqChange::Level(false))]);
        h.inb(0x60);
        assert_eq!(h.irq_changes(), vec![], "empty buffer: nothing");
        // Interrupts disabled in the command byte: none; enabling with a byte waiting raises.
        h.outb(0x64, 0x60).outb(0x60, 0x00);
        h.outb(0x64, 0x20);
        assert_eq!(h.irq_changes(), vec![]);
        h.outb(0x64, 0x60);
        assert_eq!(h.irq_changes(), vec![]);
        h.outb(0x60, 0x03);
        assert_eq!(h.irq_changes(), vec![(1, IrqChange::Level(true))], "enabled with a byte waiting");
        h.drain_output();
        assert_eq!(h.irq_changes(), vec![(1, IrqChange::Level(false))]);
        h.outb(0x64, 0xd3).outb(0x60, 0x42);
        assert_eq!(h.irq_changes(), vec![(12, IrqChange::Level(true))]);
        h.inb(0x60);
        assert_eq!(h.irq_changes(), vec![(12, IrqChange::Level(false))]);
        h.outb(0x64, 0x60).outb(0x60, 0x00);
        h.outb(0x64, 0xd2).outb(0x60, 0x01);
        assert_eq!(h.irq_changes(), vec![]);
        h.outb(0x64, 0x60).outb(0x60, 0x01);
        assert_eq!(h.irq_changes(), vec![(1, IrqChange::Level(true))]);
    }

    #[test]
    fn ctrl_alt_del_is_typed_in_the_set_the_guest_reads_and_raises_irq1() {
        let mut h = Harness::new();
        h.dev.press_ctrl_alt_del(&mut h.irqs);
        assert_eq!(h.irq_changes(), vec![(irq::KEYBOARD, IrqChange::Level(true))]);
        assert_eq!(h.drain_output(), CTRL_ALT_DEL_SET1.to_vec());
        assert!(h.requests.is_empty(), "a request to shut down is not a reset");
        // Translation off: set 2.
        h.outb(0x64, 0x60).outb(0x60, CMD_KBD_INT | CMD_SYS);
        h.irq_changes();
        h.dev.press_ctrl_alt_del(&mut h.irqs);
        assert_eq!(h.drain_output(), CTRL_ALT_DEL_SET2.to_vec());
        // Interrupt disabled in the command byte: the keys wait, no IRQ1.
        h.outb(0x64, 0x60).outb(0x60, CMD_SYS | CMD_TRANSLATE);
        h.irq_changes();
        h.dev.press_ctrl_alt_del(&mut h.irqs);
        assert!(h.irq_changes().is_empty());
        assert_eq!(h.drain_output(), CTRL_ALT_DEL_SET1.to_vec());
    }

    #[test]
    fn ctrl_alt_del_keys_survive_a_state_restore() {
        let mut h = Harness::new();
        h.dev.press_ctrl_alt_del(&mut h.irqs);
        assert_eq!(h.inb(0x60), 0x1d);
        h.irq_changes();
        let mut twin = Harness { dev: restored(&h.dev, I8042::new()), ..Harness::default() };
        assert_eq!(twin.dev.save_state(), h.dev.save_state());
        assert_eq!(twin.drain_output(), h.drain_output());
        assert_eq!(twin.irq_changes(), h.irq_changes());
    }

    #[test]
    fn output_buffer_is_bounded() {
        let mut h = Harness::new();
        for _ in 0..100 {
            h.outb(0x60, 0xff);
        }
        assert_eq!(h.drain_output().len(), OUTPUT_CAPACITY);
    }

    /// One random access chosen by `r`; returns what was read and the line changes.
    fn random_step(h: &mut Harness, r: u32) -> Vec<u8> {
        let mut out = vec![];
        let base = if r & 1 == 0 { 0x60 } else { 0x64 };
        let offset = ((r >> 1) % 5) as u16;
        let len = [1usize, 2, 4][((r >> 4) % 3) as usize];
        let value = (r >> 8) as u8;
        let mut clock = ManualClock(0);
        let mut ctx = DeviceContext { inputs: &mut clock, irqs: &mut h.irqs, requests: &mut h.requests };
        if (r >> 16) % 2 == 0 {
            h.dev.pio_write(&mut ctx, base, offset, &vec![value; len]);
        } else {
            let mut b = vec![0u8; len];
            h.dev.pio_read(&mut ctx, base, offset, &mut b);
            out.extend(b);
        }
        out.extend(h.irqs.drain().map(|(l, c)| l ^ u8::from(c == IrqChange::Level(true))));
        out
    }

    #[test]
    fn random_accesses_are_deterministic_and_panic_free() {
        let run = || {
            let mut h = Harness::new();
            let mut seed = 0x5555_aaaa_1234_4321u64;
            let mut out = vec![];
            for _ in 0..20_000 {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                out.extend(random_step(&mut h, (seed >> 32) as u32));
            }
            (h.dev, out, h.requests)
        };
        assert_eq!(run(), run());
    }

    fn fork(h: &Harness) -> Harness {
        Harness { dev: restored(&h.dev, I8042::new()), irqs: IrqLines::default(), requests: vec![] }
    }

    #[test]
    fn state_restored_mid_run_continues_identically() {
        for seed in 0..40u64 {
            let split = (seed as usize * 97) % 3000;
            let (a, b) = lockstep(seed, split, 3000, Harness::new(), fork, |h, r| {
                let out = random_step(h, r);
                (out, std::mem::take(&mut h.requests))
            });
            assert_eq!(a.dev, b.dev);
        }
    }

    #[test]
    fn state_keeps_pending_commands_and_queued_bytes() {
        let mut h = Harness::new();
        h.outb(0x60, 0xf2); // three bytes queued, IRQ1 high
        h.outb(0x64, 0xd3).outb(0x60, 0x42); // an aux byte behind them
        h.outb(0x60, 0xf0); // keyboard waits for the scan code set
        h.outb(0x64, 0xd1); // controller waits for the output port
        h.irq_changes();
        let mut twin = fork(&h);
        let mut seen = vec![];
        for g in [&mut h, &mut twin] {
            g.outb(0x60, 0xc2); // output port: reset line low
            g.outb(0x60, 0x03); // to the keyboard: scan code set 3
            let status = g.inb(0x64);
            seen.push((status, g.drain_output(), g.irq_changes(), std::mem::take(&mut g.requests)));
        }
        assert_eq!(seen[0], seen[1]);
        assert_eq!(seen[0].1, vec![0xfa, 0xab, 0x41, 0x42, 0xfa, 0xfa], "ID, aux byte, two ACKs");
        assert_eq!(seen[0].3, vec![VmRequest::Reset]);
        assert_eq!(h.dev, twin.dev);
    }

    #[test]
    fn impossible_states_are_refused() {
        let mut h = Harness::new();
        h.outb(0x64, 0xaa);
        let mut fresh = I8042::new();
        let bad = |f: fn(&mut I8042)| {
            let mut s = h.dev.save_state();
            f(&mut s.0);
            s
        };
        refused(&mut fresh, &bad(|d| d.output.extend([(0, false); OUTPUT_CAPACITY])), "17 bytes");
        refused(&mut fresh, &bad(|d| d.pending_command = Some(0xaa)), "controller command 0xaa");
        refused(&mut fresh, &bad(|d| d.pending_kbd_command = Some(0xff)), "keyboard command 0xff");
        refused(&mut fresh, &bad(|d| d.scan_code_set = 0), "scan code set 0");
        refused(&mut fresh, &bad(|d| d.kbd_irq = false), "IRQ1/IRQ12 levels (false, false)");
        refused(&mut fresh, &bad(|d| d.aux_irq = true), "do not follow");
    }
}
