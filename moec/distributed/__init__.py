"""Running one job on many processes: the process group, the device mesh, the launcher."""
