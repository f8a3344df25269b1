"""The process around the training: BLAS/OpenMP threads, stop signals, system information, and
warnings printed once per rank. Imports nothing of dptrain but :mod:`dptrain.errors` and the version."""
