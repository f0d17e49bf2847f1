"""What every layer uses, and that knows nothing of EMAs or runs: errors and logging, atomic
files, signals, seeding, clocks, torch.distributed, the plain module inside a wrapper, how the
command was invoked, and packages' lazy public names."""
