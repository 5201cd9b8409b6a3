//! Typed access to device registers.
//!
//! A device's registers live in a [`Bar`]: either a BAR mapped into this process by VFIO
//! (accessed only with volatile loads and stores, never through a Rust reference), or a
//! register model of the fake backend (accessed through callbacks). Drivers describe a
//! register block as a `#[repr(C)]` struct of access-typed fields ([`ReadOnly`],
//! [`WriteOnly`], [`ReadWrite`]) and reach the fields through [`Registers::field`]:
//!
//! ```
//! use ring3::mmio::{ReadOnly, ReadWrite, RegisterBlock, Registers};
//!
//! /// A two-register block.
//! #[repr(C)]
//! #[derive(bytemuck::Zeroable)]
//! struct Regs {
//!     id: ReadOnly<u32>,      // 0x00
//!     scratch: ReadWrite<u32>, // 0x04
//! }
//! // SAFETY: Regs is repr(C) and made only of register fields.
//! unsafe impl RegisterBlock for Regs {}
//!
//! # fn demo(bar: &ring3::mmio::Bar) -> ring3::Result<()> {
//! let regs = bar.registers::<Regs>(0)?;
//! regs.field(|r| &r.scratch).write(42);
//! let id = regs.field(|r| &r.id).read();
//! # let _ = id; Ok(()) }
//! ```
//!
//! The struct is never instantiated over device memory: it only describes offsets and
//! what each field allows, checked by the compiler.

use std::fmt;
use std::marker::PhantomData;
use std::ptr::NonNull;
use std::sync::Arc;

use crate::error::{Error, Result};

/// A register value type: an unsigned integer of 1, 2, 4 or 8 bytes.
pub trait RegisterValue: Copy + Send + Sync + bytemuck::Pod + 'static {
    /// Size in bytes.
    const SIZE: u8;
    /// Widen to u64.
    fn to_u64(self) -> u64;
    /// Narrow from u64 (upper bits dropped).
    fn from_u64(value: u64) -> Self;
}

macro_rules! register_value {
    ($($t:ty),*) => {$(
        impl RegisterValue for $t {
            const SIZE: u8 = std::mem::size_of::<$t>() as u8;
            fn to_u64(self) -> u64 { self as u64 }
            fn from_u64(value: u64) -> Self { value as $t }
        }
    )*};
}
register_value!(u8, u16, u32, u64);

/// A register model: what the fake backend puts behind a BAR.
pub trait RegisterModel: Send + Sync {
    /// A read of `size` bytes (1, 2, 4 or 8) at `offset`.
    fn read(&self, offset: u64, size: u8) -> u64;
    /// A write of `size` bytes (1, 2, 4 or 8) at `offset`.
    fn write(&self, offset: u64, size: u8, value: u64);
}

enum Access {
    /// A BAR mapped into this process; `_owner` keeps the mapping alive.
    Mapped {
        base: NonNull<u8>,
        _owner: Arc<dyn Send + Sync>,
    },
    Model(Arc<dyn RegisterModel>),
}

/// One memory region of a device: a BAR mapped by VFIO, or a fake register model.
///
/// Cloning is cheap and shares the mapping, which stays alive while any clone does.
/// Every access is bounds- and alignment-checked; none creates a Rust reference into
/// device memory.
#[derive(Clone)]
pub struct Bar {
    access: Arc<Access>,
    len: usize,
    name: Arc<str>,
}

// SAFETY: a mapped BAR is device memory reached only by volatile loads and stores of
// naturally aligned integers, which are atomic on the device side; the mapping itself is
// kept alive by `_owner`, which is Send + Sync.
unsafe impl Send for Access {}
// SAFETY: as for Send: no shared Rust-visible state is mutated through `base`.
unsafe impl Sync for Access {}

impl fmt::Debug for Bar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bar")
            .field("name", &self.name)
            .field("len", &self.len)
            .finish()
    }
}

impl Bar {
    /// A BAR mapped into this process.
    ///
    /// # Safety
    /// `base` must point to `len` bytes of device memory mapped readable and writable, and
    /// stay mapped while `owner` lives. Nothing else may create references into it.
    pub unsafe fn from_mapping(
        name: impl Into<Arc<str>>,
        base: NonNull<u8>,
        len: usize,
        owner: Arc<dyn Send + Sync>,
    ) -> Self {
        Bar {
            access: Arc::new(Access::Mapped {
                base,
                _owner: owner,
            }),
            len,
            name: name.into(),
        }
    }

    /// A region served by a register model (the fake backend).
    pub fn from_model(
        name: impl Into<Arc<str>>,
        len: usize,
        model: Arc<dyn RegisterModel>,
    ) -> Self {
        Bar {
            access: Arc::new(Access::Model(model)),
            len,
            name: name.into(),
        }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the region has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Name used in errors, such as "0000:00:03.0 BAR0".
    pub fn name(&self) -> &str {
        &self.name
    }

    fn check(&self, offset: usize, size: usize, align: usize) -> Result<()> {
        let in_bounds = offset.checked_add(size).is_some_and(|end| end <= self.len);
        if !in_bounds || offset % align != 0 {
            return Err(Error::OutOfBounds {
                region: self.name.to_string(),
                offset: offset as u64,
                size: size as u64,
                len: self.len as u64,
            });
        }
        Ok(())
    }

    /// Reads a register at `offset`; it must be naturally aligned and inside the region.
    pub fn read<T: RegisterValue>(&self, offset: usize) -> Result<T> {
        self.check(offset, T::SIZE as usize, T::SIZE as usize)?;
        Ok(self.read_checked(offset))
    }

    /// Writes a register at `offset`; it must be naturally aligned and inside the region.
    pub fn write<T: RegisterValue>(&self, offset: usize, value: T) -> Result<()> {
        self.check(offset, T::SIZE as usize, T::SIZE as usize)?;
        self.write_checked(offset, value);
        Ok(())
    }

    /// Reads a 32-bit register.
    pub fn read32(&self, offset: usize) -> Result<u32> {
        self.read(offset)
    }

    /// Writes a 32-bit register.
    pub fn write32(&self, offset: usize, value: u32) -> Result<()> {
        self.write(offset, value)
    }

    /// Caller has checked bounds and alignment.
    fn read_checked<T: RegisterValue>(&self, offset: usize) -> T {
        match &*self.access {
            Access::Mapped { base, .. } => {
                // SAFETY: `check` (or Registers' construction) proved offset..offset+size is
                // inside the mapping and aligned; the mapping is alive while `self` is.
                unsafe { base.as_ptr().add(offset).cast::<T>().read_volatile() }
            }
            Access::Model(model) => T::from_u64(model.read(offset as u64, T::SIZE)),
        }
    }

    /// Caller has checked bounds and alignment.
    fn write_checked<T: RegisterValue>(&self, offset: usize, value: T) {
        match &*self.access {
            Access::Mapped { base, .. } => {
                // SAFETY: as in read_checked.
                unsafe { base.as_ptr().add(offset).cast::<T>().write_volatile(value) }
            }
            Access::Model(model) => model.write(offset as u64, T::SIZE, value.to_u64()),
        }
    }

    /// A typed view of the register block `R` at `offset`.
    pub fn registers<R: RegisterBlock>(&self, offset: usize) -> Result<Registers<'_, R>> {
        self.check(offset, std::mem::size_of::<R>(), std::mem::align_of::<R>())?;
        Ok(Registers {
            bar: self,
            base: offset,
            _block: PhantomData,
        })
    }
}

/// A `#[repr(C)]` struct of register fields describing a register block.
///
/// # Safety
/// The implementing type must be `#[repr(C)]`, made only of [`ReadOnly`], [`WriteOnly`],
/// [`ReadWrite`] fields and padding arrays of integers, so that field offsets are the
/// device's register offsets.
pub unsafe trait RegisterBlock: bytemuck::Zeroable + Sized {}

/// A read-only register.
#[repr(transparent)]
#[derive(Clone, Copy, bytemuck::Zeroable)]
pub struct ReadOnly<T>(T);

/// A write-only register.
#[repr(transparent)]
#[derive(Clone, Copy, bytemuck::Zeroable)]
pub struct WriteOnly<T>(T);

/// A read-write register.
#[repr(transparent)]
#[derive(Clone, Copy, bytemuck::Zeroable)]
pub struct ReadWrite<T>(T);

/// A typed view of a register block inside a [`Bar`].
pub struct Registers<'a, R> {
    bar: &'a Bar,
    base: usize,
    _block: PhantomData<fn() -> R>,
}

impl<R> Clone for Registers<'_, R> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<R> Copy for Registers<'_, R> {}

impl<'a, R: RegisterBlock> Registers<'a, R> {
    /// The field chosen by `project`, such as `regs.field(|r| &r.status)`.
    ///
    /// `project` only names the field: it runs on an all-zero stand-in of `R` to learn the
    /// field's offset, never on device memory. Keep the returned [`Field`] on hot paths.
    pub fn field<F: FieldType>(&self, project: impl FnOnce(&R) -> &F) -> Field<'a, F> {
        let stand_in = R::zeroed();
        let start = std::ptr::from_ref(&stand_in) as usize;
        let field = std::ptr::from_ref(project(&stand_in)) as usize;
        let offset = field.wrapping_sub(start);
        // Fields of R lie inside R, so this only fails if `project` returned something else.
        assert!(
            offset + std::mem::size_of::<F>() <= std::mem::size_of::<R>(),
            "Registers::field: the closure must return a field of the register block"
        );
        Field {
            bar: self.bar,
            offset: self.base + offset,
            _field: PhantomData,
        }
    }

    /// The region this view is in.
    pub fn bar(&self) -> &'a Bar {
        self.bar
    }

    /// Offset of the block in its region.
    pub fn offset(&self) -> usize {
        self.base
    }
}

/// The field wrappers, and what each allows.
pub trait FieldType: Sealed {
    /// The register's value type.
    type Value: RegisterValue;
}
mod sealed {
    pub trait Sealed {}
}
use sealed::Sealed;
impl<T> Sealed for ReadOnly<T> {}
impl<T> Sealed for WriteOnly<T> {}
impl<T> Sealed for ReadWrite<T> {}
impl<T: RegisterValue> FieldType for ReadOnly<T> {
    type Value = T;
}
impl<T: RegisterValue> FieldType for WriteOnly<T> {
    type Value = T;
}
impl<T: RegisterValue> FieldType for ReadWrite<T> {
    type Value = T;
}

/// One register of a block, with the accesses its type allows. Cheap to copy.
pub struct Field<'a, F> {
    bar: &'a Bar,
    offset: usize,
    _field: PhantomData<fn() -> F>,
}

impl<F> Clone for Field<'_, F> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<F> Copy for Field<'_, F> {}

impl<F> Field<'_, F> {
    /// Offset of the register in its region.
    pub fn offset(&self) -> usize {
        self.offset
    }
}

impl<T: RegisterValue> Field<'_, ReadOnly<T>> {
    /// Reads the register.
    pub fn read(&self) -> T {
        self.bar.read_checked(self.offset)
    }
}

impl<T: RegisterValue> Field<'_, WriteOnly<T>> {
    /// Writes the register.
    pub fn write(&self, value: T) {
        self.bar.write_checked(self.offset, value)
    }
}

impl<T: RegisterValue> Field<'_, ReadWrite<T>> {
    /// Reads the register.
    pub fn read(&self) -> T {
        self.bar.read_checked(self.offset)
    }

    /// Writes the register.
    pub fn write(&self, value: T) {
        self.bar.write_checked(self.offset, value)
    }

    /// Reads, changes and writes back the register.
    pub fn modify(&self, change: impl FnOnce(T) -> T) {
        self.write(change(self.read()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[repr(C)]
    #[derive(bytemuck::Zeroable)]
    struct Block {
        id: ReadOnly<u32>,
        control: ReadWrite<u32>,
        _reserved: [u32; 2],
        wide: ReadWrite<u64>,
        doorbell: WriteOnly<u16>,
    }
    // SAFETY: repr(C) of register fields and an integer padding array.
    unsafe impl RegisterBlock for Block {}
    const _: () = assert!(std::mem::offset_of!(Block, wide) == 0x10);

    #[derive(Default)]
    struct Log(Mutex<Vec<(char, u64, u8, u64)>>);
    impl RegisterModel for Log {
        fn read(&self, offset: u64, size: u8) -> u64 {
            self.0.lock().unwrap().push(('r', offset, size, 0));
            0xab00 + offset
        }
        fn write(&self, offset: u64, size: u8, value: u64) {
            self.0.lock().unwrap().push(('w', offset, size, value));
        }
    }

    #[test]
    fn fields_reach_their_offsets_with_their_sizes() {
        let log = Arc::new(Log::default());
        let bar = Bar::from_model("test BAR", 0x100, log.clone());
        let regs = bar.registers::<Block>(0x40).unwrap();
        assert_eq!(regs.field(|r| &r.id).read(), 0xab40);
        regs.field(|r| &r.control).modify(|v| v | 1);
        regs.field(|r| &r.wide).write(7);
        regs.field(|r| &r.doorbell).write(3);
        let log = log.0.lock().unwrap();
        assert_eq!(
            *log,
            vec![
                ('r', 0x40, 4, 0),
                ('r', 0x44, 4, 0),
                ('w', 0x44, 4, 0xab44 | 1),
                ('w', 0x50, 8, 7),
                ('w', 0x58, 2, 3),
            ]
        );
    }

    #[test]
    fn accesses_outside_or_misaligned_are_refused() {
        let bar = Bar::from_model("test BAR", 0x20, Arc::new(Log::default()));
        assert!(matches!(bar.read32(0x20), Err(Error::OutOfBounds { .. })));
        assert!(matches!(bar.read32(0x1e), Err(Error::OutOfBounds { .. })));
        assert!(matches!(bar.read32(2), Err(Error::OutOfBounds { .. })));
        assert!(matches!(
            bar.read32(usize::MAX - 1),
            Err(Error::OutOfBounds { .. })
        ));
        assert!(
            bar.registers::<Block>(0x8).is_err(),
            "block runs past the end"
        );
        assert!(bar.read32(0x1c).is_ok());
    }

    #[test]
    fn mapped_memory_is_accessed_in_place() {
        let mut memory = vec![0u64; 8];
        let base = NonNull::new(memory.as_mut_ptr().cast::<u8>()).unwrap();
        // SAFETY: `memory` outlives `bar` in this test and nothing references it meanwhile.
        let bar = unsafe { Bar::from_mapping("mem", base, 64, Arc::new(())) };
        bar.write32(4, 0x1234_5678).unwrap();
        assert_eq!(bar.read::<u16>(6).unwrap(), 0x1234);
        drop(bar);
        assert_eq!(memory[0], 0x1234_5678_0000_0000);
    }
}
