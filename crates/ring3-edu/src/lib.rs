//! edu driver (being written).
