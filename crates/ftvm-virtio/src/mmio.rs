//! The virtio-mmio transport, version 2 (virtio 1.x, spec §4.2.2).
//!
//! One 4 KiB window per device: registers below 0x100, the device's configuration space from
//! 0x100. Registers are accessed as aligned 32-bit words (other accesses are ignored and read
//! 0); the configuration space takes any width. Each time the transport sets a bit in
//! InterruptStatus it pulses the device's ISA line: the 8259 is edge-triggered, so a pulse per
//! event keeps an interrupt from being lost while an earlier one is still being handled.

use ftvm_devices::{ensure_same, ensure_state, DeviceContext, IrqLines, MmioDevice, StateError, Stateful};
use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::{GuestAddress, GuestMemory};

use crate::queue::{queue_has_available, Queues};
use crate::{VirtioDevice, VENDOR_ID, VIRTIO_F_VERSION_1};

/// "virt" in little-endian.
pub const MAGIC_VALUE: u32 = 0x7472_6976;
/// The transport version for virtio 1.x (the legacy interface is version 1).
pub const VERSION: u32 = 2;

/// Register offsets (virtio spec §4.2.2).
pub mod regs {
    pub const MAGIC_VALUE: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const SHM_SEL: u64 = 0x0ac;
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    pub const SHM_BASE_LOW: u64 = 0x0b8;
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// Queue registers as the driver wrote them; checked and applied when it sets QueueReady.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct QueueRegs {
    num: u32,
    desc: u64,
    driver: u64,
    device: u64,
}

fn set_low(v: &mut u64, low: u32) {
    *v = (*v & !0xffff_ffff) | u64::from(low);
}

fn set_high(v: &mut u64, high: u32) {
    *v = (*v & 0xffff_ffff) | (u64::from(high) << 32);
}

/// A virtio device `D` behind the MMIO register block, with guest memory `M`.
pub struct MmioTransport<D, M> {
    device: D,
    mem: M,
    irq: u8,
    queues: Vec<Queue>,
    queue_regs: Vec<QueueRegs>,
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    status: u32,
    interrupt_status: u32,
    config_generation: u32,
    /// Guest misbehaviour is reported once at warn level, then at debug level.
    warned: bool,
}

impl<D: VirtioDevice, M: GuestMemory> MmioTransport<D, M> {
    /// `irq`: the device's ISA interrupt line on the PIC.
    pub fn new(device: D, mem: M, irq: u8) -> Self {
        let queues: Vec<Queue> = device
            .queue_max_sizes()
            .iter()
            .map(|&max| Queue::new(max).expect("device queue sizes are powers of two up to 32768"))
            .collect();
        let queue_regs = vec![QueueRegs::default(); queues.len()];
        MmioTransport {
            device,
            mem,
            irq,
            queues,
            queue_regs,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            status: 0,
            interrupt_status: 0,
            config_generation: 0,
            warned: false,
        }
    }

    pub fn device(&self) -> &D {
        &self.device
    }

    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    pub fn memory(&self) -> &M {
        &self.mem
    }

    pub fn irq(&self) -> u8 {
        self.irq
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    pub fn interrupt_status(&self) -> u32 {
        self.interrupt_status
    }

    /// The features the driver accepted.
    pub fn driver_features(&self) -> u64 {
        self.driver_features
    }

    pub fn queue(&self, q: usize) -> Option<&Queue> {
        self.queues.get(q)
    }

    /// Whether the device is live: DRIVER_OK set, and neither FAILED nor DEVICE_NEEDS_RESET.
    pub fn driver_ok(&self) -> bool {
        self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0
            && self.status & (VIRTIO_CONFIG_S_FAILED | VIRTIO_CONFIG_S_NEEDS_RESET) == 0
    }

    /// Whether queue `q` of a live device has a buffer the device has not taken yet.
    pub fn queue_has_available(&self, q: usize) -> bool {
        self.driver_ok() && queue_has_available(&self.mem, self.queues.get(q))
    }

    /// Runs `f` on the device and its queues (host-driven work such as delivering a received
    /// frame), then signals the driver for what `f` did. `None` if the device is not live.
    pub fn with_queues<R>(
        &mut self,
        irqs: &mut IrqLines,
        f: impl FnOnce(&mut D, &mut Queues<'_, M>) -> R,
    ) -> Option<R> {
        if !self.driver_ok() {
            return None;
        }
        let mut queues = Queues::new(&self.mem, &mut self.queues);
        let r = f(&mut self.device, &mut queues);
        let (interrupt, broken) = (queues.wants_interrupt(), queues.broken().map(str::to_string));
        if interrupt {
            self.raise(VIRTIO_MMIO_INT_VRING, irqs);
        }
        if let Some(why) = broken {
            self.needs_reset(&why, irqs);
        }
        Some(r)
    }

    /// Sets a bit in InterruptStatus and pulses the line.
    fn raise(&mut self, bit: u32, irqs: &mut IrqLines) {
        self.interrupt_status |= bit;
        irqs.pulse(self.irq);
    }

    /// The device can no longer work with what the driver gave it (spec §2.1.2): it sets
    /// DEVICE_NEEDS_RESET and tells the driver with a configuration change interrupt. The
    /// VMM carries on; only a reset by the driver revives the device.
    fn needs_reset(&mut self, why: &str, irqs: &mut IrqLines) {
        self.complain(&format!("{why}; device needs reset"));
        self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
        self.raise(VIRTIO_MMIO_INT_CONFIG, irqs);
    }

    fn complain(&mut self, what: &str) {
        if std::mem::replace(&mut self.warned, true) {
            tracing::debug!("{}: {what}", self.device.name());
        } else {
            tracing::warn!(
                "{}: {what} (further guest errors of this device are logged at debug level)",
                self.device.name()
            );
        }
    }

    fn reset(&mut self) {
        tracing::debug!("{}: reset by the driver", self.device.name());
        self.device.reset();
        for q in &mut self.queues {
            q.reset();
        }
        self.queue_regs.iter_mut().for_each(|r| *r = QueueRegs::default());
        self.queue_sel = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.status = 0;
        self.interrupt_status = 0;
    }

    fn write_status(&mut self, value: u32, irqs: &mut IrqLines) {
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        // DEVICE_NEEDS_RESET belongs to the device: only a reset clears it.
        let mut new = value | (old & VIRTIO_CONFIG_S_NEEDS_RESET);
        if new & VIRTIO_CONFIG_S_FEATURES_OK != 0 && old & VIRTIO_CONFIG_S_FEATURES_OK == 0 {
            let offered = self.device.features();
            if self.driver_features & !offered != 0 || self.driver_features & VIRTIO_F_VERSION_1 == 0 {
                // The driver reads FEATURES_OK back and sees the device refused (spec §3.1.1).
                let what = format!(
                    "driver features {:#x} refused (offered {offered:#x}; VIRTIO_F_VERSION_1 is required)",
                    self.driver_features
                );
                self.complain(&what);
                new &= !VIRTIO_CONFIG_S_FEATURES_OK;
            }
        }
        if new & VIRTIO_CONFIG_S_DRIVER_OK != 0 && old & VIRTIO_CONFIG_S_DRIVER_OK == 0 {
            self.status = new;
            if new & VIRTIO_CONFIG_S_FEATURES_OK == 0 {
                self.needs_reset("DRIVER_OK without FEATURES_OK", irqs);
                return;
            }
            tracing::debug!("{}: driver ok, features {:#x}", self.device.name(), self.driver_features);
            self.device.activate(self.driver_features);
        }
        self.status = new;
    }

    fn write_queue_ready(&mut self, value: u32, irqs: &mut IrqLines) {
        let q = self.queue_sel as usize;
        let Some(queue) = self.queues.get_mut(q) else { return };
        if value == 0 {
            queue.set_ready(false);
            return;
        }
        if queue.ready() {
            return;
        }
        if let Err(why) = self.enable_queue(q) {
            self.needs_reset(&format!("queue {q}: {why}"), irqs);
        }
    }

    /// Checks the queue's registers and makes it ready. A bad size or ring address sets the
    /// queue aside rather than let the device read or write at random.
    fn enable_queue(&mut self, q: usize) -> Result<(), String> {
        if self.status & VIRTIO_CONFIG_S_FEATURES_OK == 0 {
            return Err("QueueReady before FEATURES_OK".into());
        }
        let regs = self.queue_regs[q];
        let queue = &mut self.queues[q];
        let size = u16::try_from(regs.num).map_err(|_| format!("queue size {} too large", regs.num))?;
        queue
            .try_set_size(size)
            .map_err(|_| format!("queue size {size} is not a power of two in 1..={}", queue.max_size()))?;
        queue.try_set_desc_table_address(GuestAddress(regs.desc)).map_err(|e| e.to_string())?;
        queue.try_set_avail_ring_address(GuestAddress(regs.driver)).map_err(|e| e.to_string())?;
        queue.try_set_used_ring_address(GuestAddress(regs.device)).map_err(|e| e.to_string())?;
        if regs.driver == 0 {
            // virtio-queue takes an available ring at 0 for an unconfigured queue.
            return Err("available ring at guest address 0 is not supported".into());
        }
        queue.set_event_idx(false);
        queue.set_next_avail(0);
        queue.set_next_used(0);
        queue.set_ready(true);
        if !queue.is_valid(&self.mem) {
            queue.set_ready(false);
            return Err(format!(
                "rings outside guest memory (desc {:#x}, avail {:#x}, used {:#x}, size {size})",
                regs.desc, regs.driver, regs.device
            ));
        }
        Ok(())
    }

    fn notify(&mut self, value: u32, ctx: &mut DeviceContext<'_>) {
        if !self.driver_ok() {
            tracing::debug!(
                "{}: notify of queue {value} while not live (status {:#x}); ignored",
                self.device.name(),
                self.status
            );
            return;
        }
        let Ok(q) = u16::try_from(value) else { return };
        if usize::from(q) >= self.queues.len() {
            self.complain(&format!("notify of queue {q}, which does not exist"));
            return;
        }
        let inputs = &mut *ctx.inputs;
        self.with_queues(ctx.irqs, |device, queues| device.notify(q, queues, inputs));
    }

    fn read_register(&self, offset: u64) -> u32 {
        let q = self.queues.get(self.queue_sel as usize);
        match offset {
            regs::MAGIC_VALUE => MAGIC_VALUE,
            regs::VERSION => VERSION,
            regs::DEVICE_ID => self.device.device_type(),
            regs::VENDOR_ID => VENDOR_ID,
            regs::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            regs::QUEUE_NUM_MAX => q.map_or(0, |q| u32::from(q.max_size())),
            regs::QUEUE_READY => q.map_or(0, |q| u32::from(q.ready())),
            regs::INTERRUPT_STATUS => self.interrupt_status,
            regs::STATUS => self.status,
            // No shared memory regions: a length of all ones says "none" (Linux checks this).
            regs::SHM_LEN_LOW | regs::SHM_LEN_HIGH | regs::SHM_BASE_LOW | regs::SHM_BASE_HIGH => u32::MAX,
            regs::CONFIG_GENERATION => self.config_generation,
            _ => {
                tracing::debug!("{}: read of write-only or unknown register {offset:#x}", self.device.name());
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, value: u32, ctx: &mut DeviceContext<'_>) {
        let sel = self.queue_sel as usize;
        // Queue registers are only honoured while the queue is not ready (spec §4.2.3.2).
        let regs = match self.queues.get(sel) {
            Some(q) if !q.ready() => self.queue_regs.get_mut(sel),
            _ => None,
        };
        match offset {
            regs::DEVICE_FEATURES_SEL => self.device_features_sel = value,
            regs::DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            regs::DRIVER_FEATURES => {
                if self.status & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
                    self.complain("driver features written after FEATURES_OK; ignored");
                    return;
                }
                match self.driver_features_sel {
                    0 => set_low(&mut self.driver_features, value),
                    1 => set_high(&mut self.driver_features, value),
                    _ => {}
                }
            }
            regs::QUEUE_SEL => self.queue_sel = value,
            regs::QUEUE_NUM => {
                if let Some(r) = regs {
                    r.num = value;
                }
            }
            regs::QUEUE_DESC_LOW | regs::QUEUE_DESC_HIGH => {
                if let Some(r) = regs {
                    if offset == regs::QUEUE_DESC_LOW {
                        set_low(&mut r.desc, value)
                    } else {
                        set_high(&mut r.desc, value)
                    }
                }
            }
            regs::QUEUE_DRIVER_LOW | regs::QUEUE_DRIVER_HIGH => {
                if let Some(r) = regs {
                    if offset == regs::QUEUE_DRIVER_LOW {
                        set_low(&mut r.driver, value)
                    } else {
                        set_high(&mut r.driver, value)
                    }
                }
            }
            regs::QUEUE_DEVICE_LOW | regs::QUEUE_DEVICE_HIGH => {
                if let Some(r) = regs {
                    if offset == regs::QUEUE_DEVICE_LOW {
                        set_low(&mut r.device, value)
                    } else {
                        set_high(&mut r.device, value)
                    }
                }
            }
            regs::QUEUE_READY => self.write_queue_ready(value, ctx.irqs),
            regs::QUEUE_NOTIFY => self.notify(value, ctx),
            regs::INTERRUPT_ACK => self.interrupt_status &= !value,
            regs::STATUS => self.write_status(value, ctx.irqs),
            regs::SHM_SEL => {}
            _ => tracing::debug!("{}: write of read-only or unknown register {offset:#x}", self.device.name()),
        }
    }
}

/// The complete state of a transport and the device behind it: every register the driver
/// wrote (selectors, accepted features, status), InterruptStatus, the configuration generation,
/// for each queue the registers as written and virtio-queue's own state (size, ring addresses,
/// ready, the next available and used indices), and the device's state `S`. The interrupt
/// line and device type are recorded to check that the state goes back to the same slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioTransportState<S> {
    device_type: u32,
    irq: u8,
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    status: u32,
    interrupt_status: u32,
    config_generation: u32,
    queues: Vec<SavedQueue>,
    device: S,
}

impl<S> MmioTransportState<S> {
    /// The device's part of the state.
    pub fn device(&self) -> &S {
        &self.device
    }

    #[cfg(test)]
    pub(crate) fn device_mut(&mut self) -> &mut S {
        &mut self.device
    }
}

/// One queue: what the driver wrote and what virtio-queue made of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct SavedQueue {
    regs: QueueRegs,
    #[serde(with = "QueueStateDef")]
    queue: QueueState,
}

/// virtio-queue's `QueueState` has no serde of its own: this mirrors it field by field.
#[derive(Serialize, Deserialize)]
#[serde(remote = "QueueState")]
struct QueueStateDef {
    max_size: u16,
    next_avail: u16,
    next_used: u16,
    event_idx_enabled: bool,
    size: u16,
    ready: bool,
    desc_table: u64,
    avail_ring: u64,
    used_ring: u64,
}

impl<D: VirtioDevice, M: GuestMemory> MmioTransport<D, M> {
    /// Checks a saved queue against this device and guest memory and rebuilds it.
    fn restore_queue(&self, q: usize, saved: &QueueState, max: u16) -> Result<Queue, StateError> {
        let name = self.device.name();
        ensure_same(name, &format!("queue {q} maximum size"), saved.max_size, max)?;
        ensure_state!(!saved.event_idx_enabled, name, "queue {q} uses EVENT_IDX, which is never offered");
        let size = saved.size;
        ensure_state!(
            size.is_power_of_two() && size <= max,
            name,
            "queue {q}: size {size} is not a power of two in 1..={max}"
        );
        let queue = Queue::try_from(*saved).map_err(|e| StateError::invalid(name, format!("queue {q}: {e}")))?;
        if queue.ready() {
            ensure_state!(saved.avail_ring != 0, name, "queue {q} is ready with its available ring at 0");
            ensure_state!(
                queue.is_valid(&self.mem),
                name,
                "queue {q}'s rings are outside guest memory (desc {:#x}, avail {:#x}, used {:#x}, size {size})",
                saved.desc_table,
                saved.avail_ring,
                saved.used_ring
            );
        }
        Ok(queue)
    }
}

impl<D: VirtioDevice, M: GuestMemory> Stateful for MmioTransport<D, M> {
    type State = MmioTransportState<D::State>;

    fn save_state(&self) -> Self::State {
        let queues = self.queues.iter().zip(&self.queue_regs);
        MmioTransportState {
            device_type: self.device.device_type(),
            irq: self.irq,
            queue_sel: self.queue_sel,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            status: self.status,
            interrupt_status: self.interrupt_status,
            config_generation: self.config_generation,
            queues: queues.map(|(queue, &regs)| SavedQueue { regs, queue: queue.state() }).collect(),
            device: self.device.save_state(),
        }
    }

    /// Restores into a transport built for the same device (same type, interrupt line, queue
    /// sizes) over the guest memory the state's rings live in, which must already hold the
    /// saved memory. The device's configuration must match too (its own `restore_state`).
    fn restore_state(&mut self, state: &Self::State) -> Result<(), StateError> {
        let name = self.device.name();
        ensure_same(name, "device type", state.device_type, self.device.device_type())?;
        ensure_same(name, "interrupt line", state.irq, self.irq)?;
        let max_sizes = self.device.queue_max_sizes();
        ensure_same(name, "number of queues", state.queues.len(), max_sizes.len())?;
        let queues = (state.queues.iter().zip(max_sizes).enumerate())
            .map(|(q, (saved, &max))| self.restore_queue(q, &saved.queue, max))
            .collect::<Result<Vec<_>, _>>()?;
        let known = VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG;
        ensure_state!(
            state.interrupt_status & !known == 0,
            name,
            "InterruptStatus {:#x} has bits beyond used-buffer and configuration change",
            state.interrupt_status
        );
        if state.status & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            let offered = self.device.features();
            let accepted = state.driver_features;
            ensure_state!(
                accepted & !offered == 0 && accepted & VIRTIO_F_VERSION_1 != 0,
                name,
                "FEATURES_OK with driver features {accepted:#x}, but this device offers {offered:#x}"
            );
        }
        // Everything of the transport's is checked: now the device, which checks its own part
        // before it changes anything.
        self.device.restore_state(&state.device)?;
        self.queues = queues;
        self.queue_regs = state.queues.iter().map(|q| q.regs).collect();
        self.queue_sel = state.queue_sel;
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.driver_features = state.driver_features;
        self.status = state.status;
        self.interrupt_status = state.interrupt_status;
        self.config_generation = state.config_generation;
        Ok(())
    }
}

impl<D: VirtioDevice, M: GuestMemory> MmioDevice for MmioTransport<D, M> {
    fn mmio_read(&mut self, _ctx: &mut DeviceContext<'_>, _base: u64, offset: u64, data: &mut [u8]) {
        if offset >= regs::CONFIG {
            self.device.read_config(offset - regs::CONFIG, data);
            return;
        }
        if data.len() != 4 || offset % 4 != 0 {
            tracing::debug!("{}: {}-byte read at {offset:#x}; registers are 32-bit", self.device.name(), data.len());
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_register(offset).to_le_bytes());
    }

    fn mmio_write(&mut self, ctx: &mut DeviceContext<'_>, _base: u64, offset: u64, data: &[u8]) {
        if offset >= regs::CONFIG {
            self.device.write_config(offset - regs::CONFIG, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            tracing::debug!(
                "{}: {}-byte write at {offset:#x} ignored; registers are 32-bit",
                self.device.name(),
                data.len()
            );
            return;
        };
        if offset % 4 != 0 {
            return;
        }
        self.write_register(offset, u32::from_le_bytes(bytes), ctx);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::{MacAddr, Net};
    use crate::rng::Rng;
    use crate::testing::*;
    use ftvm_devices::Stateful;
    use virtio_bindings::virtio_config::{VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER};

    const RING: u64 = 0x10000;
    const DATA: u64 = 0x100000;

    #[test]
    fn identification_registers() {
        let mut h = Harness::new(Net::new(MacAddr::default_for(0), 0));
        assert_eq!(h.read(regs::MAGIC_VALUE), 0x7472_6976);
        assert_eq!(h.read(regs::VERSION), 2);
        assert_eq!(h.read(regs::DEVICE_ID), 1);
        assert_eq!(h.read(regs::VENDOR_ID), VENDOR_ID);
        assert_eq!(h.device_features() & VIRTIO_F_VERSION_1, VIRTIO_F_VERSION_1);
        h.write(regs::DEVICE_FEATURES_SEL, 7);
        assert_eq!(h.read(regs::DEVICE_FEATURES), 0);
        h.write(regs::QUEUE_SEL, 0);
        assert_eq!(h.read(regs::QUEUE_NUM_MAX), 256);
        h.write(regs::QUEUE_SEL, 1);
        assert_eq!(h.read(regs::QUEUE_NUM_MAX), 256);
        h.write(regs::QUEUE_SEL, 2);
        assert_eq!(h.read(regs::QUEUE_NUM_MAX), 0, "no third queue");
        assert_eq!(h.read(regs::QUEUE_READY), 0);
        assert_eq!(h.read(regs::CONFIG_GENERATION), 0);
        assert_eq!(h.read(regs::SHM_LEN_LOW), u32::MAX);
        // Registers are 32-bit: narrower accesses are ignored and read 0.
        let mut b = [0xffu8; 2];
        h.read_bytes(regs::MAGIC_VALUE, &mut b);
        assert_eq!(b, [0, 0]);
        h.read_bytes(regs::MAGIC_VALUE + 2, &mut [0u8; 4]);
        h.write_bytes(regs::STATUS, &[1]);
        assert_eq!(h.read(regs::STATUS), 0);
        // Write-only registers read 0; read-only ones ignore writes.
        assert_eq!(h.read(regs::QUEUE_NOTIFY), 0);
        h.write(regs::MAGIC_VALUE, 0);
        assert_eq!(h.read(regs::MAGIC_VALUE), MAGIC_VALUE);
    }

    #[test]
    fn feature_negotiation_refuses_what_was_not_offered() {
        let mut h = Harness::new(Rng::new(0));
        let offered = h.device_features();
        assert_eq!(offered, VIRTIO_F_VERSION_1);
        // Without VERSION_1 (a legacy driver) the device refuses FEATURES_OK.
        assert!(!h.negotiate(0));
        h.write(regs::STATUS, 0);
        // A feature that was not offered (EVENT_IDX, bit 29) is refused too.
        assert!(!h.negotiate(VIRTIO_F_VERSION_1 | 1 << 29));
        h.write(regs::STATUS, 0);
        assert!(h.negotiate(VIRTIO_F_VERSION_1));
        assert_eq!(h.dev.driver_features(), VIRTIO_F_VERSION_1);
        // Features cannot change after FEATURES_OK.
        h.write(regs::DRIVER_FEATURES_SEL, 0);
        h.write(regs::DRIVER_FEATURES, 0);
        assert_eq!(h.dev.driver_features(), VIRTIO_F_VERSION_1);
        assert_eq!(h.pulses(), 0);
    }

    #[test]
    fn used_buffers_raise_interrupt_status_and_pulse_once_each() {
        let mem = memory();
        let mut h = Harness::with_mem(Rng::new(0), &mem);
        let mut ring = Ring::new(&mem, RING, 16);
        h.activate(&[&ring]);
        assert_eq!(h.read(regs::QUEUE_READY), 1);
        ring.add(&[w(DATA, 16)]);
        h.notify(0);
        assert_eq!(h.read(regs::INTERRUPT_STATUS), 1);
        assert_eq!(h.pulses(), 1);
        // A second event before the ACK pulses again (an edge-triggered PIC must see it).
        ring.add(&[w(DATA, 16)]);
        h.notify(0);
        assert_eq!(h.pulses(), 1);
        h.write(regs::INTERRUPT_ACK, 1);
        assert_eq!(h.read(regs::INTERRUPT_STATUS), 0);
        assert_eq!(ring.take_used().len(), 2);
        // Nothing used, no interrupt.
        h.notify(0);
        assert_eq!(h.pulses(), 0);
        // VRING_AVAIL_F_NO_INTERRUPT: the driver polls; no interrupt.
        ring.set_avail_flags(1);
        ring.add(&[w(DATA, 16)]);
        h.notify(0);
        assert_eq!(h.pulses(), 0);
        assert_eq!(h.read(regs::INTERRUPT_STATUS), 0);
        assert_eq!(ring.take_used().len(), 1);
    }

    #[test]
    fn notify_before_driver_ok_or_of_unknown_queue_does_nothing() {
        let mem = memory();
        let mut h = Harness::with_mem(Rng::new(0), &mem);
        let mut ring = Ring::new(&mem, RING, 16);
        assert!(h.negotiate(VIRTIO_F_VERSION_1));
        h.setup_queue(0, 16, ring.desc_addr(), ring.avail_addr(), ring.used_addr());
        ring.add(&[w(DATA, 16)]);
        h.notify(0);
        assert_eq!(ring.used_idx(), 0, "no buffer consumed before DRIVER_OK");
        h.driver_ok();
        h.notify(5);
        h.notify(u32::MAX);
        assert_eq!(ring.used_idx(), 0);
        h.notify(0);
        assert_eq!(ring.used_idx(), 1);
    }

    #[test]
    fn reset_forgets_queues_features_and_interrupts() {
        let mem = memory();
        let mut h = Harness::with_mem(Rng::new(0), &mem);
        let mut ring = Ring::new(&mem, RING, 16);
        h.activate(&[&ring]);
        ring.add(&[w(DATA, 16)]);
        h.notify(0);
        assert_eq!(h.read(regs::INTERRUPT_STATUS), 1);
        h.write(regs::STATUS, 0);
        assert_eq!(h.read(regs::STATUS), 0);
        assert_eq!(h.read(regs::INTERRUPT_STATUS), 0);
        assert_eq!(h.read(regs::QUEUE_READY), 0);
        assert_eq!(h.dev.driver_features(), 0);
        assert!(!h.dev.driver_ok());
        // Set up again from scratch: indices start at 0 with fresh rings.
        let mut ring = Ring::new(&mem, RING + 0x8000, 8);
        h.activate(&[&ring]);
        ring.add(&[w(DATA, 8)]);
        h.notify(0);
        assert_eq!(ring.take_used(), vec![(0, 8)]);
    }

    #[test]
    fn bad_queue_setup_sets_needs_reset_and_the_vmm_carries_on() {
        let mem = memory();
        let cases: [(&str, u16, u64, u64, u64); 6] = [
            ("size not a power of two", 12, RING, RING + 0x1000, RING + 0x2000),
            ("size above the maximum", 512, RING, RING + 0x1000, RING + 0x2000),
            ("size zero", 0, RING, RING + 0x1000, RING + 0x2000),
            ("misaligned descriptor table", 16, RING + 8, RING + 0x1000, RING + 0x2000),
            ("used ring outside memory", 16, RING, RING + 0x1000, MEM_SIZE - 8),
            ("avail ring far away", 16, RING, 0xffff_ffff_0000, RING + 0x2000),
        ];
        for (what, size, desc, avail, used) in cases {
            let mut h = Harness::with_mem(Rng::new(0), &mem);
            assert!(h.negotiate(VIRTIO_F_VERSION_1));
            h.setup_queue(0, size, desc, avail, used);
            assert_eq!(h.read(regs::QUEUE_READY), 0, "{what}");
            assert_ne!(h.read(regs::STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET, 0, "{what}");
            assert_eq!(h.read(regs::INTERRUPT_STATUS), VIRTIO_MMIO_INT_CONFIG, "{what}");
            assert_eq!(h.pulses(), 1, "{what}");
            h.driver_ok();
            assert!(!h.dev.driver_ok(), "{what}");
            h.notify(0);
            // The driver can clear it all with a reset.
            h.write(regs::STATUS, 0);
            assert_eq!(h.read(regs::STATUS), 0);
        }
        // QueueReady before FEATURES_OK is a driver bug too.
        let mut h = Harness::new(Rng::new(0));
        h.write(regs::STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER);
        h.setup_queue(0, 16, RING, RING + 0x1000, RING + 0x2000);
        assert_ne!(h.read(regs::STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
        // DRIVER_OK without FEATURES_OK likewise.
        let mut h = Harness::new(Rng::new(0));
        h.write(regs::STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_DRIVER_OK);
        assert_ne!(h.read(regs::STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
        assert!(!h.dev.driver_ok());
    }

    #[test]
    fn queue_registers_are_frozen_while_the_queue_is_ready() {
        let mem = memory();
        let mut h = Harness::with_mem(Rng::new(0), &mem);
        let mut ring = Ring::new(&mem, RING, 16);
        h.activate(&[&ring]);
        h.write(regs::QUEUE_NUM, 4);
        h.write(regs::QUEUE_DESC_LOW, 0x1234_0000);
        ring.add(&[w(DATA, 4)]);
        h.notify(0);
        assert_eq!(ring.take_used(), vec![(0, 4)]);
        assert_eq!(h.dev.queue(0).unwrap().size(), 16);
    }

    #[test]
    fn a_corrupt_available_ring_puts_the_device_in_needs_reset() {
        let mem = memory();
        let mut h = Harness::with_mem(Rng::new(0), &mem);
        let mut ring = Ring::new(&mem, RING, 16);
        h.activate(&[&ring]);
        // The driver claims 100 new buffers in a ring of 16.
        ring.set_avail_idx(100);
        h.notify(0);
        assert_ne!(h.read(regs::STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
        assert_eq!(h.read(regs::INTERRUPT_STATUS) & VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_CONFIG);
        assert_eq!(ring.used_idx(), 0);
        // A head index beyond the table, likewise.
        let mut h = Harness::with_mem(Rng::new(0), &mem);
        let mut ring = Ring::new(&mem, RING, 16);
        h.activate(&[&ring]);
        ring.push_avail(40);
        ring.publish();
        h.notify(0);
        assert_ne!(h.read(regs::STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    }

    #[test]
    fn config_space_takes_any_width() {
        let mut h = Harness::new(Net::new("02:00:00:aa:bb:cc".parse().unwrap(), 0));
        let mut mac = [0u8; 6];
        h.read_bytes(regs::CONFIG, &mut mac);
        assert_eq!(mac, [2, 0, 0, 0xaa, 0xbb, 0xcc]);
        let mut b = [0u8; 1];
        h.read_bytes(regs::CONFIG + 5, &mut b);
        assert_eq!(b, [0xcc]);
        let mut far = [0xffu8; 4];
        h.read_bytes(regs::CONFIG + 0x200, &mut far);
        assert_eq!(far, [0; 4]);
        h.write_bytes(regs::CONFIG, &[1, 2, 3, 4]);
        h.read_bytes(regs::CONFIG, &mut mac);
        assert_eq!(mac, [2, 0, 0, 0xaa, 0xbb, 0xcc], "config space is read-only");
    }

    #[test]
    fn state_saved_mid_traffic_continues_identically() {
        let mem = memory();
        let mut h = Harness::with_mem(Rng::new(0), &mem);
        let mut ring = Ring::new(&mem, RING, 16);
        h.activate(&[&ring]);
        ring.add(&[w(DATA, 16)]);
        ring.add(&[w(DATA + 0x100, 8), w(DATA + 0x180, 8)]);
        h.notify(0);
        assert_eq!(h.pulses(), 1);
        // Saved with the interrupt not acknowledged, a buffer available but not yet taken, and
        // the selectors away from their defaults.
        ring.add(&[w(DATA + 0x200, 32)]);
        h.write(regs::QUEUE_SEL, 3);
        h.write(regs::DEVICE_FEATURES_SEL, 1);
        h.write(regs::DRIVER_FEATURES_SEL, 1);
        let twin_mem = fork_memory(&mem);
        let mut twin = h.fork(Rng::new(0), &twin_mem);
        let mut twin_ring = ring.twin(&twin_mem);
        let mut seen = vec![];
        for (g, r, m) in [(&mut h, &mut ring, &mem), (&mut twin, &mut twin_ring, &twin_mem)] {
            let offsets = [regs::QUEUE_NUM_MAX, regs::DEVICE_FEATURES, regs::INTERRUPT_STATUS, regs::STATUS];
            let mut reads: Vec<u32> = offsets.iter().map(|&o| g.read(o)).collect();
            g.write(regs::QUEUE_SEL, 0);
            reads.extend([g.read(regs::QUEUE_NUM_MAX), g.read(regs::QUEUE_READY)]);
            g.notify(0);
            g.write(regs::INTERRUPT_ACK, 1);
            r.add(&[w(DATA + 0x300, 4)]);
            g.notify(0);
            reads.push(g.read(regs::INTERRUPT_STATUS));
            let used = r.take_used();
            seen.push((
                reads,
                used,
                g.pulses(),
                mem_digest(m, 0, MEM_SIZE as usize),
                g.dev.device().stats(),
                g.inputs.entropy_bytes,
            ));
        }
        assert_eq!(seen[0], seen[1]);
        assert_eq!(seen[0].0, vec![0, 1, 1, 0x0f, 256, 1, 1], "registers as saved, then after the new traffic");
        assert_eq!(seen[0].1, vec![(0, 16), (1, 16), (3, 32), (4, 4)]);
        assert_eq!(h.dev.save_state(), twin.dev.save_state());
    }

    #[test]
    fn bad_transport_states_are_refused() {
        let mem = memory();
        let mut h = Harness::with_mem(Rng::new(0), &mem);
        let ring = Ring::new(&mem, RING, 16);
        h.activate(&[&ring]);
        let state = h.dev.save_state();
        let mut fresh = Harness::with_mem(Rng::new(0), &mem);
        let bad = |f: &dyn Fn(&mut MmioTransportState<crate::rng::RngState>)| {
            let mut s = state.clone();
            f(&mut s);
            s
        };
        fresh.refused(&bad(&|s| s.irq = 9), "interrupt line: saved 9, this device 5");
        fresh.refused(&bad(&|s| s.device_type = 2), "device type: saved 2, this device 4");
        fresh.refused(&bad(&|s| s.queues.push(s.queues[0])), "number of queues: saved 2, this device 1");
        fresh.refused(&bad(&|s| s.queues[0].queue.max_size = 128), "queue 0 maximum size: saved 128, this device 256");
        fresh.refused(&bad(&|s| s.queues[0].queue.size = 12), "size 12 is not a power of two in 1..=256");
        fresh.refused(&bad(&|s| s.queues[0].queue.size = 512), "size 512 is not a power of two in 1..=256");
        fresh.refused(&bad(&|s| s.queues[0].queue.desc_table += 8), "descriptor table breaks alignment");
        fresh.refused(&bad(&|s| s.queues[0].queue.used_ring = MEM_SIZE - 8), "outside guest memory");
        fresh.refused(&bad(&|s| s.queues[0].queue.avail_ring = 0), "available ring at 0");
        fresh.refused(&bad(&|s| s.queues[0].queue.event_idx_enabled = true), "EVENT_IDX");
        fresh.refused(&bad(&|s| s.interrupt_status = 0x4), "InterruptStatus 0x4");
        fresh.refused(&bad(&|s| s.driver_features |= 1 << 29), "driver features 0x120000000");
        // A queue that is not ready may hold anything the driver wrote.
        let mut s = state.clone();
        s.queues[0].queue.ready = false;
        s.queues[0].queue.used_ring = MEM_SIZE - 8;
        s.queues[0].regs.num = 12345;
        fresh.dev.restore_state(&s).unwrap();
        assert_eq!(fresh.read(regs::QUEUE_READY), 0);
    }
}
