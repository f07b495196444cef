//! The 16550A console UART (COM1), on vm-superio's `Serial`.
//!
//! Host effects stay out of the device: transmitted bytes collect in a buffer that the VMM
//! drains after each exit and treats as an *output* (written to the console in a plain run,
//! held for the backup under protection). The line status register always reports an empty
//! transmitter, so the guest never sees host back-pressure. Received bytes are host inputs:
//! the VMM admits them through the event source and hands them to [`Uart::receive`].

use std::cell::Cell;
use std::rc::Rc;

use vm_superio::{Serial, Trigger};

use crate::bus::{DeviceContext, PioDevice};
use crate::irq;

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
    serial: Serial<PendingEdge, vm_superio::serial::NoEvents, Vec<u8>>,
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
}
