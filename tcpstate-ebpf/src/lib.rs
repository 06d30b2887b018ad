//! Empty on purpose: cargo only lets `tcpstate` name this crate as a
//! build-dependency (so it rebuilds when the program changes) if it has a
//! library target. The program itself is `src/main.rs`.
#![no_std]
