//! The legacy PC device set and its port map.

use std::cell::RefCell;
use std::rc::Rc;

use ftvm_devices::apic::{LocalApicRegisters, LAPIC_BASE, LAPIC_SIZE};
use ftvm_devices::i8042::I8042;
use ftvm_devices::pic::Pic;
use ftvm_devices::pit::Pit;
use ftvm_devices::power::{NullPort, PowerPort};
use ftvm_devices::rtc::Rtc;
use ftvm_devices::uart::Uart;
use ftvm_devices::{ports, Bus, GuestNanos, IrqLines, MmioDevice, PioDevice, Timed};

use crate::error::{Error, Result};

/// The devices of a VM and the buses that reach them.
pub struct Devices {
    pub pic: Rc<RefCell<Pic>>,
    pub pit: Rc<RefCell<Pit>>,
    pub rtc: Rc<RefCell<Rtc>>,
    pub uart: Rc<RefCell<Uart>>,
    pub i8042: Rc<RefCell<I8042>>,
    pub pio: Bus<dyn PioDevice>,
    pub mmio: Bus<dyn MmioDevice>,
}

impl Devices {
    /// The standard set: PIC pair, PIT, CMOS RTC, COM1, i8042, the power port and the POST
    /// port. `rtc_base_unix` is the wall-clock time the RTC shows at guest time 0.
    pub fn new(rtc_base_unix: u64) -> Result<Self> {
        let pic = Rc::new(RefCell::new(Pic::new()));
        let pit = Rc::new(RefCell::new(Pit::new()));
        let rtc = Rc::new(RefCell::new(Rtc::new(rtc_base_unix)));
        let uart = Rc::new(RefCell::new(Uart::new()));
        let i8042 = Rc::new(RefCell::new(I8042::new()));
        let mut pio: Bus<dyn PioDevice> = Bus::new();
        let map: [(u16, u16, Rc<RefCell<dyn PioDevice>>); 11] = [
            (ports::PIC_MASTER, 2, pic.clone()),
            (ports::PIC_SLAVE, 2, pic.clone()),
            (ports::PIC_ELCR, 2, pic.clone()),
            (ports::PIT, 4, pit.clone()),
            (ports::SYSTEM_CONTROL_B, 1, pit.clone()),
            (ports::I8042_DATA, 1, i8042.clone()),
            (ports::I8042_COMMAND, 1, i8042.clone()),
            (ports::CMOS, 2, rtc.clone()),
            (ports::COM1, 8, uart.clone()),
            (ports::POWER, 2, Rc::new(RefCell::new(PowerPort))),
            (ports::POST, 1, Rc::new(RefCell::new(NullPort))),
        ];
        for (base, len, dev) in map {
            pio.insert(base.into(), len.into(), dev).map_err(|e| Error::Devices(format!("port {base:#x}: {e}")))?;
        }
        let mut mmio: Bus<dyn MmioDevice> = Bus::new();
        mmio.insert(LAPIC_BASE, LAPIC_SIZE, Rc::new(RefCell::new(LocalApicRegisters::default())))
            .map_err(|e| Error::Devices(format!("local APIC registers: {e}")))?;
        Ok(Devices { pic, pit, rtc, uart, i8042, pio, mmio })
    }

    /// Applies interrupt line changes to the PIC, in order.
    pub fn apply_irqs(&self, irqs: &mut IrqLines) {
        if irqs.is_empty() {
            return;
        }
        let mut pic = self.pic.borrow_mut();
        for (line, change) in irqs.drain() {
            pic.set_irq(line, change);
        }
    }

    /// The earliest guest time at which a timer device needs attention.
    pub fn next_deadline(&self) -> Option<GuestNanos> {
        [self.pit.borrow().next_deadline(), self.rtc.borrow().next_deadline()].into_iter().flatten().min()
    }

    /// Brings the timer devices up to guest time `now` (each raises at most one interrupt).
    pub fn on_time(&self, now: GuestNanos, irqs: &mut IrqLines) {
        fn poll<T: Timed>(dev: &RefCell<T>, now: GuestNanos, irqs: &mut IrqLines) {
            let due = dev.borrow().next_deadline().is_some_and(|d| d <= now);
            if due {
                dev.borrow_mut().on_time(now, irqs);
            }
        }
        poll(&self.pit, now, irqs);
        poll(&self.rtc, now, irqs);
    }
}
