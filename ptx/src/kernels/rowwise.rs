//! Launchers of the row-wise and element-wise kernels.
