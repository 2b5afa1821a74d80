"""numrnn's airspeed velocity benchmarks."""
