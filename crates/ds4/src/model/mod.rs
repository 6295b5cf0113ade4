//! The DeepSeek V4 Flash model: config, weights, forward pass, sessions (model.md §1-§4).
