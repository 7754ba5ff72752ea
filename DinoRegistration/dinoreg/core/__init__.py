"""The spatial core: grids and volumes in physical space, fields, sampling, Jacobians, transforms and ITK files, intensity."""
