//! fpdt-model
