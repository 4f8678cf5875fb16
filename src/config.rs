//! Environment → typed, validated settings, all at start-up.
