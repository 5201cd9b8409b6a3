//! The fake backend: an in-process device model, so drivers are unit-tested without hardware.
//!
//! A [`DeviceModel`] answers register reads and writes of its BARs. It receives a
//! [`DeviceContext`] when it is built, through which it reads and writes DMA memory by IOVA
//! (as the device would through the IOMMU: an unmapped IOVA is a [`Error::DmaFault`], recorded
//! for the test to inspect) and raises its interrupts on the driver's eventfds.
//!
//! ```
//! use std::sync::Arc;
//! use ring3::fake::{DeviceContext, DeviceModel, FakeBackend, FakeDevice};
//! use ring3::Backend;
//!
//! struct Scratch;
//! impl DeviceModel for Scratch {
//!     fn bar_len(&self, index: u8) -> Option<usize> { (index == 0).then_some(0x1000) }
//!     fn bar_read(&self, _bar: u8, offset: u64, _size: u8) -> u64 { offset }
//!     fn bar_write(&self, _bar: u8, _offset: u64, _size: u8, _value: u64) {}
//! }
//!
//! let device = FakeDevice { vendor_id: 0x1234, device_id: 0x5678, class_code: 0xff0000 };
//! let backend = FakeBackend::new("fake0", device, |_ctx: DeviceContext| Scratch);
//! assert_eq!(backend.bar(0).unwrap().read32(0x10).unwrap(), 0x10);
//! ```

use std::collections::{BTreeMap, HashMap};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, PoisonError};

use crate::backend::{config, Backend};
use crate::dma::{DmaMapper, DmaSpace, IovaAllocator};
use crate::error::{Error, Result};
use crate::irq::{Interrupt, IrqMode};
use crate::mmio::{Bar, RegisterModel};

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A device model behind the fake backend.
pub trait DeviceModel: Send + Sync + 'static {
    /// Size of memory BAR `index`, or `None` if the device has no such BAR.
    fn bar_len(&self, index: u8) -> Option<usize>;
    /// A register read of `size` bytes at `offset` in BAR `bar`.
    fn bar_read(&self, bar: u8, offset: u64, size: u8) -> u64;
    /// A register write of `size` bytes at `offset` in BAR `bar`.
    fn bar_write(&self, bar: u8, offset: u64, size: u8, value: u64);
    /// How many vectors of `mode` the device offers.
    fn interrupt_count(&self, mode: IrqMode) -> u32 {
        let _ = mode;
        0
    }
    /// Returns the device to its power-on state.
    fn reset(&self) {}
}

/// Identity of a fake device in its configuration space.
#[derive(Debug, Clone, Copy)]
pub struct FakeDevice {
    /// PCI vendor ID.
    pub vendor_id: u16,
    /// PCI device ID.
    pub device_id: u16,
    /// 24-bit class code (class, subclass, programming interface).
    pub class_code: u32,
}

/// The fake IOMMU: IOVA → host memory, as mapped by the driver's DMA buffers.
#[derive(Default)]
struct FakeIommu {
    mappings: Mutex<BTreeMap<u64, (usize, usize)>>,
    faults: Mutex<Vec<(u64, u64)>>,
}

impl DmaMapper for FakeIommu {
    unsafe fn map(&self, vaddr: NonNull<u8>, len: usize, iova: u64) -> Result<()> {
        lock(&self.mappings).insert(iova, (vaddr.as_ptr() as usize, len));
        Ok(())
    }

    fn unmap(&self, iova: u64, len: usize) -> Result<()> {
        match lock(&self.mappings).remove(&iova) {
            Some((_, mapped)) if mapped == len => Ok(()),
            _ => Err(Error::InvalidArgument {
                what: format!("unmap of IOVA {iova:#x} ({len:#x} bytes) that is not mapped"),
            }),
        }
    }
}

impl FakeIommu {
    /// Runs `access` on the host address of `iova..iova+len` if it is wholly mapped.
    fn translate(&self, iova: u64, len: usize, access: impl FnOnce(*mut u8)) -> Result<()> {
        let mappings = lock(&self.mappings);
        let hit = mappings
            .range(..=iova)
            .next_back()
            .and_then(|(&start, &(host, size))| {
                let offset = usize::try_from(iova - start).ok()?;
                (offset.checked_add(len)? <= size).then_some(host + offset)
            });
        match hit {
            // The lock is held during the access, so the buffer cannot be unmapped and freed
            // under it.
            Some(host) => {
                access(host as *mut u8);
                Ok(())
            }
            None => {
                drop(mappings);
                lock(&self.faults).push((iova, len as u64));
                Err(Error::DmaFault {
                    iova,
                    len: len as u64,
                })
            }
        }
    }
}

struct Shared {
    iommu: Arc<FakeIommu>,
    config: Mutex<Vec<u8>>,
    irqs: Mutex<HashMap<u32, Interrupt>>,
    irq_mode: Mutex<Option<IrqMode>>,
}

/// What a device model can do to the outside world: DMA and interrupts.
#[derive(Clone)]
pub struct DeviceContext {
    shared: Arc<Shared>,
}

impl DeviceContext {
    fn bus_master(&self) -> bool {
        let config = lock(&self.shared.config);
        let command = u16::from_le_bytes([config[4], config[5]]);
        config::Command::from_bits_retain(command).contains(config::Command::BUS_MASTER)
    }

    fn check_bus_master(&self, iova: u64, len: usize) -> Result<()> {
        if self.bus_master() {
            Ok(())
        } else {
            // Real devices cannot issue DMA with bus mastering off; the fault is recorded.
            lock(&self.shared.iommu.faults).push((iova, len as u64));
            Err(Error::DmaFault {
                iova,
                len: len as u64,
            })
        }
    }

    /// Device reads memory at `iova` (a DMA read through the IOMMU).
    pub fn dma_read(&self, iova: u64, out: &mut [u8]) -> Result<()> {
        self.check_bus_master(iova, out.len())?;
        self.shared.iommu.translate(iova, out.len(), |host| {
            // SAFETY: `translate` proved the range lies in a live mapping and holds the
            // mapping lock during the copy, so the memory is not freed meanwhile.
            unsafe { std::ptr::copy_nonoverlapping(host, out.as_mut_ptr(), out.len()) }
        })
    }

    /// Device writes memory at `iova` (a DMA write through the IOMMU).
    pub fn dma_write(&self, iova: u64, data: &[u8]) -> Result<()> {
        self.check_bus_master(iova, data.len())?;
        self.shared.iommu.translate(iova, data.len(), |host| {
            // SAFETY: as in dma_read.
            unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), host, data.len()) }
        })
    }

    /// Raises interrupt `vector`; false if the driver has not enabled it (the interrupt is lost,
    /// as it would be on hardware with interrupts disabled).
    pub fn raise_irq(&self, vector: u32) -> bool {
        match lock(&self.shared.irqs).get(&vector) {
            Some(irq) => irq.trigger().is_ok(),
            None => false,
        }
    }

    /// Which interrupt kind the driver enabled, if any.
    pub fn irq_mode(&self) -> Option<IrqMode> {
        *lock(&self.shared.irq_mode)
    }
}

/// A [`Backend`] over an in-process [`DeviceModel`].
pub struct FakeBackend<M> {
    name: String,
    model: Arc<M>,
    shared: Arc<Shared>,
    dma: Arc<DmaSpace>,
}

impl<M: DeviceModel> FakeBackend<M> {
    /// A fake device named `name`, with the model that `build` makes from its context.
    pub fn new(name: &str, device: FakeDevice, build: impl FnOnce(DeviceContext) -> M) -> Self {
        let mut config = vec![0u8; 4096];
        config[0..2].copy_from_slice(&device.vendor_id.to_le_bytes());
        config[2..4].copy_from_slice(&device.device_id.to_le_bytes());
        config[9..12].copy_from_slice(&device.class_code.to_le_bytes()[..3]);
        let iommu = Arc::new(FakeIommu::default());
        let shared = Arc::new(Shared {
            iommu: iommu.clone(),
            config: Mutex::new(config),
            irqs: Mutex::new(HashMap::new()),
            irq_mode: Mutex::new(None),
        });
        let model = Arc::new(build(DeviceContext {
            shared: shared.clone(),
        }));
        FakeBackend {
            name: name.to_string(),
            model,
            shared,
            dma: DmaSpace::new(iommu, IovaAllocator::for_mask(64)),
        }
    }

    /// Writes configuration space as the device's hardware defines it (capability lists,
    /// read-only registers), for models whose driver reads more than the IDs. Bytes past
    /// the end of configuration space are ignored.
    pub fn set_config(&self, offset: u16, data: &[u8]) {
        let mut config = lock(&self.shared.config);
        let start = usize::from(offset).min(config.len());
        let end = (start + data.len()).min(config.len());
        config[start..end].copy_from_slice(&data[..end - start]);
    }

    /// The device model, for tests to inspect.
    pub fn model(&self) -> &Arc<M> {
        &self.model
    }

    /// DMA accesses the IOMMU refused so far: (IOVA, length).
    pub fn dma_faults(&self) -> Vec<(u64, u64)> {
        lock(&self.shared.iommu.faults).clone()
    }

    /// How many DMA mappings are live.
    pub fn live_mappings(&self) -> usize {
        lock(&self.shared.iommu.mappings).len()
    }
}

struct ModelBar<M> {
    model: Arc<M>,
    index: u8,
}

impl<M: DeviceModel> RegisterModel for ModelBar<M> {
    fn read(&self, offset: u64, size: u8) -> u64 {
        self.model.bar_read(self.index, offset, size)
    }
    fn write(&self, offset: u64, size: u8, value: u64) {
        self.model.bar_write(self.index, offset, size, value)
    }
}

impl<M: DeviceModel> Backend for FakeBackend<M> {
    fn address(&self) -> &str {
        &self.name
    }

    fn config_read(&self, offset: u16, buf: &mut [u8]) -> Result<()> {
        let config = lock(&self.shared.config);
        let start = usize::from(offset);
        let range = config
            .get(start..start + buf.len())
            .ok_or_else(|| Error::OutOfBounds {
                region: format!("{} config space", self.name),
                offset: u64::from(offset),
                size: buf.len() as u64,
                len: config.len() as u64,
            })?;
        buf.copy_from_slice(range);
        Ok(())
    }

    fn config_write(&self, offset: u16, data: &[u8]) -> Result<()> {
        let mut config = lock(&self.shared.config);
        let start = usize::from(offset);
        let len = config.len() as u64;
        let range =
            config
                .get_mut(start..start + data.len())
                .ok_or_else(|| Error::OutOfBounds {
                    region: format!("{} config space", self.name),
                    offset: u64::from(offset),
                    size: data.len() as u64,
                    len,
                })?;
        // Only the command register is writable in the fake; IDs and class stay as built.
        if start >= usize::from(config::COMMAND)
            && start + data.len() <= usize::from(config::STATUS)
        {
            range.copy_from_slice(data);
        }
        Ok(())
    }

    fn bar(&self, index: u8) -> Result<Bar> {
        let len = self
            .model
            .bar_len(index)
            .ok_or_else(|| Error::Unsupported {
                address: self.name.clone(),
                what: format!("memory BAR {index}"),
            })?;
        let register_model = Arc::new(ModelBar {
            model: self.model.clone(),
            index,
        });
        Ok(Bar::from_model(
            format!("{} BAR{index}", self.name),
            len,
            register_model,
        ))
    }

    fn dma_space(&self) -> &Arc<DmaSpace> {
        &self.dma
    }

    fn enable_interrupts(&self, mode: IrqMode, count: u32) -> Result<Vec<Interrupt>> {
        let offered = self.model.interrupt_count(mode);
        if count == 0 || count > offered {
            return Err(Error::Unsupported {
                address: self.name.clone(),
                what: format!("{count} {mode} vectors (it offers {offered})"),
            });
        }
        let vectors: Vec<Interrupt> = (0..count)
            .map(|vector| Interrupt::new(mode, vector))
            .collect::<Result<_>>()?;
        let mut irqs = lock(&self.shared.irqs);
        irqs.clear();
        irqs.extend(vectors.iter().map(|irq| (irq.vector(), irq.clone())));
        *lock(&self.shared.irq_mode) = Some(mode);
        Ok(vectors)
    }

    fn disable_interrupts(&self, mode: IrqMode) -> Result<()> {
        let mut current = lock(&self.shared.irq_mode);
        if *current == Some(mode) {
            *current = None;
            lock(&self.shared.irqs).clear();
        }
        Ok(())
    }

    fn interrupt_count(&self, mode: IrqMode) -> Result<u32> {
        Ok(self.model.interrupt_count(mode))
    }

    fn reset(&self) -> Result<()> {
        self.model.reset();
        let mut config = lock(&self.shared.config);
        config[4] = 0;
        config[5] = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo {
        ctx: DeviceContext,
    }
    impl DeviceModel for Echo {
        fn bar_len(&self, index: u8) -> Option<usize> {
            (index == 0).then_some(0x100)
        }
        fn bar_read(&self, _bar: u8, offset: u64, _size: u8) -> u64 {
            offset * 2
        }
        fn bar_write(&self, _bar: u8, _offset: u64, _size: u8, value: u64) {
            // Copies 4 bytes from IOVA `value` to IOVA `value + 4`, then raises vector 0.
            let mut word = [0u8; 4];
            if self.ctx.dma_read(value, &mut word).is_ok() {
                let _ = self.ctx.dma_write(value + 4, &word);
                self.ctx.raise_irq(0);
            }
        }
        fn interrupt_count(&self, mode: IrqMode) -> u32 {
            u32::from(mode == IrqMode::Msi)
        }
    }

    fn backend() -> FakeBackend<Echo> {
        let device = FakeDevice {
            vendor_id: 0x1234,
            device_id: 0xabcd,
            class_code: 0x00ff_0000,
        };
        FakeBackend::new("fake", device, |ctx| Echo { ctx })
    }

    #[test]
    fn config_space_holds_ids_and_command() {
        let b = backend();
        assert_eq!(b.ids().unwrap(), (0x1234, 0xabcd));
        b.set_bus_master(true).unwrap();
        assert_eq!(b.config_read_u16(config::COMMAND).unwrap(), 0b110);
        b.config_write_u16(config::VENDOR_ID, 0).unwrap();
        assert_eq!(b.ids().unwrap().0, 0x1234, "IDs are read-only");
        assert!(b.config_read_u32(4094).is_err());
    }

    #[test]
    fn dma_goes_through_mappings_and_unmapped_iovas_fault() {
        let b = backend();
        b.set_bus_master(true).unwrap();
        let irq = b.enable_interrupts(IrqMode::Msi, 1).unwrap().remove(0);
        let buffer = b.dma_alloc(64).unwrap();
        buffer.write(0, &[1, 2, 3, 4]).unwrap();
        b.bar(0).unwrap().write32(0, buffer.iova() as u32).unwrap();
        assert_eq!(irq.wait(std::time::Duration::from_secs(1)).unwrap(), 1);
        let mut copy = [0u8; 4];
        buffer.read(4, &mut copy).unwrap();
        assert_eq!(copy, [1, 2, 3, 4]);

        let iova = buffer.iova();
        drop(buffer);
        assert_eq!(b.live_mappings(), 0, "drop unmapped the buffer");
        b.bar(0).unwrap().write32(0, iova as u32).unwrap();
        assert_eq!(b.dma_faults(), vec![(iova, 4)]);
    }

    #[test]
    fn a_leaked_buffer_is_empty_and_keeps_its_mapping() {
        let backend = backend();
        let mut buffer = backend.dma_alloc(8192).unwrap();
        let iova = buffer.iova();
        buffer.leak();
        assert_eq!(buffer.len(), 0);
        assert!(buffer.write(0, &[1]).is_err());
        drop(buffer);
        assert_eq!(backend.live_mappings(), 1, "the IOMMU mapping stays");
        let next = backend.dma_alloc(4096).unwrap();
        assert_ne!(next.iova(), iova, "the IOVA is not handed out again");
    }

    #[test]
    fn dma_without_bus_mastering_faults() {
        let b = backend();
        let buffer = b.dma_alloc(64).unwrap();
        b.bar(0).unwrap().write32(0, buffer.iova() as u32).unwrap();
        assert_eq!(b.dma_faults().len(), 1);
    }

    #[test]
    fn asking_for_more_vectors_than_offered_is_refused() {
        let b = backend();
        assert!(matches!(
            b.enable_interrupts(IrqMode::MsiX, 1),
            Err(Error::Unsupported { .. })
        ));
        assert!(b.enable_interrupts(IrqMode::Msi, 2).is_err());
    }
}
