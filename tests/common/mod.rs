//! Shared test helpers: the queue emulator and a way to run the real `worker-candle` binary.

#![allow(dead_code)]

pub mod emulator;
pub mod fixtures;
pub mod process;
pub mod router;
pub mod scripted;
