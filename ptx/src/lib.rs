//! fpdt-ptx
