//! Byte-level BPE tokenizer (protocol.md §1).
