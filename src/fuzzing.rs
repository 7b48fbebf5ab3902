//! Entry points shared by the fuzz targets in `fuzz/` and the corpus replay test.
