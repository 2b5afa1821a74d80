"""numrnn's airspeed velocity suite: kernel time over a grid, the standard shapes, peak memory, compile time."""
