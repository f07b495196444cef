//! The 16550A console UART (COM1), on vm-superio's `Serial`.
//!
//! Host effects stay out of the device: transmitted bytes collect in a buffer that the VMM
//! drains after each exit and treats as an *output* (written to the console in a plain run,
//! held for the backup under protection). The line status register always reports an empty
//! transmitter, so the guest never sees host back-pressure. Received bytes are host inputs:
//! the VMM admits them through the event source and hands them to [`Uart::receive`].

use std::cell::Cell;
use std::rc::Rc;

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};

use crate::bus::{DeviceContext, PioDevice};
use crate::{ensure_state, irq, StateError, Stateful};

/// Remembers that vm-superio asked for an interrupt; the UART turns it into an IRQ4 edge.
#[derive(Clone, Default)]
struct PendingEdge(Rc<Cell<bool>>);

impl Trigger for PendingEdge {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.set(true);
        Ok(())
    }
}

/// COM1: a 16550A at 0x3f8-0x3ff on IRQ 4.
pub struct Uart {
    serial: Serial<PendingEdge, NoEvents, Vec<u8>>,
    edge: PendingEdge,
}

impl Default for Uart {
    fn default() -> Self {
        Self::new()
    }
}

impl Uart {
    pub fn new() -> Self {
        let edge = PendingEdge::default();
        Uart { serial: Serial::new(edge.clone(), Vec::new()), edge }
    }

    /// Takes the bytes the guest transmitted since the last call.
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(self.serial.writer_mut())
    }

    /// How many received bytes the FIFO can still take.
    pub fn receive_capacity(&self) -> usize {
        self.serial.fifo_capacity()
    }

    /// Delivers console input (already admitted by the event source). Returns how many bytes
    /// fit in the receive FIFO; the caller keeps the rest for a later exit.
    pub fn receive(&mut self, bytes: &[u8], irqs: &mut crate::IrqLines) -> usize {
        let n = bytes.len().min(self.serial.fifo_capacity());
        if n > 0 {
            // Infallible trigger and a FIFO with room: enqueue cannot fail.
            let _ = self.serial.enqueue_raw_bytes(&bytes[..n]);
            self.raise_if_triggered(irqs);
        }
        n
    }

    /// The register state, for snapshots and state digests.
    pub fn state(&self) -> vm_superio::serial::SerialState {
        self.serial.state()
    }

    fn raise_if_triggered(&self, irqs: &mut crate::IrqLines) {
        if self.edge.0.replace(false) {
            irqs.pulse(irq::COM1);
        }
    }
}

/// The complete state of COM1: vm-superio's registers and receive FIFO, an interrupt edge
/// vm-superio asked for that the UART has not pulsed yet, and transmitted bytes the VMM has not
/// taken yet (an output not yet written to the console).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UartState {
    #[serde(with = "SerialStateDef")]
    serial: SerialState,
    pending_edge: bool,
    output: Vec<u8>,
}

/// vm-superio's `SerialState` has no serde of its own: this mirrors it field by field.
#[derive(Serialize, Deserialize)]
#[serde(remote = "SerialState")]
struct SerialStateDef {
    baud_divisor_low: u8,
    baud_divisor_high: u8,
    interrupt_enable: u8,
    interrupt_identification: u8,
    line_control: u8,
    line_status: u8,
    modem_control: u8,
    modem_status: u8,
    scratch: u8,
    in_buffer: Vec<u8>,
}

/// The interrupt enables a 16550A has (vm-superio keeps only these).
const IER_BITS: u8 = 0x0f;
/// Line status: data ready, and the transmitter always empty and idle.
const LSR_DATA_READY: u8 = 0x01;
const LSR_TRANSMITTER_EMPTY: u8 = 0x60;
const IIR_NONE: u8 = 0x01;
/// The interrupts vm-superio identifies: THR empty, received data available.
const IIR_SOURCES: u8 = 0x06;

impl UartState {
    fn check(&self) -> Result<(), StateError> {
        let s = &self.serial;
        let capacity = Uart::new().receive_capacity();
        ensure_state!(
            s.in_buffer.len() <= capacity,
            "uart",
            "{} bytes in a receive FIFO of {capacity}",
            s.in_buffer.len()
        );
        ensure_state!(
            s.interrupt_enable & !IER_BITS == 0,
            "uart",
            "IER {:#04x} enables what a 16550A lacks",
            s.interrupt_enable
        );
        let iir = s.interrupt_identification;
        ensure_state!(
            iir == IIR_NONE || (iir != 0 && iir & !IIR_SOURCES == 0),
            "uart",
            "interrupt identification {iir:#04x} is neither none nor THR empty / data available"
        );
        let lsr = LSR_TRANSMITTER_EMPTY | if s.in_buffer.is_empty() { 0 } else { LSR_DATA_READY };
        ensure_state!(
            s.line_status == lsr,
            "uart",
            "line status {:#04x} with {} bytes received (expected {lsr:#04x})",
            s.line_status,
            s.in_buffer.len()
        );
        Ok(())
    }
}

impl Stateful for Uart {
    type State = UartState;

    fn save_state(&self) -> UartState {
        UartState { serial: self.serial.state(), pending_edge: self.edge.0.get(), output: self.serial.writer().clone() }
    }

    fn restore_state(&mut self, state: &UartState) -> Result<(), StateError> {
        state.check()?;
        let edge = PendingEdge::default();
        let serial = Serial::from_state(&state.serial, edge.clone(), NoEvents, state.output.clone())
            .map_err(|e| StateError::invalid("uart", e.to_string()))?;
        // `from_state` triggers for interrupts that are already identified, but those were
        // pulsed before the state was saved: only the saved flag is still owed.
        edge.0.set(state.pending_edge);
        *self = Uart { serial, edge };
        Ok(())
    }
}

impl PioDevice for Uart {
    fn pio_read(&mut self, ctx: &mut DeviceContext<'_>, _base: u16, offset: u16, data: &mut [u8]) {
        // Registers are byte-wide; a wider access reads the register at the first byte.
        let value = if offset < 8 { self.serial.read(offset as u8) } else { 0xff };
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = value;
        }
        self.raise_if_triggered(ctx.irqs);
    }

    fn pio_write(&mut self, ctx: &mut DeviceContext<'_>, _base: u16, offset: u16, data: &[u8]) {
        if let (true, Some(&b)) = (offset < 8, data.first()) {
            // The output writer is a Vec and the trigger infallible: this cannot fail.
            let _ = self.serial.write(offset as u8, b);
        }
        self.raise_if_triggered(ctx.irqs);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::testing::{lockstep, refused, restored};
    use crate::{IrqChange, IrqLines, ManualClock};

    fn ctx_parts() -> (ManualClock, IrqLines, Vec<crate::VmRequest>) {
        (ManualClock(0), IrqLines::default(), vec![])
    }

    #[test]
    fn transmit_collects_output_and_lsr_never_shows_backpressure() {
        let mut uart = Uart::new();
        let (mut c, mut i, mut r) = ctx_parts();
        let mut ctx = DeviceContext { inputs: &mut c, irqs: &mut i, requests: &mut r };
        for &b in b"hi\n" {
            let mut lsr = [0u8];
            uart.pio_read(&mut ctx, 0x3f8, 5, &mut lsr);
            assert_eq!(lsr[0] & 0x60, 0x60, "THR and transmitter empty");
            uart.pio_write(&mut ctx, 0x3f8, 0, &[b]);
        }
        assert_eq!(uart.take_output(), b"hi\n");
        assert!(uart.take_output().is_empty());
    }

    #[test]
    fn received_bytes_raise_irq4_when_enabled() {
        let mut uart = Uart::new();
        let (mut c, mut i, mut r) = ctx_parts();
        {
            let mut ctx = DeviceContext { inputs: &mut c, irqs: &mut i, requests: &mut r };
            uart.pio_write(&mut ctx, 0x3f8, 1, &[0x01]); // IER: received data available
        }
        assert_eq!(uart.receive(b"ab", &mut i), 2);
        assert_eq!(i.drain().collect::<Vec<_>>(), vec![(irq::COM1, IrqChange::Pulse)]);
        let mut ctx = DeviceContext { inputs: &mut c, irqs: &mut i, requests: &mut r };
        let mut b = [0u8];
        uart.pio_read(&mut ctx, 0x3f8, 0, &mut b);
        assert_eq!(b[0], b'a');
        uart.pio_read(&mut ctx, 0x3f8, 0, &mut b);
        assert_eq!(b[0], b'b');
    }

    #[test]
    fn out_of_range_and_odd_sizes_do_not_panic() {
        let mut uart = Uart::new();
        let (mut c, mut i, mut r) = ctx_parts();
        let mut ctx = DeviceContext { inputs: &mut c, irqs: &mut i, requests: &mut r };
        let mut wide = [0u8; 4];
        uart.pio_read(&mut ctx, 0x3f8, 9, &mut wide);
        uart.pio_read(&mut ctx, 0x3f8, 0, &mut []);
        uart.pio_write(&mut ctx, 0x3f8, 0, &[]);
        uart.pio_write(&mut ctx, 0x3f8, 12, &[1, 2]);
    }

    /// A UART with the context of one exit.
    struct Harness {
        uart: Uart,
        irqs: IrqLines,
    }

    /// One random step chosen by `r`: a register access (any register, DLAB and loopback
    /// included), console input, or the VMM draining the output. Returns what was read or
    /// taken and the line changes.
    fn random_step(h: &mut Harness, r: u32) -> Vec<u8> {
        let (mut c, mut q) = (ManualClock(0), vec![]);
        let mut out = vec![];
        let offset = (r % 8) as u16;
        let value = (r >> 8) as u8;
        match (r >> 16) % 8 {
            0..=2 => {
                // Mostly plain settings: loopback (MCR bit 4) and DLAB only now and then.
                let value = match offset {
                    3 if r & 0x100_0000 == 0 => value & 0x7f,
                    4 if r & 0x100_0000 == 0 => value & 0x0f,
                    _ => value,
                };
                let mut ctx = DeviceContext { inputs: &mut c, irqs: &mut h.irqs, requests: &mut q };
                h.uart.pio_write(&mut ctx, 0x3f8, offset, &[value]);
            }
            3..=5 => {
                let mut b = [0u8];
                let mut ctx = DeviceContext { inputs: &mut c, irqs: &mut h.irqs, requests: &mut q };
                h.uart.pio_read(&mut ctx, 0x3f8, offset, &mut b);
                out.push(b[0]);
            }
            6 => {
                let bytes = vec![value; (r >> 24) as usize % 24];
                out.push(h.uart.receive(&bytes, &mut h.irqs) as u8);
            }
            _ => out.extend(h.uart.take_output()),
        }
        out.extend(h.irqs.drain().map(|(line, change)| line ^ u8::from(change == IrqChange::Pulse) << 7));
        out
    }

    fn fork(h: &Harness) -> Harness {
        Harness { uart: restored(&h.uart, Uart::new()), irqs: IrqLines::default() }
    }

    #[test]
    fn state_restored_mid_run_continues_identically() {
        for seed in 0..40u64 {
            let split = (seed as usize * 97) % 3000;
            let h = Harness { uart: Uart::new(), irqs: IrqLines::default() };
            let (a, b) = lockstep(seed, split, 3000, h, fork, random_step);
            assert_eq!(a.uart.save_state(), b.uart.save_state());
        }
    }

    #[test]
    fn state_keeps_the_fifo_pending_interrupts_and_untaken_output() {
        let mut h = Harness { uart: Uart::new(), irqs: IrqLines::default() };
        let (mut c, mut q) = (ManualClock(0), vec![]);
        {
            let mut ctx = DeviceContext { inputs: &mut c, irqs: &mut h.irqs, requests: &mut q };
            h.uart.pio_write(&mut ctx, 0x3f8, 1, &[0x03]); // IER: data available, THR empty
            h.uart.pio_write(&mut ctx, 0x3f8, 0, b"x"); // transmitted, not taken by the VMM
            h.uart.pio_write(&mut ctx, 0x3f8, 7, &[0x5a]); // scratch
            h.uart.pio_write(&mut ctx, 0x3f8, 3, &[0x83]); // DLAB set
            h.uart.pio_write(&mut ctx, 0x3f8, 0, &[0x01]); // divisor 1 (115200 baud)
        }
        assert_eq!(h.uart.receive(b"hello", &mut h.irqs), 5);
        h.irqs.drain();
        let mut twin = fork(&h);
        assert!(twin.irqs.is_empty(), "a restore raises nothing");
        let mut seen = vec![];
        for g in [&mut h, &mut twin] {
            let mut ctx = DeviceContext { inputs: &mut c, irqs: &mut g.irqs, requests: &mut q };
            let mut run = vec![];
            for (offset, value) in [(0, None), (7, None), (3, Some(0x03)), (2, None), (2, None), (0, None), (0, None)] {
                if let Some(v) = value {
                    g.uart.pio_write(&mut ctx, 0x3f8, offset, &[v]);
                }
                let mut b = [0u8];
                g.uart.pio_read(&mut ctx, 0x3f8, offset, &mut b);
                run.push(b[0]);
            }
            let changes: Vec<_> = g.irqs.drain().collect();
            seen.push((run, changes, g.uart.take_output(), g.uart.receive_capacity()));
        }
        assert_eq!(seen[0], seen[1]);
        assert_eq!(seen[0].0, vec![0x01, 0x5a, 0x03, 0xc6, 0xc1, b'h', b'e'], "divisor, scratch, LCR, IIR twice, data");
        assert_eq!(seen[0].2, b"x");
    }

    #[test]
    fn impossible_states_are_refused() {
        let mut uart = Uart::new();
        uart.receive(b"ab", &mut IrqLines::default());
        let mut fresh = Uart::new();
        let bad = |f: fn(&mut SerialState)| {
            let mut s = uart.save_state();
            f(&mut s.serial);
            s
        };
        refused(&mut fresh, &bad(|s| s.in_buffer = vec![0; 65]), "65 bytes in a receive FIFO of 64");
        refused(&mut fresh, &bad(|s| s.interrupt_enable = 0x10), "IER 0x10");
        refused(&mut fresh, &bad(|s| s.interrupt_identification = 0x08), "identification 0x08");
        refused(&mut fresh, &bad(|s| s.interrupt_identification = 0x00), "identification 0x00");
        refused(&mut fresh, &bad(|s| s.in_buffer.clear()), "line status 0x61 with 0 bytes");
    }
}
