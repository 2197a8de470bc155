//! fpdt-runtime
