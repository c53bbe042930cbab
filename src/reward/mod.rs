//! Verifiers: turn a completion into a reward in [0, 1].

pub mod number;
