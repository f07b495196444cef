//! The port-I/O and MMIO buses: address ranges mapped to devices.
//!
//! The VMM dispatches every port-I/O and MMIO exit through a [`Bus`]. Devices live on the vCPU
//! thread only (they are touched between exits, never concurrently), so they are shared as
//! `Rc<RefCell<..>>`: the VMM keeps its own handle to devices it must reach directly (the PIC
//! for injection, timers for deadlines) while the bus holds another.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

use crate::{HostInputs, IrqLines, VmRequest};

/// What a device may use while it handles one access.
pub struct DeviceContext<'a> {
    /// Host inputs through the event source (the choke point): the guest clock (reading it
    /// is a time-dependent read) and entropy.
    pub inputs: &'a mut dyn HostInputs,
    /// Interrupt line changes, applied to the PIC after the access.
    pub irqs: &'a mut IrqLines,
    /// Requests to the VM as a whole (reset, power-off).
    pub requests: &'a mut Vec<VmRequest>,
}

/// A device reached through port I/O. `base` is the start of the range the access hit (a
/// device may be registered at several ranges), `offset` the distance from it.
pub trait PioDevice {
    fn pio_read(&mut self, ctx: &mut DeviceContext<'_>, base: u16, offset: u16, data: &mut [u8]);
    fn pio_write(&mut self, ctx: &mut DeviceContext<'_>, base: u16, offset: u16, data: &[u8]);
}

/// A device reached through MMIO.
pub trait MmioDevice {
    fn mmio_read(&mut self, ctx: &mut DeviceContext<'_>, base: u64, offset: u64, data: &mut [u8]);
    fn mmio_write(&mut self, ctx: &mut DeviceContext<'_>, base: u64, offset: u64, data: &[u8]);
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("range {base:#x}+{len:#x} overlaps an existing device range")]
    Overlap { base: u64, len: u64 },
    #[error("range of zero length at {0:#x}")]
    Empty(u64),
    #[error("no device at {0:#x}")]
    Unmapped(u64),
}

struct Range<D: ?Sized> {
    len: u64,
    device: Rc<RefCell<D>>,
}

/// Address ranges mapped to devices of type `D` (`dyn PioDevice` or `dyn MmioDevice`).
pub struct Bus<D: ?Sized> {
    ranges: BTreeMap<u64, Range<D>>,
}

impl<D: ?Sized> Default for Bus<D> {
    fn default() -> Self {
        Bus { ranges: BTreeMap::new() }
    }
}

impl<D: ?Sized> Bus<D> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Maps `[base, base+len)` to `device`. Ranges never overlap.
    pub fn insert(&mut self, base: u64, len: u64, device: Rc<RefCell<D>>) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::Empty(base));
        }
        let end = base.checked_add(len).ok_or(BusError::Overlap { base, len })?;
        if let Some((&b, r)) = self.ranges.range(..end).next_back() {
            if b + r.len > base {
                return Err(BusError::Overlap { base, len });
            }
        }
        self.ranges.insert(base, Range { len, device });
        Ok(())
    }

    /// Finds the device whose range holds `addr`: (range base, device).
    pub fn resolve(&self, addr: u64) -> Option<(u64, &Rc<RefCell<D>>)> {
        let (&base, r) = self.ranges.range(..=addr).next_back()?;
        (addr - base < r.len).then_some((base, &r.device))
    }
}

impl Bus<dyn PioDevice> {
    pub fn read(&self, ctx: &mut DeviceContext<'_>, port: u16, data: &mut [u8]) -> Result<(), BusError> {
        let (base, dev) = self.resolve(port.into()).ok_or(BusError::Unmapped(port.into()))?;
        dev.borrow_mut().pio_read(ctx, base as u16, port - base as u16, data);
        Ok(())
    }
    pub fn write(&self, ctx: &mut DeviceContext<'_>, port: u16, data: &[u8]) -> Result<(), BusError> {
        let (base, dev) = self.resolve(port.into()).ok_or(BusError::Unmapped(port.into()))?;
        dev.borrow_mut().pio_write(ctx, base as u16, port - base as u16, data);
        Ok(())
    }
}

impl Bus<dyn MmioDevice> {
    pub fn read(&self, ctx: &mut DeviceContext<'_>, addr: u64, data: &mut [u8]) -> Result<(), BusError> {
        let (base, dev) = self.resolve(addr).ok_or(BusError::Unmapped(addr))?;
        dev.borrow_mut().mmio_read(ctx, base, addr - base, data);
        Ok(())
    }
    pub fn write(&self, ctx: &mut DeviceContext<'_>, addr: u64, data: &[u8]) -> Result<(), BusError> {
        let (base, dev) = self.resolve(addr).ok_or(BusError::Unmapped(addr))?;
        dev.borrow_mut().mmio_write(ctx, base, addr - base, data);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ManualClock;

    struct Recorder(Vec<(u16, u16, u8)>);
    impl PioDevice for Recorder {
        fn pio_read(&mut self, _: &mut DeviceContext<'_>, base: u16, offset: u16, data: &mut [u8]) {
            data.fill(offset as u8);
            self.0.push((base, offset, 0));
        }
        fn pio_write(&mut self, _: &mut DeviceContext<'_>, base: u16, offset: u16, data: &[u8]) {
            self.0.push((base, offset, data[0]));
        }
    }

    #[test]
    fn dispatches_by_range_and_rejects_overlap() {
        let mut bus: Bus<dyn PioDevice> = Bus::new();
        let dev = Rc::new(RefCell::new(Recorder(vec![])));
        bus.insert(0x40, 4, dev.clone()).unwrap();
        bus.insert(0x61, 1, dev.clone()).unwrap();
        assert_eq!(bus.insert(0x43, 2, dev.clone()), Err(BusError::Overlap { base: 0x43, len: 2 }));
        assert_eq!(bus.insert(0x3f, 2, dev.clone()), Err(BusError::Overlap { base: 0x3f, len: 2 }));
        assert_eq!(bus.insert(0x50, 0, dev.clone()), Err(BusError::Empty(0x50)));
        let (mut clock, mut irqs, mut req) = (ManualClock(0), IrqLines::default(), vec![]);
        let mut ctx = DeviceContext { inputs: &mut clock, irqs: &mut irqs, requests: &mut req };
        let mut b = [0u8; 1];
        bus.read(&mut ctx, 0x42, &mut b).unwrap();
        assert_eq!(b[0], 2);
        bus.write(&mut ctx, 0x61, &[7]).unwrap();
        assert_eq!(bus.write(&mut ctx, 0x44, &[1]), Err(BusError::Unmapped(0x44)));
        assert_eq!(dev.borrow().0, vec![(0x40, 2, 0), (0x61, 0, 7)]);
    }
}
