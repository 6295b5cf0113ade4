//! GGUF v3 container: zero-copy reader over memmap2 and a writer.
