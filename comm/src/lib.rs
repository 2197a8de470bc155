//! fpdt-comm
