"""Training the paper's net: `loop` (the one file to read: fit, one epoch, validate), `state` (resume, save, and what
belongs to a run), `guard` (divergence, stop signals), `schedule` (SGD and the lr rule), `setup` (the data, the
process's place and devices, the placed net and loaders), `checkpoints` (the files) and `speed` (data_wait, step
time, MFU).

Nothing here is imported by the package itself: an up-to-date `train` reads `state` and `setup` without torch."""
