//! DeepSeek V4 chat rendering and DSML parsing (protocol.md §2-§3).
