//! fpdt-alloc
