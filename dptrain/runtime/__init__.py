"""The process around the training: BLAS/OpenMP threads, stop signals, system information,
warnings printed once per rank, and the counter-based hash of the random choices that must not
depend on the number of ranks. Imports nothing of dptrain but :mod:`dptrain.errors` and the version."""
