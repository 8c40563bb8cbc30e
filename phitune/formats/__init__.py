"""On-disk formats phitune writes and reads, independent of the steps that produce them."""
